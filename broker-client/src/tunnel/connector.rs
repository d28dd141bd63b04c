//! The workspace host's side of the tunnel: dial the broker with the workspace's certificate,
//! serve `CONNECT workspace:<port>` streams by connecting them to the guest's vsock socket, and
//! come back with capped, jittered exponential backoff whenever the tunnel ends.
//!
//! Only the ports given (22 by default) are ever connected; the broker cannot name a path, a host
//! or another workspace. When the tunnel is down, nothing reaches the workspace: there is no
//! listening socket on this side.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::vsock;
use crate::protocol::{
    EGRESS_ALPN, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS, STREAM_HOST,
};

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Connect plus TLS handshake must finish within this time.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting the connector up (dial errors are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The identity or the broker CA could not be parsed.
    #[error("invalid {0} PEM")]
    Pem(&'static str),
    /// The TLS configuration could not be built.
    #[error("cannot build the tunnel's TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The broker's name is not a valid TLS server name.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
}

/// What the connector needs.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The broker's tunnel listener, `host:port`.
    pub broker: String,
    /// The name in the broker's certificate (a DNS name or an IP address).
    pub server_name: String,
    /// The workspace's certificate (PEM).
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
    /// The broker's TLS CA (PEM), the only anchor trusted.
    pub broker_ca_pem: String,
    /// The workspace's vsock Unix socket.
    pub uds: PathBuf,
    /// The guest ports the broker may open.
    pub ports: Vec<u32>,
    /// Where this host's egress proxy asks for corporate services (`CONNECT <service>:<port>\n`
    /// -> `OK\n`), if anywhere.
    pub egress_uds: Option<PathBuf>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The current corporate egress connection's request handle, if it is up.
#[derive(Debug, Default, Clone)]
struct EgressSender(Arc<std::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>>);

impl EgressSender {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SendRequest<Empty<Bytes>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A prepared connector.
pub struct Connector {
    config: ConnectorConfig,
    tls: tokio_rustls::TlsConnector,
    egress_tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("broker", &self.config.broker)
            .field("uds", &self.config.uds)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Parses the identity and builds the TLS client configuration (TLS 1.3, ALPN h2).
    pub fn new(config: ConnectorConfig) -> Result<Self, ConnectorError> {
        let chain = CertificateDer::pem_slice_iter(config.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ConnectorError::Pem("workspace certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(config.key_pem.as_bytes())
            .map_err(|_| ConnectorError::Pem("workspace key"))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(config.broker_ca_pem.as_bytes()) {
            let ca = ca.map_err(|_| ConnectorError::Pem("broker CA"))?;
            roots.add(ca).map_err(ConnectorError::Tls)?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConnectorError::Tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(ConnectorError::Tls)?;
        let mut egress_tls = tls.clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        egress_tls.alpn_protocols = vec![EGRESS_ALPN.to_vec()];
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| ConnectorError::ServerName(config.server_name.clone()))?;
        Ok(Connector {
            config,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            egress_tls: tokio_rustls::TlsConnector::from(Arc::new(egress_tls)),
            server_name,
        })
    }

    /// Keeps the tunnel (and, if configured, the corporate egress connection) up until
    /// `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let tunnel = self.keep_up("tunnel", &shutdown, || self.once());
        match &self.config.egress_uds {
            None => tunnel.await,
            Some(uds) => {
                let sender = EgressSender::default();
                // Mode 0600 from the start (no chmod window): only this host's egress proxy,
                // running as the same user, may ask for corporate services.
                let listener = match moat_private_socket::bind(uds) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(uds = %uds.display(), "cannot listen for egress: {e}");
                        return tunnel.await;
                    }
                };
                let dial = self.keep_up("egress", &shutdown, || self.egress_once(&sender));
                let serve = serve_egress(listener, &sender, &shutdown);
                tokio::join!(tunnel, dial, serve);
            }
        }
    }

    /// Runs `connect` again and again with capped, jittered exponential backoff.
    async fn keep_up<F, Fut>(&self, what: &str, shutdown: &CancellationToken, mut connect: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), BoxError>>,
    {
        let mut delay = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            tokio::select! {
                r = connect() => match r {
                    Ok(()) => tracing::info!(broker = %self.config.broker, "{what} closed"),
                    Err(e) => tracing::warn!(
                        broker = %self.config.broker,
                        "{what}: {}", crate::error_chain(&*e)
                    ),
                },
                () = shutdown.cancelled() => return,
            }
            if started.elapsed() >= STABLE {
                delay = BACKOFF_MIN;
            }
            let wait = jitter(delay);
            tracing::debug!(?wait, "{what}: reconnecting");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// TCP and TLS to the broker with `tls`.
    async fn dial(
        &self,
        tls: &tokio_rustls::TlsConnector,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
        let dial = async {
            let tcp = TcpStream::connect(&self.config.broker).await?;
            let _ = tcp.set_nodelay(true);
            tls.connect(self.server_name.clone(), tcp).await
        };
        Ok(tokio::time::timeout(DIAL_TIMEOUT, dial)
            .await
            .map_err(|_| "dial timed out")??)
    }

    /// One corporate egress connection (HTTP/2 client, ALPN moat-egress), kept until it ends.
    async fn egress_once(&self, sender: &EgressSender) -> Result<(), BoxError> {
        let tls = self.dial(&self.egress_tls).await?;
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        tracing::info!(broker = %self.config.broker, "egress connected");
        *sender.lock() = Some(send);
        let result = connection.await;
        *sender.lock() = None;
        Ok(result?)
    }

    /// One tunnel connection, served until it ends.
    async fn once(&self) -> Result<(), BoxError> {
        let tls = self.dial(&self.tls).await?;
        tracing::info!(broker = %self.config.broker, "tunnel connected");
        let uds = Arc::new(self.config.uds.clone());
        let ports = Arc::new(self.config.ports.clone());
        let service = hyper::service::service_fn(move |req| {
            let (uds, ports) = (Arc::clone(&uds), Arc::clone(&ports));
            async move { Ok::<_, Infallible>(stream(req, &uds, &ports).await) }
        });
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_concurrent_streams(MAX_STREAMS)
            .adaptive_window(true)
            .serve_connection(TokioIo::new(tls), service)
            .await?;
        Ok(())
    }
}

fn empty(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

/// The guest port a stream request names, if it is one of `ports`.
fn requested_port(req: &Request<Incoming>, ports: &[u32]) -> Option<u32> {
    let authority = req.uri().authority()?;
    let port = u32::from(authority.port_u16()?);
    (req.method() == Method::CONNECT && authority.host() == STREAM_HOST && ports.contains(&port))
        .then_some(port)
}

/// Serves one stream: connect the guest port first (so a refusal is an HTTP status, not an open
/// stream that closes), then answer 200 and splice.
async fn stream(
    req: Request<Incoming>,
    uds: &std::path::Path,
    ports: &[u32],
) -> Response<Empty<Bytes>> {
    let Some(port) = requested_port(&req, ports) else {
        return empty(StatusCode::FORBIDDEN);
    };
    let mut guest = match vsock::connect_when_ready(uds, port, GUEST_READY_GRACE).await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(port, "tunnel stream: {}", crate::error_chain(&e));
            return empty(StatusCode::BAD_GATEWAY);
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut upgraded = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut guest).await;
            }
            Err(e) => tracing::warn!(port, "tunnel stream upgrade: {e}"),
        }
    });
    empty(StatusCode::OK)
}

