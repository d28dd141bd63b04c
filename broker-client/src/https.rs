//! A small HTTPS client for the broker's calls to the identity provider (discovery, JWKS, token
//! exchange) and for `moat`'s calls to the broker: hyper's HTTP/1.1 client connection over
//! rustls, one request per connection, bounded in time and size.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long one exchange (connect, TLS, request, response) may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body read.
pub const MAX_BODY: usize = 256 * 1024;

/// Errors of one HTTPS exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The URL is not an absolute https URL.
    #[error("{0:?} is not an https URL")]
    Url(String),
    /// TCP connect failed.
    #[error("cannot connect to {authority}")]
    Connect {
        /// host:port.
        authority: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate not trusted, for instance).
    #[error("TLS handshake with {authority} failed")]
    Tls {
        /// host:port.
        authority: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The request could not be built.
    #[error("invalid request")]
    Request(#[source] http::Error),
    /// The body was larger than [`MAX_BODY`] or could not be read.
    #[error("response body too large or unreadable")]
    Body,
    /// The whole exchange took longer than [`TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The parts of an https URL the client needs.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    path_and_query: String,
}

impl Target {
    /// Parses an absolute `https://` URL.
    pub fn parse(url: &str) -> Result<Self, HttpsError> {
        let bad = || HttpsError::Url(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Target {
            host,
            port: uri.port_u16().unwrap_or(443),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    /// `host:port` as a Host header and for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The path and query.
    pub fn path(&self) -> &str {
        &self.path_and_query
    }
}

/// A client with one trust configuration.
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// A client trusting `roots` (and nothing else).
    pub fn new(roots: rustls::RootCertStore) -> Result<Self, rustls::Error> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Client {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Opens TCP + TLS to `target`.
    pub async fn connect(&self, target: &Target) -> Result<TlsStream<TcpStream>, HttpsError> {
        let authority = target.authority();
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| HttpsError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(target.host.clone())
            .map_err(|_| HttpsError::Url(target.host.clone()))?;
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|source| HttpsError::Tls { authority, source })
    }

    /// Sends `request` (its URI is only a path; `target` says where) and reads the whole
    /// response, bounded by [`TIMEOUT`] and [`MAX_BODY`].
    pub async fn send(
        &self,
        target: &Target,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, HttpsError> {
        tokio::time::timeout(TIMEOUT, self.send_unbounded(target, request))
            .await
            .map_err(|_| HttpsError::Timeout(TIMEOUT))?
    }

    async fn send_unbounded(
        &self,
        target: &Target,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, HttpsError> {
        let response = self.open(target, request).await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| HttpsError::Body)?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    /// Sends `request` and returns the response head with its body unread (for upgrades).
    pub async fn open(
        &self,
        target: &Target,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, HttpsError> {
        let tls = self.connect(target).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(HttpsError::Http)?;
        tokio::spawn(conn.with_upgrades());
        sender.send_request(request).await.map_err(HttpsError::Http)
    }

    /// GET `url`.
    pub async fn get(&self, url: &str) -> Result<Response<Bytes>, HttpsError> {
        let target = Target::parse(url)?;
        let request = Request::get(target.path())
            .header(http::header::HOST, target.authority())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(HttpsError::Request)?;
        self.send(&target, request).await
    }

    /// POST a form to `url`, with HTTP Basic client authentication if given.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<Response<Bytes>, HttpsError> {
        let target = Target::parse(url)?;
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut request = Request::post(target.path())
            .header(http::header::HOST, target.authority())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some((user, password)) = basic {
            request = request.header(http::header::AUTHORIZATION, basic_auth(user, password));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(HttpsError::Request)?;
        self.send(&target, request).await
    }
}

/// RFC 6749 section 2.3.1: client id and secret are form-urlencoded, then Basic-encoded.
fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(user), enc(password));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Trust anchors from a PEM file plus, if `web_pki`, the Mozilla roots.
pub fn roots_from_pem(pem: &[u8], web_pki: bool) -> Result<rustls::RootCertStore, rustls::Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|_| rustls::Error::General("unreadable PEM certificate".into()))?;
        roots.add(cert)?;
    }
    if web_pki {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    Ok(roots)
}
