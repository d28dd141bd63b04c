//! One intercepted flow: both TLS handshakes, then an HTTP server for the agent (HTTP/2 when
//! the agent's ALPN chose `h2`, else HTTP/1.1) whose every request is checked (inject.rs),
//! audited, and forwarded on a hyper client connection to the pinned upstream address (HTTP/2
//! when the upstream's ALPN chose `h2`, else HTTP/1.1, where requests take turns). Bodies
//! stream; nothing is buffered whole (except a JSON body whose model a route rewrites).
//!
//! The upstream connection comes from the pool (pool.rs) when one to the same name and pinned
//! address is idle there, and goes back to it when the agent's connection ends cleanly. Reads
//! under rustls on both sides are buffered (rustls reads at most 4 KiB at a time; the buffer
//! turns a stream of small reads into one system call per `splice_buffer` bytes).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::framing::{Followed, Head as Framed, Heads};
use super::inject::{self, Refusal};
use super::io::AgentIo;
use super::mcp::{self, McpRefusal};
use super::pool::{Connection, PoolKey, Sender};
use super::reflect::{self, Injected, Patterns, Place, ReflectBody, Reflections};
use super::scan::{Found, ScanBody};
use super::{MAX_REQUEST_HEAD, UpBody};
use crate::Shared;
use crate::audit::{FlowInfo, HttpEvent};
use crate::outcome::{Blame, Reason};
use crate::secrets::{SecretValue, Secrets};
use crate::splice::Counters;

/// Concurrent HTTP/2 streams per intercepted connection.
pub const MAX_H2_STREAMS: u32 = 100;

type Body = BoxBody<Bytes, super::BodyError>;
/// The upstream's transport under TLS: TCP with buffered reads.
type UpstreamIo = BufReader<TcpStream>;

/// How long a finished flow waits for its upstream connection to be idle before pooling it
/// (the connection's task may not yet have seen the last response end).
const POOL_READY_WAIT: Duration = Duration::from_millis(100);

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
    /// The pool generation (policy) the flow was admitted under; connections it opens carry it.
    pub(crate) generation: u64,
}

impl Intercepted {
    /// Does this flow go somewhere else than the name the agent used (a routed rule)?
    fn routed(&self) -> bool {
        self.upstream_host != self.hostname || self.upstream_addr.port() != self.port
    }

    /// What the flow's upstream connections are pooled by.
    fn pool_key(&self) -> PoolKey {
        PoolKey {
            host: self.upstream_host.clone(),
            addr: self.upstream_addr,
        }
    }
}

/// The upstream side of an admitted intercepted flow.
pub(crate) enum Upstream {
    /// A new TCP connection to the pinned address; TLS is still to be done.
    Tcp(TcpStream),
    /// An idle, verified connection from the pool, for the same name and pinned address.
    Pooled(Connection),
}

struct Ctx {
    shared: Arc<Shared>,
    flow: Intercepted,
    /// The upstream connection, re-dialled to the same pinned address when the upstream
    /// closes it between requests.
    upstream: tokio::sync::Mutex<Option<Connection>>,
    /// The first reason a request was refused or failed, for the flow's Close record.
    first_problem: Mutex<Option<Reason>>,
    /// HTTP/1.1: how each request head was framed as the agent sent it, in order.
    heads: Arc<Heads>,
    /// The secrets injected on this connection so far, which its responses are scanned for.
    sent: Mutex<Sent>,
    /// The flow's byte and request counts.
    counters: Arc<Counters>,
}

/// The secrets injected into requests on one connection (name, value as injected, the
/// placeholder it stands for), and their forms compiled for the response scan.
#[derive(Default)]
struct Sent {
    secrets: Vec<(String, SecretValue, String)>,
    patterns: Option<Arc<Patterns>>,
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
) -> Result<TlsStream<UpstreamIo>, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&shared.upstream_tls));
    let io = BufReader::with_capacity(shared.limits.splice_buffer, tcp);
    match timeout(shared.limits.connect_timeout, connector.connect(name, io)).await {
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

    /// The upstream connection, ready for a request; re-dials the pinned address if needed.
    async fn ready<'a>(
        &self,
        up: &'a mut Option<Connection>,
    ) -> Result<&'a mut Connection, (Reason, String)> {
        if let Some(mut conn) = up.take()
            && conn.sender.ready().await.is_ok()
        {
            return Ok(up.insert(conn));
        }
        let conn = self.dial().await?;
        Ok(up.insert(conn))
    }

    /// A new connection to the pinned address: TCP, verified TLS, HTTP.
    async fn dial(&self) -> Result<Connection, (Reason, String)> {
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
        attach(&self.flow, tls).await
    }
}

