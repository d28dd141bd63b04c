//! One intercepted flow: both TLS handshakes, then an HTTP server for the agent (HTTP/2 when
//! the agent's ALPN chose `h2`, else HTTP/1.1) whose every request is checked (inject.rs),
//! audited, and forwarded on a hyper client connection to the pinned upstream address (HTTP/2
//! when the upstream's ALPN chose `h2`, else HTTP/1.1, where requests take turns). Bodies
//! stream; nothing is buffered whole (except a JSON body whose model a route rewrites).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::inject::{self, Refusal};
use super::io::AgentIo;
use super::scan::{Found, ScanBody};
use crate::Shared;
use crate::audit::{FlowInfo, HttpEvent};
use crate::outcome::Reason;
use crate::splice::Counters;

/// Largest request head (request line and headers) accepted; more is answered 431.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per intercepted connection.
pub const MAX_H2_STREAMS: u32 = 100;

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body on its way upstream: streamed (scanned), or rewritten whole.
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Largest JSON body buffered to rewrite its model; a larger one is refused (413).
pub const MAX_REWRITE_BODY: usize = 1024 * 1024;

/// What an intercepted flow knows once admitted.
#[derive(Debug, Clone)]
pub(crate) struct Intercepted {
    pub(crate) info: FlowInfo,
    /// The flow's hostname and port, as the agent named them (held to SNI and Host).
    pub(crate) hostname: String,
    pub(crate) port: u16,
    pub(crate) rule: String,
    /// The upstream's name: the flow's hostname, or a routed rule's host. Secrets are bound,
    /// and the upstream certificate verified, against this name.
    pub(crate) upstream_host: String,
    pub(crate) upstream_addr: SocketAddr,
    /// A routed rule's model rewrite for JSON bodies.
    pub(crate) model: Option<String>,
}

impl Intercepted {
    /// Does this flow go somewhere else than the name the agent used (a routed rule)?
    fn routed(&self) -> bool {
        self.upstream_host != self.hostname || self.upstream_addr.port() != self.port
    }
}

/// The client side of the upstream connection, re-dialled to the same pinned address when the
/// upstream closes it between requests.
#[derive(Default)]
struct Upstream {
    sender: Option<Sender>,
    driver: Option<JoinHandle<()>>,
}

