//! The admin socket: `GET /metrics` (Prometheus text) and `GET /healthz`, over HTTP/1.1 on a
//! Unix socket only the host's operator can reach: created with mode 0600 whatever the umask
//! ([`moat_private_socket::bind`]), and each connection's peer checked (`SO_PEERCRED`: the
//! proxy's own uid or root, [`moat_private_socket::peer_allowed`]), so a socket a mistake left
//! open still answers no one else.

use std::convert::Infallible;
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
        if let Err(why) = moat_private_socket::peer_allowed(&stream) {
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
