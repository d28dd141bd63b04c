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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS, STREAM_HOST, vsock};

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
}

/// A prepared connector.
pub struct Connector {
    config: ConnectorConfig,
    tls: tokio_rustls::TlsConnector,
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
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| ConnectorError::ServerName(config.server_name.clone()))?;
        Ok(Connector {
            config,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_name,
        })
    }

    /// Keeps the tunnel up until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut delay = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            tokio::select! {
                r = self.once() => match r {
                    Ok(()) => tracing::info!(broker = %self.config.broker, "tunnel closed"),
                    Err(e) => tracing::warn!(
                        broker = %self.config.broker,
                        "tunnel: {}", crate::error_chain(&*e)
                    ),
                },
                () = shutdown.cancelled() => return,
            }
            if started.elapsed() >= STABLE {
                delay = BACKOFF_MIN;
            }
            let wait = jitter(delay);
            tracing::debug!(?wait, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// One tunnel connection, served until it ends.
    async fn once(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let dial = async {
            let tcp = TcpStream::connect(&self.config.broker).await?;
            let _ = tcp.set_nodelay(true);
            self.tls.connect(self.server_name.clone(), tcp).await
        };
        let tls = tokio::time::timeout(DIAL_TIMEOUT, dial)
            .await
            .map_err(|_| "dial timed out")??;
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
    let mut guest = match vsock::connect(uds, port).await {
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