/// The client side of one upstream connection: HTTP/2 when the upstream's ALPN chose `h2`
/// (requests run concurrently), else HTTP/1.1 (one request at a time).
enum Sender {
    H1(SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

impl Sender {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    flow: Intercepted,
    upstream: tokio::sync::Mutex<Upstream>,
    /// The first reason a request was refused or failed, for the flow's Close record.
    first_problem: Mutex<Option<Reason>>,
}

fn text(status: StatusCode, msg: String, close: bool) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(msg)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

async fn tls_to_upstream(
    shared: &Shared,
    tcp: TcpStream,
    host: &str,
) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&shared.upstream_tls));
    match timeout(shared.limits.connect_timeout, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

impl Ctx {
    fn note(&self, reason: Reason) {
        self.shared.metrics.http_stopped(reason);
        let mut p = match self.first_problem.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        p.get_or_insert(reason);
    }

    /// The upstream sender, ready for a request; re-dials the pinned address if needed.
    async fn ready(&self, up: &mut Upstream) -> Result<(), (Reason, String)> {
        if let Some(sender) = up.sender.as_mut()
            && sender.ready().await.is_ok()
        {
            return Ok(());
        }
        up.sender = None;
        let addr = self.flow.upstream_addr;
        let tcp = match timeout(self.shared.limits.connect_timeout, TcpStream::connect(addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err((Reason::ConnectFailed, e.to_string())),
            Err(_) => return Err((Reason::ConnectFailed, "connect timed out".into())),
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls_to_upstream(&self.shared, tcp, &self.flow.upstream_host)
            .await
            .map_err(|e| (Reason::UpstreamTls, e))?;
        self.attach(up, tls).await
    }

    async fn attach(
        &self,
        up: &mut Upstream,
        tls: TlsStream<TcpStream>,
    ) -> Result<(), (Reason, String)> {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = TokioIo::new(tls);
        let (sender, driver) = if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| (Reason::UpstreamError, e.to_string()))?;
            let driver = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            (Sender::H2(sender), driver)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| (Reason::UpstreamError, e.to_string()))?;
            let driver = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            (Sender::H1(sender), driver)
        };
        if let Some(old) = up.driver.replace(driver) {
            old.abort();
        }
        up.sender = Some(sender);
        Ok(())
    }

    fn audit(
        &self,
        head: &Head,
        status: StatusCode,
        reason: Option<Reason>,
        detail: Option<String>,
        secrets: Vec<String>,
        bytes: Option<(u64, u64)>,
    ) {
        self.shared.audit.emit_http(&HttpEvent {
            flow: &self.flow.info,
            rule: &self.flow.rule,
            upstream: self.flow.upstream_addr,
            method: &head.method,
            host: &self.flow.upstream_host,
            routed_from: self.flow.routed().then_some(self.flow.hostname.as_str()),
            path: &head.path,
            query: head.query,
            version: head.version,
            status: status.as_u16(),
            reason,
            detail,
            secrets,
            bytes,
        });
    }

    fn refuse(&self, head: &Head, r: Refusal) -> Response<Body> {
        // HTTP/1.1: close the connection after the refusal. HTTP/2: refuse the stream (a
        // `Connection` header is not allowed there); other streams are checked on their own.
        let close = head.version != "HTTP/2";
        tracing::debug!(flow = %self.flow.info.uid, reason = %r.reason, detail = %r.detail, "request refused");
        self.note(r.reason);
        self.audit(
            head,
            r.status,
            Some(r.reason),
            Some(r.detail.clone()),
            Vec::new(),
            None,
        );
        text(
            r.status,
            format!("moat: request refused ({}): {}\n", r.reason, r.detail),
            close,
        )
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let head = Head {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().is_some(),
            version: match req.version() {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2",
                _ => "HTTP/1.1",
            },
        };
        let (host, port) = (self.flow.hostname.as_str(), self.flow.port);
        let (mut parts, body) = req.into_parts();
        if let Err(r) = inject::check_authority(&parts.headers, &parts.uri, host, port) {
            return self.refuse(&head, r);
        }
        if parts.method == http::Method::CONNECT
            || parts.headers.contains_key(http::header::UPGRADE)
        {
            let r = Refusal {
                status: StatusCode::NOT_IMPLEMENTED,
                reason: Reason::RequestRefused,
                detail: "CONNECT and protocol upgrades are not forwarded on intercepted flows"
                    .into(),
            };
            return self.refuse(&head, r);
        }
        // From here on, names are the upstream's: a routed rule's secrets are bound to its
        // route (the provider), not to the in-workspace name.
        let routed = self.flow.routed();
        let (host, port) = (
            self.flow.upstream_host.as_str(),
            self.flow.upstream_addr.port(),
        );
        let secrets = self.shared.secrets();
        let injected = match inject::apply_secrets(
            &mut parts.headers,
            parts.method.as_str(),
            &parts.uri,
            &secrets,
            host,
            port,
            routed,
        ) {
            Ok(names) => names,
            Err(r) => return self.refuse(&head, r),
        };
        let found = Found::default();
        let body_out = Arc::new(AtomicU64::new(0));
        let body = ScanBody::new(
            body,
            &secrets,
            |spec| spec.binds(host, port, &head.path),
            Arc::clone(&found),
            Arc::clone(&body_out),
        );
        drop(secrets);
        inject::strip_hop_by_hop(&mut parts.headers);
        // The upstream speaks HTTP/1.1: an HTTP/2 request's :authority becomes its Host; a
        // routed request names its route.
        if routed || !parts.headers.contains_key(http::header::HOST) {
            let authority = if port == 443 {
                host.to_owned()
            } else {
                format!("{host}:{port}")
            };
            if let Ok(v) = http::HeaderValue::from_str(&authority) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .and_then(|pq| pq.as_str().parse().ok())
            .unwrap_or_else(|| http::Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        let body = match self.flow.model.as_deref() {
            Some(model) if is_json(&parts.headers) => {
                let limited = http_body_util::Limited::new(body, MAX_REWRITE_BODY);
                let bytes = match limited.collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        let in_body = found.lock().ok().and_then(|f| f.clone());
                        let r = match in_body {
                            Some(name) => Refusal {
                                status: StatusCode::FORBIDDEN,
                                reason: Reason::PlaceholderUnbound,
                                detail: format!(
                                    "placeholder of secret {name:?} in the body is not bound to this request"
                                ),
                            },
                            None => Refusal {
                                status: StatusCode::PAYLOAD_TOO_LARGE,
                                reason: Reason::RequestRefused,
                                detail: format!(
                                    "body unreadable or over {MAX_REWRITE_BODY} bytes: {e}"
                                ),
                            },
                        };
                        return self.refuse(&head, r);
                    }
                };
                let bytes = inject::rewrite_model(&bytes, model).map_or(bytes, Bytes::from);
                parts.headers.remove(http::header::TRANSFER_ENCODING);
                parts.headers.insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from(bytes.len()),
                );
                Full::new(bytes).map_err(|n| match n {}).boxed_unsync()
            }
            _ => body.boxed_unsync(),
        };
        let wait = self.shared.limits.idle_timeout;
        let answer = |r: Result<Result<Response<Incoming>, hyper::Error>, _>| match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err((Reason::UpstreamError, e.to_string())),
            Err(_) => Err((Reason::UpstreamError, "no response in time".into())),
        };
        let sent = {
            let mut up = self.upstream.lock().await;
            match self.ready(&mut up).await {
                Err(e) => Err(e),
                Ok(()) => match up.sender.as_mut() {
                    None => Err((Reason::UpstreamError, "no upstream connection".into())),
                    // HTTP/1.1: one request at a time, holding the connection.
                    Some(Sender::H1(sender)) => {
                        let req = Request::from_parts(parts, body);
                        answer(timeout(wait, sender.send_request(req)).await)
                    }
                    // HTTP/2: streams run side by side; the lock is released first.
                    Some(Sender::H2(sender)) => {
                        let mut sender = sender.clone();
                        drop(up);
                        let authority = parts
                            .headers
                            .remove(http::header::HOST)
                            .and_then(|h| h.to_str().ok().map(str::to_owned))
                            .unwrap_or_else(|| host.to_owned());
                        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                        match format!("https://{authority}{target}").parse() {
                            Ok(uri) => {
                                parts.uri = uri;
                                parts.version = Version::HTTP_2;
                                let req = Request::from_parts(parts, body);
                                answer(timeout(wait, sender.send_request(req)).await)
                            }
                            Err(_) => Err((Reason::UpstreamError, "bad upstream URI".into())),
                        }
                    }
                },
            }
        };
        let in_body = match found.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(name) = in_body {
            let r = Refusal {
                status: StatusCode::FORBIDDEN,
                reason: Reason::PlaceholderUnbound,
                detail: format!(
                    "placeholder of secret {name:?} in the body is not bound to this request"
                ),
            };
            return self.refuse(&head, r);
        }
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                inject::strip_hop_by_hop(&mut parts.headers);
                let m = &self.shared.metrics;
                m.http_forwarded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                m.secrets_injected.fetch_add(
                    u64::try_from(injected.len()).unwrap_or(u64::MAX),
                    std::sync::atomic::Ordering::Relaxed,
                );
                // The record is written when the response body ends, with both byte counts.
                let status = parts.status;
                let ctx = Arc::clone(&self);
                let done = move |received: u64| {
                    let out = body_out.load(Ordering::Relaxed);
                    ctx.audit(&head, status, None, None, injected, Some((out, received)));
                };
                let body = Audited {
                    inner: body,
                    bytes: 0,
                    done: Some(Box::new(done)),
                };
                Response::from_parts(parts, body.boxed())
            }
            Err((reason, detail)) => {
                tracing::debug!(flow = %self.flow.info.uid, %reason, %detail, "forward failed");
                self.note(reason);
                let status = StatusCode::BAD_GATEWAY;
                self.audit(&head, status, Some(reason), Some(detail), injected, None);
                text(status, format!("moat: upstream failed ({reason})\n"), true)
            }
        }
    }
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// A response body that counts its bytes and calls `done` once when it ends, fails or is
/// dropped (the agent went away).
struct Audited {
    inner: Incoming,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl Audited {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes);
        }
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Audited {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(_) => this.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
struct Head {
    method: String,
    path: String,
    query: bool,
    version: &'static str,
}

/// Runs an admitted intercepted flow to its end. Returns the reason it ended and a detail.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    flow: Intercepted,
    agent: UnixStream,
    pending: Vec<u8>,
    upstream: TcpStream,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> (Reason, Option<String>) {
    // 1. Upstream TLS first: an upstream that does not verify fails the agent's handshake.
    let up_tls = match tls_to_upstream(&shared, upstream, &flow.upstream_host).await {
        Ok(tls) => tls,
        Err(e) => return (Reason::UpstreamTls, Some(e)),
    };
    // 2. The agent's TLS, with a leaf for the flow's hostname (already equal to the SNI).
    let config = match shared.ca.server_config(&flow.hostname) {
        Ok(c) => c,
        Err(e) => return (Reason::InterceptSetup, Some(crate::error_chain(&e))),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let agent = AgentIo::new(pending, agent, counters);
    let agent_tls = match timeout(shared.limits.sniff_timeout, acceptor.accept(agent)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return (Reason::AgentTls, Some(e.to_string())),
        Err(_) => return (Reason::AgentTls, Some("TLS handshake timed out".into())),
    };

    let ctx = Arc::new(Ctx {
        shared: Arc::clone(&shared),
        flow,
        upstream: tokio::sync::Mutex::new(Upstream::default()),
        first_problem: Mutex::new(None),
    });
    {
        let mut up = ctx.upstream.lock().await;
        if let Err((reason, detail)) = ctx.attach(&mut up, up_tls).await {
            return (reason, Some(detail));
        }
    }

    // 3. HTTP/1.1 to the agent, every request through Ctx::handle.
    let service_ctx = Arc::clone(&ctx);
    let service = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&service_ctx);
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let h2 = agent_tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let io = TokioIo::new(agent_tls);
    let conn = async {
        if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(MAX_REQUEST_HEAD).unwrap_or(u32::MAX))
                .max_concurrent_streams(MAX_H2_STREAMS)
                .keep_alive_interval(None)
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(shared.limits.idle_timeout)
                .max_buf_size(MAX_REQUEST_HEAD)
                .max_header_size(MAX_REQUEST_HEAD)
                .serve_connection(io, service)
                .await
        }
    };
    let total = shared.limits.total_timeout;
    let ended = tokio::select! {
        r = conn => match r {
            Ok(()) => None,
            Err(e) if e.is_timeout() => Some((Reason::IdleTimeout, None)),
            Err(e) if e.is_parse() || e.is_parse_too_large() => {
                Some((Reason::HttpMalformed, Some(e.to_string())))
            }
            Err(e) if e.is_incomplete_message() || e.is_canceled() => None,
            Err(e) => Some((Reason::AgentError, Some(e.to_string()))),
        },
        () = cancel.cancelled() => Some((Reason::Revoked, None)),
        () = tokio::time::sleep(total.max(Duration::from_millis(1))) => Some((Reason::TotalTimeout, None)),
    };
    let problem = match ctx.first_problem.lock() {
        Ok(p) => *p,
        Err(poisoned) => *poisoned.into_inner(),
    };
    ctx.upstream.lock().await.sender = None;
    match (ended, problem) {
        (Some((Reason::Revoked, d)), _) => (Reason::Revoked, d),
        (_, Some(reason)) => (reason, None),
        (Some(end), None) => end,
        (None, None) => (Reason::Finished, None),
    }
}
