//! The admin API, on a Unix socket: created with mode 0600 whatever the umask
//! ([`moat_private_socket::bind`]), and each connection's peer checked
//! (`SO_PEERCRED`: the broker's own uid or root, [`peer_allowed`]), so a socket a mistake left
//! open still answers no one else.
//!
//! | request | what |
//! | --- | --- |
//! | `POST /v1/revoke` `{"session": id}` \| `{"person": sub}` \| `{"workspace": name}` | ends the matching live sessions at once (their relays are cancelled); a person or workspace stays revoked, and a workspace's tunnel is dropped and every tunnel certificate issued to it so far is revoked by serial |
//! | `POST /v1/unrevoke` `{"person": sub}` \| `{"workspace": name}` | allows a revoked person or workspace again; a workspace's revoked certificates stay revoked (enrol it again) |
//! | `GET /v1/sessions` | the live sessions |
//! | `GET /v1/tunnels` | the connected workspaces |

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

use crate::session::{Target, Unrevoke};
use crate::state::Broker;

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

pub use moat_private_socket::peer_allowed;

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
        (Method::POST, "/v1/revoke") => match read_json::<Target>(req).await {
            Ok(target) => revoke(broker, &target),
            Err(refused) => refused,
        },
        (Method::POST, "/v1/unrevoke") => match read_json::<Unrevoke>(req).await {
            Ok(target) => unrevoke(broker, &target),
            Err(refused) => refused,
        },
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

/// The request's JSON body (at most [`MAX_BODY`] bytes), or the answer refusing it.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body too large"}),
            ));
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| reply(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })))
}

/// Revokes `target` and says what ended. A workspace's tunnels are cut even when the revocation
/// cannot be written (the error is reported): what is live ends first.
pub fn revoke(broker: &Broker, target: &Target) -> Response<Full<Bytes>> {
    let ended = broker.end_sessions(target, "revoked by an administrator");
    let (certificates, tunnel_dropped) = match target {
        Target::Workspace(ws) => {
            let certificates = broker.revoke_certificates(ws);
            broker.egress.disconnect(ws);
            (certificates, broker.tunnels.disconnect(ws))
        }
        _ => (Ok(0), false),
    };
    let (ended, certificates) = match (ended, certificates) {
        (Ok(ended), Ok(certificates)) => (ended, certificates),
        (Err(e), _) | (_, Err(e)) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({
                    "error": format!("cannot persist the revocation: {e}"),
                    "tunnel_dropped": tunnel_dropped,
                }),
            );
        }
    };
    tracing::info!(
        ?target,
        sessions = ended.len(),
        certificates,
        tunnel_dropped,
        "revoked"
    );
    reply(
        StatusCode::OK,
        json!({
            "sessions_ended": ended.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            "tunnel_dropped": tunnel_dropped,
            "certificates_revoked": certificates,
        }),
    )
}

/// Allows `target` again and says whether it was revoked.
pub fn unrevoke(broker: &Broker, target: &Unrevoke) -> Response<Full<Bytes>> {
    match broker.sessions.unrevoke(target) {
        Ok(was_revoked) => {
            tracing::info!(?target, was_revoked, "allowed again");
            reply(StatusCode::OK, json!({ "was_revoked": was_revoked }))
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": format!("cannot persist the change: {e}") }),
        ),
    }
}
