//! The broker process: its state, and its three listeners (people's HTTPS API, workspaces'
//! tunnels, the admin Unix socket).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use rustls::pki_types::CertificateDer;

use crate::audit::Audit;
use crate::config::{Config, WorkspaceName};
use crate::entitlement::Schedule;
use crate::oidc::{OidcError, Provider};
use crate::pki::{Pki, PkiError, serial_of, workspace_of};
use crate::session::{Session, Sessions, Target};
use crate::ssh_ca::{SshCa, SshCaError, USER_CA_FILE};
use crate::tunnel::registry::{Sever, Tunnels};
use crate::{admin, api, entitlement, https};

/// A TLS handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many people's HTTP connections at once; more are closed on accept. (A relayed
/// session leaves this count when its connection is upgraded, and is bounded by
/// [`MAX_RELAYS`].)
pub const MAX_API_CONNECTIONS: usize = 4096;
/// At most this many remote sessions relayed at once; more are refused (503).
pub const MAX_RELAYS: usize = 4096;
/// At most this many tunnel connections at once (connected workspaces and handshakes).
pub const MAX_TUNNELS: usize = 4096;

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The PKI could not be loaded.
    #[error("cannot load the broker's certificates")]
    Pki(#[source] PkiError),
    /// The SSH CA could not be loaded.
    #[error("cannot load the SSH user CA")]
    SshCa(#[source] SshCaError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The identity provider's TLS anchors are invalid.
    #[error("invalid identity provider CA")]
    Roots(#[source] rustls::Error),
    /// Discovery failed.
    #[error("cannot discover the identity provider")]
    Oidc(#[source] OidcError),
}

/// Everything the broker knows.
#[derive(Debug)]
pub struct Broker {
    /// The configuration.
    pub config: Config,
    /// The identity provider.
    pub provider: Provider,
    /// Sessions and revocations.
    pub sessions: Sessions,
    /// Connected workspaces.
    pub tunnels: Tunnels,
    /// The SSH user CA.
    pub ssh_ca: SshCa,
    /// TLS CAs and identities.
    pub pki: Pki,
    /// The audit log.
    pub audit: Audit,
    /// One permit per relayed remote session.
    pub relays: Arc<tokio::sync::Semaphore>,
    /// Live corporate egress connections.
    pub egress: crate::corporate::Egress,
}

impl Broker {
    /// Loads the state directory and discovers the identity provider.
    pub async fn new(config: Config, audit: Audit) -> Result<Arc<Self>, BrokerError> {
        let pki = Pki::load_or_create(&config.state_dir, &config.server_names)
            .map_err(BrokerError::Pki)?;
        let ssh_ca = SshCa::load_or_create(&config.state_dir.join(USER_CA_FILE))
            .map_err(BrokerError::SshCa)?;
        let revoked = config.state_dir.join("revoked.json");
        let sessions = Sessions::new(
            Duration::from_secs(config.session_ttl_secs),
            Schedule::new(Duration::from_secs(config.entitlement_check_secs)),
            Some(revoked.clone()),
        )
        .map_err(|source| BrokerError::Read {
            path: revoked,
            source,
        })?;
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| BrokerError::Read {
                path: path.clone(),
                source,
            })
        };
        let roots = match &config.oidc.ca_file {
            Some(path) => https::roots_from_pem(&read(path)?, true),
            None => https::roots_from_pem(b"", true),
        }
        .map_err(BrokerError::Roots)?;
        let secret = String::from_utf8_lossy(&read(&config.oidc.client_secret_file)?)
            .trim()
            .to_owned();
        let http = https::Client::new(roots).map_err(BrokerError::Roots)?;
        let provider = Provider::discover(config.oidc.clone(), secret, http)
            .await
            .map_err(BrokerError::Oidc)?;
        Ok(Arc::new(Broker {
            config,
            provider,
            sessions,
            tunnels: Tunnels::default(),
            ssh_ca,
            pki,
            audit,
            relays: Arc::new(tokio::sync::Semaphore::new(MAX_RELAYS)),
            egress: crate::corporate::Egress::default(),
        }))
    }

    /// The OIDC redirect URI.
    pub fn redirect_uri(&self) -> String {
        format!(
            "{}/v1/callback",
            self.config.public_url.trim_end_matches('/')
        )
    }

    /// Ends the sessions `target` names, as a revocation: they are forgotten, their relays are
    /// cancelled at once (live SSH drops), and each is audited as a Logoff with `reason`. A person
    /// or workspace stays revoked (persisted); this fails only if that cannot be written.
    pub fn end_sessions(
        &self,
        target: &Target,
        reason: &str,
    ) -> std::io::Result<Vec<Arc<Session>>> {
        let ended = self.sessions.revoke(target)?;
        for session in &ended {
            self.audit.logoff(session, reason);
        }
        Ok(ended)
    }

    /// Revokes every tunnel certificate issued to `workspace` so far, by serial (persisted),
    /// from the register of issued certificates; returns how many were not revoked already.
    /// So allowing the name again later lets in only a certificate issued after this.
    pub fn revoke_certificates(&self, workspace: &WorkspaceName) -> std::io::Result<usize> {
        let serials = self
            .pki
            .issued_to(workspace)
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
        self.sessions.revoke_certificates(serials)
    }

    /// Serves all three listeners, and checks sessions' entitlements, until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        api: TcpListener,
        tunnel: TcpListener,
        admin: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), BrokerError> {
        let api_tls = tokio_rustls::TlsAcceptor::from(
            self.pki.api_server_config().map_err(BrokerError::Pki)?,
        );
        let tunnel_tls = tokio_rustls::TlsAcceptor::from(
            self.pki.tunnel_server_config().map_err(BrokerError::Pki)?,
        );
        let a = tokio::spawn(Arc::clone(&self).accept_api(api, api_tls, shutdown.clone()));
        let t =
            tokio::spawn(Arc::clone(&self).accept_tunnels(tunnel, tunnel_tls, shutdown.clone()));
        let m = tokio::spawn(admin::serve(Arc::clone(&self), admin, shutdown.clone()));
        let e = tokio::spawn(entitlement::run(Arc::clone(&self), shutdown.clone()));
        shutdown.cancelled().await;
        a.abort();
        t.abort();
        m.abort();
        e.abort();
        Ok(())
    }

    async fn accept_api(
        self: Arc<Self>,
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
            let (broker, tls, shutdown) = (Arc::clone(&self), tls.clone(), shutdown.clone());
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
        self: Arc<Self>,
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
            let (broker, tls, shutdown) = (Arc::clone(&self), tls.clone(), shutdown.clone());
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
                if stream.get_ref().1.alpn_protocol() == Some(crate::corporate::ALPN) {
                    crate::corporate::serve(
                        Arc::clone(&broker),
                        stream,
                        sever,
                        workspace,
                        shutdown,
                    )
                    .await;
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

/// An I/O object that counts the bytes read from it.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// Wraps `inner`; `read` grows by every byte read.
    pub fn new(inner: T, read: Arc<AtomicU64>) -> Self {
        Counted { inner, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Peer address for records when none is known.
pub fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