/// Starts HTTP on a verified upstream TLS connection: HTTP/2 when its ALPN chose `h2`, else
/// HTTP/1.1, driven by a task of its own.
async fn attach(
    flow: &Intercepted,
    tls: TlsStream<UpstreamIo>,
) -> Result<Connection, (Reason, String)> {
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
    Ok(Connection::new(
        flow.pool_key(),
        sender,
        driver,
        flow.generation,
    ))
}

impl Ctx {
    /// Sends `req` (HTTP/1.1 form) upstream and waits for the response head. A request the
    /// connection gives back unsent (it closed first, as an idle connection may just as it is
    /// reused) is sent once more, on a new connection: nothing of it left the proxy.
    async fn forward(
        &self,
        mut req: Request<UpBody>,
    ) -> Result<Response<Incoming>, (Reason, String)> {
        let wait = self.shared.limits.idle_timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut up = self.upstream.lock().await;
            let conn = self.ready(&mut up).await?;
            let sent = match &mut conn.sender {
                // HTTP/1.1: one request at a time, holding the connection.
                Sender::H1(sender) => timeout(wait, sender.try_send_request(req))
                    .await
                    .map(|r| Attempt::of(r, |req| req)),
                // HTTP/2: streams run side by side; the lock is released first.
                Sender::H2(sender) => {
                    let mut sender = sender.clone();
                    drop(up);
                    let req = to_h2(req, &self.flow.upstream_host)?;
                    timeout(wait, sender.try_send_request(req))
                        .await
                        .map(|r| Attempt::of(r, to_h1))
                }
            };
            match sent {
                Ok(Attempt::Answered(resp)) => return Ok(resp),
                Ok(Attempt::Unsent(unsent, _)) if attempts < 2 => req = unsent,
                Ok(Attempt::Unsent(_, e) | Attempt::Failed(e)) => {
                    return Err((Reason::UpstreamError, e.to_string()));
                }
                Err(_) => return Err((Reason::UpstreamError, "no response in time".into())),
            }
        }
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
        self.audit_reflected(
            head,
            status,
            reason,
            detail,
            secrets,
            bytes,
            Vec::new(),
            false,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_reflected(
        &self,
        head: &Head,
        status: StatusCode,
        reason: Option<Reason>,
        detail: Option<String>,
        secrets: Vec<String>,
        bytes: Option<(u64, u64)>,
        reflected: Vec<(String, u64)>,
        interim: bool,
    ) {
        self.shared.audit.emit_http(&HttpEvent {
            flow: &self.flow.info,
            rule: &self.flow.rule,
            upstream: self.flow.upstream_addr,
            request: head.request,
            method: &head.method,
            host: &self.flow.upstream_host,
            routed_from: self.flow.routed().then_some(self.flow.hostname.as_str()),
            path: &head.path,
            query: head.query,
            http_rule: head.http_rule.as_deref(),
            mcp: head.mcp.clone(),
            version: head.version,
            status: status.as_u16(),
            reason,
            detail,
            secrets,
            bytes,
            reflected,
            interim,
        });
    }

    /// Adds the secrets just `injected` (by name, from `secrets`, the set they were injected
    /// from) to the connection's, and returns what its responses are to be scanned for: every
    /// secret injected on it so far (a response can only reflect what was sent). `None` when
    /// nothing was, or scanning is off.
    fn scan_for(
        &self,
        injected: &[String],
        secrets: &Secrets,
    ) -> Result<Option<Arc<Patterns>>, reflect::BuildError> {
        if !self.shared.limits.scan_responses {
            return Ok(None);
        }
        let mut sent = match self.sent.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = sent.secrets.len();
        for name in injected {
            let Some((spec, value)) = secrets.iter().find(|(spec, _)| &spec.name == name) else {
                continue;
            };
            // A rotated value is a new secret: the old one may still come back.
            if !sent.secrets.iter().any(|(n, v, _)| n == name && v == value) {
                sent.secrets
                    .push((name.clone(), value.clone(), spec.placeholder.clone()));
            }
        }
        if sent.secrets.len() > before {
            let list: Vec<Injected<'_>> = sent
                .secrets
                .iter()
                .map(|(name, value, placeholder)| Injected {
                    name,
                    value: value.expose().as_bytes(),
                    placeholder: placeholder.as_bytes(),
                })
                .collect();
            match Patterns::new(&list) {
                Ok(p) => sent.patterns = Some(Arc::new(p)),
                Err(e) => {
                    sent.secrets.truncate(before);
                    return Err(e);
                }
            }
        }
        Ok(sent.patterns.clone())
    }

    /// Audits a secret found in a response (its first hit there; the request's record at the
    /// response's end counts them all). The hit was already replaced.
    fn reflected(&self, head: &Head, status: StatusCode, name: &str, place: Place) {
        self.shared
            .metrics
            .secrets_reflected
            .fetch_add(1, Ordering::Relaxed);
        let reason = Reason::SecretReflected;
        let detail = format!(
            "the upstream sent secret {name:?} back in the response {}; replaced by its \
             placeholder",
            place.as_str()
        );
        tracing::debug!(flow = %self.flow.info.uid, %reason, %detail, "secret reflected");
        self.audit_reflected(
            head,
            status,
            Some(reason),
            Some(detail),
            Vec::new(),
            None,
            vec![(name.to_owned(), 1)],
            // The alert, at once; the request's own record follows at the response's end.
            true,
        );
    }

    /// Audits a body aborted for a misplaced placeholder after the upstream had answered
    /// (`status` is what the agent was answered with; the body's rest was never sent).
    fn refused_late(&self, head: &Head, status: StatusCode, name: &str) {
        let reason = Reason::PlaceholderUnbound;
        let detail = format!(
            "placeholder of secret {name:?} in the body is not bound to this request; \
             found after the upstream answered, the rest of the body was not sent"
        );
        tracing::debug!(flow = %self.flow.info.uid, %reason, %detail, "request body refused");
        self.note(reason);
        self.audit(head, status, Some(reason), Some(detail), Vec::new(), None);
    }

    /// [`Self::refuse`] for a request whose body was not read: over HTTP/2 it is drained first
    /// ([`drain_h2`]), so the client reads the refusal rather than a stream reset.
    async fn refuse_unread(&self, head: &Head, r: Refusal, body: Incoming) -> Response<Body> {
        drain_h2(body, head.version).await;
        self.refuse(head, r)
    }

    /// A refused MCP request: audited like any refusal, answered with its JSON-RPC error when
    /// it has one (the MCP client shows that), else the text page.
    fn refuse_mcp(&self, head: &mut Head, r: McpRefusal) -> Response<Body> {
        head.mcp = r.note;
        let Some(json) = r.json else {
            return self.refuse(head, r.refusal);
        };
        let reason = r.refusal.reason.code();
        let mut resp = self.refuse(head, r.refusal);
        *resp.body_mut() = Full::new(Bytes::from(json)).map_err(|n| match n {}).boxed();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert("x-moat-refusal", http::HeaderValue::from_static(reason));
        resp
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
        let mut head = Head {
            request: self.counters.requests.fetch_add(1, Ordering::Relaxed) + 1,
            http_rule: None,
            mcp: None,
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().is_some(),
            version: match req.version() {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2",
                _ => "HTTP/1.1",
            },
        };
        // HTTP/1.1: one framing record per request, taken first whatever happens next.
        if req.version() != Version::HTTP_2 {
            let detail = match self.heads.next() {
                Framed::Clean => None,
                Framed::LengthAndChunked => Some("Content-Length together with Transfer-Encoding"),
                Framed::DuplicateLength => Some("Content-Length given more than once"),
                Framed::Lost => Some("the connection's request framing could not be followed"),
            };
            if let Some(detail) = detail {
                let r = Refusal {
                    status: StatusCode::BAD_REQUEST,
                    reason: Reason::AmbiguousFraming,
                    detail: detail.into(),
                };
                return self.refuse(&head, r);
            }
        }
        let (host, port) = (self.flow.hostname.as_str(), self.flow.port);
        let (mut parts, body) = req.into_parts();
        if let Err(r) = inject::check_authority(&parts.headers, &parts.uri, host, port) {
            return self.refuse_unread(&head, r, body).await;
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
            return self.refuse_unread(&head, r, body).await;
        }
        if let Some(method) = inject::reflecting_method(parts.method.as_str()) {
            let r = Refusal {
                status: StatusCode::NOT_IMPLEMENTED,
                reason: Reason::RequestRefused,
                detail: format!(
                    "{method} echoes the request, with the credentials the proxy would inject, \
                     back to the agent: not forwarded on intercepted flows"
                ),
            };
            return self.refuse_unread(&head, r, body).await;
        }
        // The HTTP rules of the rule that decides the flow under the policy in force now: a
        // reload applies from the next request. A flow it no longer intercepts is being cut;
        // its requests are refused meanwhile.
        let policy = self.shared.policy.current();
        let dest = moat_policy::Destination {
            hostname: Some(host),
            addr: self
                .flow
                .info
                .claimed
                .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.ip()),
            port,
        };
        let rule = match policy.decide(dest) {
            moat_policy::Decision::Allow(rule) if rule.action == moat_policy::Action::Intercept => {
                rule
            }
            _ => {
                let r = Refusal {
                    status: StatusCode::FORBIDDEN,
                    reason: Reason::HttpRuleDenied,
                    detail: "the policy in force no longer intercepts this flow".into(),
                };
                return self.refuse_unread(&head, r, body).await;
            }
        };
        if let Some(http) = &rule.http {
            match inject::check_http_rules(&mut parts.uri, parts.method.as_str(), &rule.name, http)
            {
                Ok(name) => head.http_rule = Some(name),
                Err((name, r)) => {
                    head.http_rule = name;
                    return self.refuse_unread(&head, r, body).await;
                }
            }
        }
        // MCP rules apply where the request is for the rule's MCP endpoint (mcp.rs).
        let endpoint = match mcp::endpoint(rule, &parts.method, &mut parts.uri) {
            Ok(e) => e,
            Err(r) => return self.refuse_unread(&head, r, body).await,
        };
        drop(policy);
        // From here on, names are the upstream's: a routed rule's secrets are bound to its
        // route (the provider), not to the in-workspace name.
        let routed = self.flow.routed();
        let (host, port) = (
            self.flow.upstream_host.as_str(),
            self.flow.upstream_addr.port(),
        );
        let secrets = self.shared.secrets();
        // Where a path prefix decides whether a secret is sent, the path is normalised once and
        // the upstream is sent that form: it then routes exactly the path the prefix matched.
        // A path with no normal form is refused rather than guessed at.
        if let Err(r) = inject::normalize_for_prefixes(&mut parts.uri, &secrets, host, port) {
            return self.refuse_unread(&head, r, body).await;
        }
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
            Err(r) => return self.refuse_unread(&head, r, body).await,
        };
        // The response is scanned for every secret injected on this connection so far; it
        // must come uncompressed to be (a compressed one is refused below).
        let scan = match self.scan_for(&injected, &secrets) {
            Ok(scan) => scan,
            Err(e) => {
                let r = Refusal {
                    status: StatusCode::BAD_GATEWAY,
                    reason: Reason::InterceptSetup,
                    detail: crate::error_chain(&e),
                };
                return self.refuse_unread(&head, r, body).await;
            }
        };
        if scan.is_some() {
            parts.headers.insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
        }
        let body: mcp::RequestBody = match &endpoint {
            None => body.map_err(super::BodyError::from).boxed_unsync(),
            Some(e) => match e
                .check_request(&parts.method, &mut parts.headers, body)
                .await
            {
                Ok((body, note)) => {
                    head.mcp = note;
                    body
                }
                Err(r) => return self.refuse_mcp(&mut head, r),
            },
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
                        let in_body = found.name();
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
        let sent = self.forward(Request::from_parts(parts, body)).await;
        // A placeholder found from here on (the upstream answered before the body was all
        // sent) aborts the rest of the body; it is audited as a refusal of its own.
        let late = {
            let (ctx, head) = (Arc::clone(&self), head.clone());
            let status = sent
                .as_ref()
                .map_or(StatusCode::BAD_GATEWAY, Response::status);
            Box::new(move |name: &str| ctx.refused_late(&head, status, name))
        };
        if let Some(name) = found.look_or_report_later(late) {
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
                let status = parts.status;
                let scan = match scan {
                    Some(patterns) => {
                        if encoded(&parts.headers) && !hyper::body::Body::is_end_stream(&body) {
                            let r = Refusal {
                                status: StatusCode::BAD_GATEWAY,
                                reason: Reason::ResponseEncoded,
                                detail: "the response is compressed (Content-Encoding), though \
                                         asked for identity, and cannot be scanned for the \
                                         secrets injected on this connection"
                                    .into(),
                            };
                            return self.refuse(&head, r);
                        }
                        let (ctx, head) = (Arc::clone(&self), head.clone());
                        let alert = move |name: &str, place: Place| {
                            ctx.reflected(&head, status, name, place);
                        };
                        let found = Arc::new(Reflections::new(&patterns, Box::new(alert)));
                        // The head first: nothing is sent before it is clean.
                        reflect::scan_headers(&patterns, &mut parts.headers, &found, Place::Head);
                        if let Some(phrase) = parts.extensions.remove::<hyper::ext::ReasonPhrase>()
                            && let Some(phrase) = reflect::scan_reason(&patterns, &phrase, &found)
                        {
                            parts.extensions.insert(phrase);
                        }
                        Some((patterns, found))
                    }
                    None => None,
                };
                let (body, seen) = match &endpoint {
                    None => (body.map_err(super::BodyError::from).boxed(), None),
                    Some(e) => match e.filter_response(&mut parts, body).await {
                        Ok((body, seen)) => (body, Some(seen)),
                        Err(r) => return self.refuse(&head, r),
                    },
                };
                let m = &self.shared.metrics;
                m.http_forwarded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                m.secrets_injected.fetch_add(
                    u64::try_from(injected.len()).unwrap_or(u64::MAX),
                    std::sync::atomic::Ordering::Relaxed,
                );
                // The record is written when the response body ends, with both byte counts and
                // the secrets it carried back.
                let ctx = Arc::clone(&self);
                let found = scan.as_ref().map(|(_, found)| Arc::clone(found));
                let done = move |received: u64| {
                    let out = body_out.load(Ordering::Relaxed);
                    let mut head = head;
                    let problem = seen.as_ref().and_then(|s| {
                        let hidden = s.hidden();
                        if !hidden.is_empty()
                            && let Some(note) = head.mcp.as_mut()
                        {
                            note["tools_hidden"] = serde_json::json!(hidden);
                        }
                        s.problem()
                    });
                    let reason = problem.as_ref().map(|_| Reason::McpResponseRefused);
                    if let Some(reason) = reason {
                        ctx.note(reason);
                    }
                    let reflected = found.map_or_else(Vec::new, |f| f.counts());
                    ctx.audit_reflected(
                        &head,
                        status,
                        reason,
                        problem,
                        injected,
                        Some((out, received)),
                        reflected,
                        false,
                    );
                };
                // The agent reads the answer as MCP rules left it, scanned last: whatever the
                // upstream or the filter wrote, no injected secret passes.
                let body = Audited {
                    inner: ReflectBody::new(body, scan).boxed(),
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

/// Most of a refused HTTP/2 request's body read before answering, and for how long.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// HTTP/2: reads and discards a refused request's body, a bounded amount for a bounded time,
/// before the refusal is sent. Dropped unread, the body's stream is reset (CANCEL) ahead of the
/// response, and clients such as curl then report a stream error instead of the 403 page.
/// HTTP/1.1 refusals close the connection instead.
async fn drain_h2(body: Incoming, version: &str) {
    if version != "HTTP/2" || hyper::body::Body::is_end_stream(&body) {
        return;
    }
    let limited = http_body_util::Limited::new(body, DRAIN_LIMIT);
    let _ = timeout(DRAIN_WAIT, limited.collect()).await;
}

/// What one attempt to send a request upstream came to.
enum Attempt {
    /// The response head arrived.
    Answered(Response<Incoming>),
    /// The connection gave the request back unsent (HTTP/1.1 form again).
    Unsent(Request<UpBody>, hyper::Error),
    /// It failed after (part of) the request was sent.
    Failed(hyper::Error),
}

impl Attempt {
    fn of(
        sent: Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpBody>>>,
        back: fn(Request<UpBody>) -> Request<UpBody>,
    ) -> Self {
        match sent {
            Ok(resp) => Attempt::Answered(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => Attempt::Unsent(back(req), e.into_error()),
                None => Attempt::Failed(e.into_error()),
            },
        }
    }
}

/// The HTTP/2 form of a request prepared for HTTP/1.1: its Host becomes the `:authority`.
fn to_h2(req: Request<UpBody>, host: &str) -> Result<Request<UpBody>, (Reason, String)> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .remove(http::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| host.to_owned());
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("https://{authority}{target}")
        .parse()
        .map_err(|_| (Reason::UpstreamError, "bad upstream URI".to_owned()))?;
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}

/// The HTTP/1.1 form of a request made by [`to_h2`].
fn to_h1(req: Request<UpBody>) -> Request<UpBody> {
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .and_then(|pq| pq.as_str().parse().ok())
        .unwrap_or_else(|| http::Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
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

/// Is the body compressed (any `Content-Encoding` but `identity`)?
fn encoded(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|c| {
                !c.trim_ascii().is_empty() && !c.trim_ascii().eq_ignore_ascii_case(b"identity")
            })
        })
}

/// A response body that counts its bytes and calls `done` once when it ends, fails or is
/// dropped (the agent went away).
struct Audited {
    inner: Body,
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
    type Error = super::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, super::BodyError>>> {
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
    /// The request's number on the flow, from 1.
    request: u64,
    method: String,
    path: String,
    query: bool,
    version: &'static str,
    /// The HTTP rule that decided the request, once one has (audited with it).
    http_rule: Option<String>,
    /// What MCP rules saw of the request (its messages and what decided them) and its answer.
    mcp: Option<serde_json::Value>,
}

/// Runs an admitted intercepted flow to its end. Returns the reason it ended and a detail.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    flow: Intercepted,
    agent: UnixStream,
    pending: Vec<u8>,
    upstream: Upstream,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> (Reason, Option<String>) {
    // 1. Upstream TLS first: an upstream that does not verify fails the agent's handshake. A
    //    pooled connection was verified for this very name and address when it was opened.
    let up = match upstream {
        Upstream::Pooled(conn) => {
            shared
                .metrics
                .upstream_reused
                .fetch_add(1, Ordering::Relaxed);
            conn
        }
        Upstream::Tcp(tcp) => {
            let tls = match tls_to_upstream(&shared, tcp, &flow.upstream_host).await {
                Ok(tls) => tls,
                Err(e) => return (Reason::UpstreamTls, Some(e)),
            };
            match attach(&flow, tls).await {
                Ok(conn) => conn,
                Err((reason, detail)) => return (reason, Some(detail)),
            }
        }
    };
    // 2. The agent's TLS, with a leaf for the flow's hostname (already equal to the SNI).
    let config = match shared.ca.server_config(&flow.hostname) {
        Ok(c) => c,
        Err(e) => return (Reason::InterceptSetup, Some(crate::error_chain(&e))),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let agent = BufReader::with_capacity(shared.limits.splice_buffer, agent);
    let agent = AgentIo::new(pending, agent, Arc::clone(&counters));
    let agent_tls = match timeout(shared.limits.sniff_timeout, acceptor.accept(agent)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return (Reason::AgentTls, Some(e.to_string())),
        Err(_) => return (Reason::AgentTls, Some("TLS handshake timed out".into())),
    };

    let ctx = Arc::new(Ctx {
        shared: Arc::clone(&shared),
        flow,
        upstream: tokio::sync::Mutex::new(Some(up)),
        first_problem: Mutex::new(None),
        heads: Arc::default(),
        sent: Mutex::default(),
        counters,
    });

    // 3. HTTP/1.1 to the agent, every request through Ctx::handle.
    let service_ctx = Arc::clone(&ctx);
    let service = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&service_ctx);
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let h2 = agent_tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let conn = async {
        if h2 {
            let io = TokioIo::new(agent_tls);
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(MAX_REQUEST_HEAD).unwrap_or(u32::MAX))
                .max_concurrent_streams(MAX_H2_STREAMS)
                .keep_alive_interval(None)
                .serve_connection(io, service)
                .await
        } else {
            let io = TokioIo::new(Followed::new(agent_tls, Arc::clone(&ctx.heads)));
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
    // The upstream connection goes back to the pool unless the flow was cut or the upstream
    // misbehaved; the pool takes it only if it is idle between messages and the policy it was
    // opened under is still in force.
    let revoked = matches!(ended, Some((Reason::Revoked, _)));
    let upstream_failed = problem.is_some_and(|r| r.blame() == Blame::Upstream);
    let conn = ctx.upstream.lock().await.take();
    if let Some(mut conn) = conn
        && !revoked
        && !upstream_failed
        && matches!(
            timeout(POOL_READY_WAIT, conn.sender.ready()).await,
            Ok(Ok(()))
        )
    {
        shared.pool.put(conn);
    }
    match (ended, problem) {
        (Some((Reason::Revoked, d)), _) => (Reason::Revoked, d),
        (_, Some(reason)) => (reason, None),
        (Some(end), None) => end,
        (None, None) => (Reason::Finished, None),
    }
}