/// How long a person's stream waits for the workspace to listen on its port: the tunnel is up
/// as soon as `moat run` starts, a VM's guest-init serves SSH seconds later.
const GUEST_READY_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// The longest egress request line (`CONNECT <63-byte name>:<port>\n` fits easily).
const MAX_EGRESS_LINE: usize = 128;

/// Accepts the egress proxy's requests on `listener` until `shutdown`.
async fn serve_egress(
    listener: tokio::net::UnixListener,
    sender: &EgressSender,
    shutdown: &CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            () = shutdown.cancelled() => return,
        };
        let sender = sender.clone();
        tokio::spawn(async move {
            if let Err(e) = egress_request(stream, sender).await {
                tracing::info!("egress request: {e}");
            }
        });
    }
}

/// One request: read `CONNECT <service>:<port>\n` (bounded), ask the broker, answer `OK\n` or
/// `ERR <status>\n`, then splice.
async fn egress_request(
    mut stream: tokio::net::UnixStream,
    sender: EgressSender,
) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut line = Vec::new();
    let read = async {
        loop {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            if line.len() == MAX_EGRESS_LINE {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            line.push(b);
        }
    };
    tokio::time::timeout(vsock::HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| "request line too slow")??;
    let target = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|t| t.parse::<http::uri::Authority>().ok());
    let Some(target) = target else {
        stream.write_all(b"ERR bad request\n").await?;
        return Ok(());
    };
    let current = sender.lock().clone();
    let Some(mut send) = current else {
        stream.write_all(b"ERR broker not connected\n").await?;
        return Ok(());
    };
    send.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .body(Empty::new())?;
    let response = send.send_request(request).await?;
    if response.status() != StatusCode::OK {
        stream
            .write_all(format!("ERR {}\n", response.status().as_u16()).as_bytes())
            .await?;
        return Ok(());
    }
    let upgraded = hyper::upgrade::on(response).await?;
    stream.write_all(b"OK\n").await?;
    let mut upgraded = TokioIo::new(upgraded);
    tokio::io::copy_bidirectional(&mut stream, &mut upgraded).await?;
    Ok(())
}

/// `delay` with equal jitter: between half and all of it, so many workspaces do not reconnect
/// in lock step after a broker restart.
fn jitter(delay: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let r = ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_or(0, |()| u16::from_le_bytes(b));
    let half = delay / 2;
    half + half.mul_f64(f64::from(r) / f64::from(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(8));
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }
}
