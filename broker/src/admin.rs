//! The admin API, on a Unix socket: created with mode 0600 whatever the umask ([`bind`]), and
//! each connection's peer checked (`SO_PEERCRED`: the broker's own uid or root,
//! [`peer_allowed`]), so a socket a mistake left open still answers no one else.
//!
//! | request | what |
//! | --- | --- |
//! | `POST /v1/revoke` `{"session": id}` \| `{"person": sub}` \| `{"workspace": name}` | ends the matching live sessions at once (their relays are cancelled); a person or workspace stays revoked, and a workspace's tunnel is dropped |
//! | `GET /v1/sessions` | the live sessions |
//! | `GET /v1/tunnels` | the connected workspaces |

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::server::Broker;
use crate::session::Target;

const MAX_BODY: usize = 4096;

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Binds a Unix socket at `path` that is never reachable by anyone but its owner (and root),
/// not even for an instant: the socket is created in a private directory (0700) beside `path`,
/// given mode 0600 there, and only then renamed into place (same file system: atomic). Neither
/// the umask (process-wide, so it cannot be narrowed for this bind alone) nor a chmod after
/// bind decides who can connect meanwhile. A socket already at `path` (a stale one) is
/// replaced. The same construction as the egress proxy's admin socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
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
pub fn peer_allowed(stream: &tokio::net::UnixStream) -> Result<(), String> {
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

/// Serves the admin socket until `shutdown`.
pub async fn serve(broker: Arc<Broker>, listener: UnixListener, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
        let broker = Arc::clone(&broker);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let broker = Arc::clone(&broker);
                async move { Ok::<_, std::convert::Infallible>(handle(&broker, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(broker: &Broker, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/v1/revoke") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        json!({"error": "body too large"}),
                    );
                }
            };
            match serde_json::from_slice::<Target>(&body) {
                Ok(target) => revoke(broker, &target),
                Err(e) => reply(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
            }
        }
        (Method::GET, "/v1/sessions") => reply(StatusCode::OK, json!(broker.sessions.list())),
        (Method::GET, "/v1/tunnels") => {
            reply(StatusCode::OK, json!({ "connected": broker.tunnels.len() }))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "no such endpoint" }),
        ),
    }
}

/// Revokes `target` and says what ended.
pub fn revoke(broker: &Broker, target: &Target) -> Response<Full<Bytes>> {
    let ended = match broker.end_sessions(target, "revoked by an administrator") {
        Ok(ended) => ended,
        Err(e) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": format!("cannot persist the revocation: {e}") }),
            );
        }
    };
    let tunnel_dropped = match target {
        Target::Workspace(ws) => {
            broker.egress.disconnect(ws);
            broker.tunnels.disconnect(ws)
        }
        _ => false,
    };
    tracing::info!(?target, sessions = ended.len(), tunnel_dropped, "revoked");
    reply(
        StatusCode::OK,
        json!({
            "sessions_ended": ended.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            "tunnel_dropped": tunnel_dropped,
        }),
    )
}
