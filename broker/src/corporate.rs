//! Corporate egress: the only way from a workspace to a corporate-network service.
//!
//! A workspace's host side opens a second TLS connection to the tunnel listener, with the same
//! workspace certificate and ALPN `moat-egress` (`protocol::EGRESS_ALPN`), as an HTTP/2 client (the tunnel proper has the
//! roles reversed, so only the broker can open streams on it). Each flow is one
//! `CONNECT <service>:<port>` stream naming a configured service, never an address. The broker
//! connects only to services configured under `[[services]]` and listed for that workspace, at
//! the address the configuration gives (resolved by the broker), and audits each flow as OCSF
//! Network Activity. Revoking the workspace cuts these connections too.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat_broker_client::protocol::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::audit::CorporateEvent;
use crate::config::{ServiceName, WorkspaceName};
use crate::state::{Broker, Counted};
use crate::tunnel::registry::Sever;

/// Connecting to a corporate service must finish within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one authenticated egress connection of `workspace`.
pub async fn serve<IO>(
    broker: Arc<Broker>,
    io: IO,
    sever: Sever,
    workspace: WorkspaceName,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = broker.egress.track(&workspace, &shutdown);
    let service = {
        let (broker, workspace, cancel) = (Arc::clone(&broker), workspace.clone(), cancel.clone());
        hyper::service::service_fn(move |req| {
            let (broker, workspace, cancel) =
                (Arc::clone(&broker), workspace.clone(), cancel.clone());
            async move { Ok::<_, Infallible>(flow(broker, workspace, req, cancel).await) }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        r = connection => if let Err(e) = r {
            tracing::info!(%workspace, "egress connection ended: {e}");
        },
        () = cancel.cancelled() => {}
    }
    sever.sever();
}

fn empty(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

/// The service a flow request names, if it is one `workspace` may reach, and its address.
fn admit(
    broker: &Broker,
    workspace: &WorkspaceName,
    req: &Request<Incoming>,
) -> Result<(ServiceName, String), &'static str> {
    if req.method() != Method::CONNECT {
        return Err("not a CONNECT request");
    }
    let authority = req.uri().authority().ok_or("no service named")?;
    let name = ServiceName::try_from(authority.host()).map_err(|_| "not a service name")?;
    if broker.sessions.workspace_revoked(workspace) {
        return Err("workspace revoked");
    }
    let listed = broker
        .config
        .workspace(workspace)
        .is_some_and(|w| w.services.contains(&name));
    let service = broker
        .config
        .service(&name)
        .filter(|_| listed)
        .ok_or("service not allowed for this workspace")?;
    let port = service
        .address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    if port.is_none() || port != authority.port_u16() {
        return Err("wrong port for this service");
    }
    Ok((name, service.address.clone()))
}

async fn flow(
    broker: Arc<Broker>,
    workspace: WorkspaceName,
    req: Request<Incoming>,
    cancel: CancellationToken,
) -> Response<Empty<Bytes>> {
    let (service, address) = match admit(&broker, &workspace, &req) {
        Ok(ok) => ok,
        Err(why) => {
            let requested = req.uri().authority().map(|a| a.to_string());
            broker.audit.corporate(&CorporateEvent::refuse(
                &workspace,
                requested.as_deref().unwrap_or(""),
                why,
            ));
            return empty(StatusCode::FORBIDDEN);
        }
    };
    let upstream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(_)) | Err(_) => {
                broker.audit.corporate(&CorporateEvent::fail(
                    &workspace,
                    service.as_str(),
                    &address,
                ));
                return empty(StatusCode::BAD_GATEWAY);
            }
        };
    let peer = upstream.peer_addr().ok();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let started = SystemTime::now();
        broker.audit.corporate(&CorporateEvent::open(
            &workspace,
            service.as_str(),
            &address,
            peer,
        ));
        let (out, back) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut from_workspace = Counted::new(TokioIo::new(upgraded), Arc::clone(&out));
        let mut from_service = Counted::new(upstream, Arc::clone(&back));
        let why = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut from_workspace, &mut from_service) => {
                if r.is_ok() { "finished" } else { "connection lost" }
            }
            () = cancel.cancelled() => "workspace disconnected",
        };
        broker.audit.corporate(&CorporateEvent::close(
            &workspace,
            service.as_str(),
            &address,
            peer,
            (out.load(Ordering::Relaxed), back.load(Ordering::Relaxed)),
            started,
            why,
        ));
    });
    empty(StatusCode::OK)
}
