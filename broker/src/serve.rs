//! The broker's listeners: people's HTTPS API, workspaces' tunnels (and their corporate egress
//! connections, told apart by ALPN), the admin Unix socket, and the entitlement checks beside
//! them. Only the `moat-broker` binary (and tests that run a whole broker) starts them; nothing
//! in the crate imports this module.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use moat_broker_client::protocol::EGRESS_ALPN;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WorkspaceName};
use crate::pki::{serial_of, workspace_of};
use crate::session::Sessions;
use crate::state::{Broker, BrokerError};
use crate::tunnel::registry::Sever;
use crate::{admin, api, corporate, entitlement};

/// A TLS handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many people's HTTP connections at once; more are closed on accept. (A relayed
/// session leaves this count when its connection is upgraded, and is bounded by
/// [`MAX_RELAYS`](crate::state::MAX_RELAYS).)
pub const MAX_API_CONNECTIONS: usize = 4096;
/// At most this many tunnel connections at once (connected workspaces and handshakes).
pub const MAX_TUNNELS: usize = 4096;

/// Serves all three listeners, and checks sessions' entitlements, until `shutdown`.
pub async fn serve(
    broker: Arc<Broker>,
    api: TcpListener,
    tunnel: TcpListener,
    admin: UnixListener,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    let api_tls =
        tokio_rustls::TlsAcceptor::from(broker.pki.api_server_config().map_err(BrokerError::Pki)?);
    let tunnel_tls = tokio_rustls::TlsAcceptor::from(
        broker
            .pki
            .tunnel_server_config()
            .map_err(BrokerError::Pki)?,
    );
    let a = tokio::spawn(accept_api(
        Arc::clone(&broker),
        api,
        api_tls,
        shutdown.clone(),
    ));
    let t = tokio::spawn(accept_tunnels(
        Arc::clone(&broker),
        tunnel,
        tunnel_tls,
        shutdown.clone(),
    ));
    let m = tokio::spawn(admin::serve(Arc::clone(&broker), admin, shutdown.clone()));
    let e = tokio::spawn(entitlement::run(Arc::clone(&broker), shutdown.clone()));
    shutdown.cancelled().await;
    a.abort();
    t.abort();
    m.abort();
    e.abort();
    Ok(())
}

async fn accept_api(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: {MAX_API_CONNECTIONS} already open");
            continue;
        };
        let (broker, tls, shutdown) = (Arc::clone(&broker), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let broker = Arc::clone(&broker);
                let shutdown = shutdown.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        api::handle(broker, req, peer, shutdown).await,
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

async fn accept_tunnels(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "tunnel refused: {MAX_TUNNELS} already open");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(sever) = Sever::new(&tcp) else {
            continue;
        };
        let (broker, tls, shutdown) = (Arc::clone(&broker), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "tunnel TLS handshake refused: {e}");
                    return;
                }
                Err(_) => return,
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first());
            let workspace = match admit_tunnel(&broker.config, &broker.sessions, cert) {
                Ok(workspace) => workspace,
                Err(why) => {
                    tracing::warn!(%peer, "tunnel refused: {why}");
                    return;
                }
            };
            if stream.get_ref().1.alpn_protocol() == Some(EGRESS_ALPN) {
                corporate::serve(Arc::clone(&broker), stream, sever, workspace, shutdown).await;
                return;
            }
            if let Err(e) = broker
                .tunnels
                .serve(stream, sever, workspace.clone(), shutdown.child_token())
                .await
            {
                tracing::info!(%peer, %workspace, "tunnel ended: {}", crate::error_chain(&e));
            }
        });
    }
}

/// Whether a tunnel connection whose TLS handshake verified `cert` (a client certificate of the
/// workspace CA, within its validity) may be served: returns the workspace it stands for, or
/// why not. The workspace must be configured and not revoked, and the certificate's serial not
/// revoked: revoking a workspace revokes its certificates by serial, so a stolen one stays out
/// when the name is allowed again.
pub fn admit_tunnel(
    config: &Config,
    sessions: &Sessions,
    cert: Option<&CertificateDer<'_>>,
) -> Result<WorkspaceName, String> {
    let cert = cert.ok_or("no client certificate")?;
    let workspace = workspace_of(cert).ok_or("no workspace name in its certificate")?;
    let serial = serial_of(cert).ok_or("no serial in its certificate")?;
    if config.workspace(&workspace).is_none() {
        return Err(format!("workspace {workspace} not configured"));
    }
    if sessions.workspace_revoked(&workspace) {
        return Err(format!("workspace {workspace} revoked"));
    }
    if sessions.certificate_revoked(&serial) {
        return Err(format!(
            "certificate {serial} of workspace {workspace} revoked"
        ));
    }
    Ok(workspace)
}
