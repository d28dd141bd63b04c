//! The admin socket: `GET /metrics` (Prometheus text) and `GET /healthz`, over HTTP/1.1 on a
//! Unix socket only the host's operator can reach: created with mode 0600 whatever the umask
//! ([`bind_private`]), and each connection's peer checked (`SO_PEERCRED`: the proxy's own uid or
//! root), so a socket a mistake left open still answers no one else.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => {
            let mut body = shared.metrics.render();
            shared.audit.render_metrics(&mut body);
            (StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        ("GET", "/healthz") => (
            StatusCode::OK,
            "text/plain",
            format!("ok policy={:?}\n", shared.policy.current().name),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds a Unix socket at `path` that is never reachable by anyone but its owner (and root),
/// not even for an instant: the socket is created in a private directory (0700) beside `path`,
/// given mode 0600 there, and only then renamed into place (same file system: atomic). Neither
/// the umask nor a chmod after bind decides who can connect meanwhile (the umask is
/// process-wide, so it cannot be narrowed for this bind alone). A socket already at `path`
/// (a stale one) is replaced.
pub(crate) fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no socket file", path.display()),
        )
    })?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot create the private directory {}: {e}",
                    private.display()
                ),
            )
        })?;
    let inside = private.join("socket");
    let bound = std::os::unix::net::UnixListener::bind(&inside).and_then(|listener| {
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    let listener = bound?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Whether the peer of an admin connection may use it: the uid this process runs as, or root.
/// Refused with the reason otherwise.
pub(crate) fn peer_allowed(stream: &tokio::net::UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    match cred.uid() {
        0 => Ok(()),
        uid if uid == own => Ok(()),
        uid => Err(format!(
            "peer uid {uid} is neither this process's ({own}) nor root"
        )),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: UnixListener,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        if let Err(why) = peer_allowed(&stream) {
            // Closed unanswered.
            tracing::warn!(reason = %why, "admin connection refused");
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = respond(&shared, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
