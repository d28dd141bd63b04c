//! The broker's end of the tunnels: which workspaces are connected, and opening a stream on one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat_broker_client::protocol::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, STREAM_HOST};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Opening a stream (the host side connecting the guest port included) must finish within this
/// time, so a tunnel that died silently cannot hold a person's request until keepalive notices.
pub const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
use crate::config::WorkspaceName;

/// Errors of the broker's side of a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The workspace has no tunnel (its host is down, or not connected yet).
    #[error("workspace {0} is not connected")]
    NotConnected(WorkspaceName),
    /// The HTTP/2 handshake with the host side failed.
    #[error("the tunnel handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The established tunnel failed (keepalive timeout, reset, unclean close).
    #[error("the tunnel connection failed")]
    Connection(#[source] hyper::Error),
    /// Opening a stream failed.
    #[error("cannot open a stream on the tunnel")]
    Stream(#[source] hyper::Error),
    /// The host side refused the stream (nothing listening on the guest port).
    #[error("the workspace host refused the stream ({0})")]
    Refused(StatusCode),
    /// The request could not be built.
    #[error("invalid stream request")]
    Request(#[source] http::Error),
    /// No answer within [`OPEN_TIMEOUT`].
    #[error("the workspace host did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// A duplicate of a tunnel's TCP socket, kept to cut the tunnel for certain. hyper drives an
/// HTTP/2 client connection on a task of its own and keeps it, and its socket, open while any
/// stream on it is alive; dropping our handles is a graceful shutdown, not a cut. Shutting the
/// socket down is: both ends see it at once and every stream on it fails.
#[derive(Debug)]
pub struct Sever(std::net::TcpStream);

impl Sever {
    /// Keeps a duplicate of `tcp`'s socket.
    pub fn new(tcp: &tokio::net::TcpStream) -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let fd = tcp.as_fd().try_clone_to_owned()?;
        Ok(Sever(std::net::TcpStream::from(fd)))
    }

    /// Shuts the socket down in both directions.
    pub fn sever(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Debug)]
struct Entry {
    sender: SendRequest<Empty<Bytes>>,
    cancel: CancellationToken,
    generation: u64,
}

/// Connected workspaces.
#[derive(Debug, Default)]
pub struct Tunnels {
    inner: Mutex<HashMap<WorkspaceName, Entry>>,
    generation: AtomicU64,
}

impl Tunnels {
    fn lock(&self) -> MutexGuard<'_, HashMap<WorkspaceName, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves one authenticated tunnel connection until it ends, `cancel` fires, or a newer
    /// tunnel for the same workspace replaces it; then cuts its socket through `sever`.
    pub async fn serve<IO>(
        &self,
        io: IO,
        sever: Sever,
        workspace: WorkspaceName,
        cancel: CancellationToken,
    ) -> Result<(), TunnelError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(TunnelError::Handshake)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let previous = self.lock().insert(
            workspace.clone(),
            Entry {
                sender,
                cancel: cancel.clone(),
                generation,
            },
        );
        if let Some(previous) = previous {
            tracing::info!(%workspace, "a new tunnel replaces the previous one");
            previous.cancel.cancel();
        }
        tracing::info!(%workspace, "tunnel up");
        let result = tokio::select! {
            r = connection => r.map_err(TunnelError::Connection),
            () = cancel.cancelled() => Ok(()),
        };
        sever.sever();
        let mut map = self.lock();
        if map
            .get(&workspace)
            .is_some_and(|e| e.generation == generation)
        {
            map.remove(&workspace);
        }
        drop(map);
        tracing::info!(%workspace, "tunnel down");
        result
    }

    /// Opens a stream to guest `port` of `workspace`, within [`OPEN_TIMEOUT`].
    pub async fn open(
        &self,
        workspace: &WorkspaceName,
        port: u32,
    ) -> Result<Upgraded, TunnelError> {
        tokio::time::timeout(OPEN_TIMEOUT, self.open_unbounded(workspace, port))
            .await
            .map_err(|_| TunnelError::Timeout(OPEN_TIMEOUT))?
    }

    async fn open_unbounded(
        &self,
        workspace: &WorkspaceName,
        port: u32,
    ) -> Result<Upgraded, TunnelError> {
        // Cloned out of the lock: the lock is never held across an await.
        let mut sender = self
            .lock()
            .get(workspace)
            .map(|e| e.sender.clone())
            .ok_or_else(|| TunnelError::NotConnected(workspace.clone()))?;
        sender.ready().await.map_err(TunnelError::Stream)?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{STREAM_HOST}:{port}"))
            .body(Empty::new())
            .map_err(TunnelError::Request)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(TunnelError::Stream)?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused(response.status()));
        }
        hyper::upgrade::on(response)
            .await
            .map_err(TunnelError::Stream)
    }

    /// Drops `workspace`'s tunnel, if connected; returns whether it was.
    pub fn disconnect(&self, workspace: &WorkspaceName) -> bool {
        match self.lock().remove(workspace) {
            Some(entry) => {
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether `workspace` has a tunnel now.
    pub fn is_connected(&self, workspace: &WorkspaceName) -> bool {
        self.lock().contains_key(workspace)
    }

    /// How many tunnels are up.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
