//! The broker's state: everything it knows (configuration, identity provider, sessions and
//! revocations, connected workspaces, CAs, audit log) in one [`Broker`], shared by every
//! handler. It imports no handler and serves nothing: the handlers (`api`, `admin`,
//! `corporate`, `entitlement`) take a `Broker`, and `serve` wires them to the listeners, so the
//! modules depend one way: `serve` -> handlers -> `state`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use moat_broker_client::https;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::config::{Config, WorkspaceName};
use crate::oidc::{OidcError, Provider};
use crate::pki::{Pki, PkiError};
use crate::session::schedule::Schedule;
use crate::session::{Session, Sessions, Target};
use crate::ssh_ca::{SshCa, SshCaError, USER_CA_FILE};
use crate::tunnel::registry::Tunnels;

/// At most this many remote sessions relayed at once; more are refused (503).
pub const MAX_RELAYS: usize = 4096;
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
    pub egress: Egress,
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
            egress: Egress::default(),
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
}

/// The live egress connections, by workspace, so that revoking a workspace cuts them.
#[derive(Debug, Default)]
pub struct Egress {
    live: Mutex<HashMap<WorkspaceName, CancellationToken>>,
}

impl Egress {
    fn lock(&self) -> MutexGuard<'_, HashMap<WorkspaceName, CancellationToken>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A token cancelled when `workspace` is disconnected (or `parent` is cancelled).
    pub(crate) fn track(
        &self,
        workspace: &WorkspaceName,
        parent: &CancellationToken,
    ) -> CancellationToken {
        self.lock()
            .entry(workspace.clone())
            .or_insert_with(|| parent.child_token())
            .child_token()
    }

    /// Cuts every egress connection and flow of `workspace`.
    pub fn disconnect(&self, workspace: &WorkspaceName) {
        if let Some(token) = self.lock().remove(workspace) {
            token.cancel();
        }
    }
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
