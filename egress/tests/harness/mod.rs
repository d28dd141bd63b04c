//! Test harness: a real proxy in-process, real TLS upstreams on loopback (rcgen test PKI),
//! and clients that speak the flow header like the guest's netstack.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod leak;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moat_egress::audit::Audit;
use moat_egress::policy_store::PolicySource;
use moat_egress::resolve::{ResolveFuture, Resolver, StaticResolver};
use moat_egress::{Config, Limits, Proxy};
use moat_flow_header::{FlowHeader, Hostname, Transport};
use moat_policy::signing;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

pub use self::leak::Tapped;

/// The guest's end of a flow stream (every byte it reads is captured for the secret scan).
pub type GuestStream = Tapped<UnixStream>;
/// A guest TLS connection through the proxy, captured above TLS.
pub type GuestTls = Tapped<tokio_rustls::client::TlsStream<UnixStream>>;

/// Names the test PKI's leaf certificate covers.
pub const CERT_NAMES: &[&str] = &[
    "allowed.test",
    "www.allowed.test",
    "other.test",
    "private.test",
    "api.inject.test",
    "other.inject.test",
    "curl.test",
];

/// The program the `curl-only` rule allows.
pub const CURL: &str = "/usr/bin/curl";

/// The real secret value the intercept tests bind to `api.inject.test`.
pub const SECRET_VALUE: &str = "sk-real-SECRET-4f9a1c";
/// Its placeholder, as the agent sees it.
pub const PLACEHOLDER: &str = "sk-moat-placeholder-api";

/// What the recording HTTPS upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub version: String,
    pub path: String,
    pub host: Option<String>,
    pub authorization: Vec<String>,
    pub x_api_key: Option<String>,
    pub body: Vec<u8>,
    /// The upstream connection it arrived on (numbered from 1 in accept order), and the SNI
    /// that connection's TLS session was opened with.
    pub conn: usize,
    pub sni: Option<String>,
}

impl Seen {
    /// The host the request named (Host, or the HTTP/2 `:authority`), without its port.
    pub fn named_host(&self) -> Option<String> {
        let authority = match &self.host {
            Some(h) => h.clone(),
            None => self
                .path
                .parse::<http::Uri>()
                .ok()?
                .authority()?
                .to_string(),
        };
        Some(
            authority
                .rsplit_once(':')
                .map_or(authority.clone(), |(h, _)| h.to_owned()),
        )
    }
}

pub type SeenLog = Arc<std::sync::Mutex<Vec<Seen>>>;

/// Every name a proxy asked its resolver for, in order.
pub type ResolvedLog = Arc<std::sync::Mutex<Vec<String>>>;

/// The test resolver: a [`StaticResolver`] that records every name it is asked for.
#[derive(Debug)]
pub struct RecordingResolver {
    inner: StaticResolver,
    asked: ResolvedLog,
}

impl Resolver for RecordingResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        self.asked.lock().unwrap().push(host.to_owned());
        self.inner.resolve(host)
    }
}

/// An HTTPS upstream (hyper + rustls, test PKI) that records every request it receives and
/// answers `200 ok <path>`.
pub async fn http_upstream(h2: bool) -> (SocketAddr, SeenLog) {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = pki();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.leaf_key.clone()));
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![p.leaf.clone()], key)
        .unwrap();
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen: SeenLog = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut accepted = 0;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            accepted += 1;
            let conn = accepted;
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (log, sni) = (Arc::clone(&log), sni.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            // `/reflect/...` echoes the request back (reflect.rs).
                            if parts.uri.path().starts_with("/reflect/") {
                                tokio::spawn(body.collect());
                                return Ok::<_, std::convert::Infallible>(reflect(&parts));
                            }
                            // `/early` answers at once and reads the body afterwards (an
                            // upstream refusing an upload before it is whole does this).
                            if parts.uri.path() == "/early" {
                                tokio::spawn(body.collect());
                                let resp = hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from("ok /early"))
                                        .boxed(),
                                );
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            // A body that fails (the proxy aborted it) is never a request.
                            let Ok(body) = body.collect().await.map(|b| b.to_bytes().to_vec())
                            else {
                                let mut bad = hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()).boxed(),
                                );
                                *bad.status_mut() = hyper::StatusCode::BAD_REQUEST;
                                return Ok::<_, std::convert::Infallible>(bad);
                            };
                            let h = |n: &str| {
                                parts
                                    .headers
                                    .get(n)
                                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                            };
                            log.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                version: format!("{:?}", parts.version),
                                path: parts.uri.to_string(),
                                host: h("host"),
                                authorization: parts
                                    .headers
                                    .get_all("authorization")
                                    .iter()
                                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                                    .collect(),
                                x_api_key: h("x-api-key"),
                                body,
                                conn,
                                sni,
                            });
                            let reply = format!("ok {}", parts.uri.path());
                            let mut resp = hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(reply)).boxed(),
                            );
                            // `/stream` sends one event now and the next after 3 s, like a
                            // model streaming server-sent events.
                            if parts.uri.path() == "/stream" {
                                let (mut tx, body) = http_body_util::Channel::new(2);
                                tokio::spawn(async move {
                                    let _ = tx.send_data(bytes::Bytes::from("data: 1\n\n")).await;
                                    tokio::time::sleep(Duration::from_secs(3)).await;
                                    let _ = tx.send_data(bytes::Bytes::from("data: 2\n\n")).await;
                                });
                                *resp.body_mut() = body.boxed();
                                resp.headers_mut()
                                    .insert("content-type", "text/event-stream".parse().unwrap());
                            }
                            // `/close` answers, then closes the connection.
                            if parts.uri.path() == "/close" {
                                resp.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                            }
                            // `/redirect` sends the client to the other intercepted host.
                            if parts.uri.path() == "/redirect" {
                                *resp.status_mut() = hyper::StatusCode::FOUND;
                                let to =
                                    format!("https://other.inject.test:{}/landed", addr.port());
                                resp.headers_mut().insert("location", to.parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    (addr, seen)
}

type EchoBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// The echo server's answers (the shapes of reflection tests/reflect.rs covers), from the
/// request's `authorization` header (the secret, once the proxy injected it):
/// - `/reflect/head`: the request head, as TRACE returns it;
/// - `/reflect/headers?escape=none|all`: httpbin's `/headers` JSON, each string character
///   written `\uXXXX` with `escape=all`;
/// - `/reflect/base64?k=N&url=1`: base64 (URL-safe with `url`) of N bytes then the value;
/// - `/reflect/percent?case=upper|lower`: every byte of the value percent-encoded, in the
///   body and in a `Location` and a `Set-Cookie` header, with the value in the reason phrase;
/// - `/reflect/split?n=N`: the request head in frames of N bytes, each sent on its own;
/// - `/reflect/sse`: server-sent events carrying the value, cut mid-value across frames;
/// - `/reflect/trailers`: the value in a trailer;
/// - `/reflect/gzip`: `Content-Encoding: gzip` (the body is not gzip: it must never be read).
fn reflect(parts: &http::request::Parts) -> hyper::Response<EchoBody> {
    use base64::Engine as _;
    use http_body_util::BodyExt;
    let auth = parts
        .headers
        .get("authorization")
        .map_or(String::new(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        });
    let value = auth.strip_prefix("Bearer ").unwrap_or(&auth).to_owned();
    let query: std::collections::HashMap<String, String> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let q = |k: &str| query.get(k).map_or("", String::as_str);
    let mut head = format!("{} {} {:?}\r\n", parts.method, parts.uri, parts.version);
    for (n, v) in &parts.headers {
        head.push_str(&format!(
            "{n}: {}\r\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    head.push_str("\r\n");
    let full = |b: String| http_body_util::Full::new(bytes::Bytes::from(b)).boxed();
    let streamed = |frames: Vec<String>, trailers: Option<http::HeaderMap>| {
        let (mut tx, body) = http_body_util::Channel::new(1);
        tokio::spawn(async move {
            for f in frames {
                let _ = tx.send_data(bytes::Bytes::from(f)).await;
                // Each frame on its own read at the proxy.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(t) = trailers {
                let _ = tx.send_trailers(t).await;
            }
        });
        body.boxed()
    };
    let mut resp = hyper::Response::new(full(String::new()));
    match parts.uri.path() {
        "/reflect/head" => *resp.body_mut() = full(head),
        "/reflect/headers" => {
            let esc = |t: &str| {
                if q("escape") == "all" {
                    t.chars().map(|c| format!("\\u{:04x}", c as u32)).collect()
                } else {
                    serde_json::to_string(t)
                        .unwrap()
                        .trim_matches('"')
                        .to_owned()
                }
            };
            let fields: Vec<String> = parts
                .headers
                .iter()
                .map(|(n, v)| {
                    format!(
                        "\"{}\":\"{}\"",
                        esc(n.as_str()),
                        esc(&String::from_utf8_lossy(v.as_bytes()))
                    )
                })
                .collect();
            *resp.body_mut() = full(format!("{{\"headers\":{{{}}}}}", fields.join(",")));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
        }
        "/reflect/base64" => {
            let k: usize = q("k").parse().unwrap_or(0);
            let plain = format!("{}{value}", "u:x".get(..k).unwrap_or(""));
            let encoded = if q("url") == "1" {
                base64::engine::general_purpose::URL_SAFE.encode(plain)
            } else {
                base64::engine::general_purpose::STANDARD.encode(plain)
            };
            *resp.body_mut() = full(format!("token={encoded}"));
        }
        "/reflect/percent" => {
            let pct: String = value
                .bytes()
                .map(|b| {
                    if q("case") == "lower" {
                        format!("%{b:02x}")
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let h = resp.headers_mut();
            h.insert("location", format!("/cb?token={pct}").parse().unwrap());
            h.insert(
                "set-cookie",
                format!("session={value}; Secure").parse().unwrap(),
            );
            resp.extensions_mut().insert(
                hyper::ext::ReasonPhrase::try_from(format!("OK {value}").into_bytes()).unwrap(),
            );
            *resp.body_mut() = full(format!("/cb?token={pct}"));
        }
        "/reflect/split" => {
            let n: usize = q("n").parse().unwrap_or(1).max(1);
            let frames = head
                .as_bytes()
                .chunks(n)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            *resp.body_mut() = streamed(frames, None);
        }
        "/reflect/sse" => {
            let event = format!("data: {{\"echo\":\"{value}\"}}\n\n");
            let (a, b) = event.split_at(event.len() / 2);
            let frames = vec![
                "data: start\n\n".into(),
                a.into(),
                b.into(),
                "data: end\n\n".into(),
            ];
            *resp.body_mut() = streamed(frames, None);
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
        }
        "/reflect/trailers" => {
            let mut t = http::HeaderMap::new();
            t.insert("x-echo", value.parse().unwrap());
            *resp.body_mut() = streamed(vec!["trailers follow".into()], Some(t));
        }
        "/reflect/gzip" => {
            resp.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            *resp.body_mut() = full(head);
        }
        _ => *resp.status_mut() = hyper::StatusCode::NOT_FOUND,
    }
    resp
}

/// Profile text for the intercept tests: two intercepted hosts on the recording upstream's
/// port, and one secret bound to the first.
pub fn intercept_rules(http: u16, secret_file: &Path) -> String {
    format!(
        r#"
[[rules]]
name = "api"
hosts = ["api.inject.test"]
ports = [{http}]
action = "intercept"
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "other-api"
hosts = ["other.inject.test"]
ports = [{http}]
action = "intercept"
cidrs = ["127.0.0.0/8"]

# Routed: a stable in-workspace name sent to a provider (here the recording upstream).
[[rules]]
name = "inference"
hosts = ["inference.local"]
ports = [443]
action = "intercept"
route = {{ host = "api.inject.test", port = {http}, model = "served-model" }}
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "models"
hosts = ["models.local"]
ports = [443]
action = "intercept"
route = {{ host = "other.inject.test", port = {http} }}
cidrs = ["127.0.0.0/8"]

[[secrets]]
name = "api-key"
source = {{ file = "{}" }}
placeholder = "{PLACEHOLDER}"
hosts = ["api.inject.test"]
ports = [{http}]
presentation = "authorization_bearer"
"#,
        secret_file.display()
    )
}

pub struct Pki {
    pub ca: CertificateDer<'static>,
    pub leaf: CertificateDer<'static>,
    pub leaf_key: Vec<u8>,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "moat test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = CERT_NAMES.iter().map(|s| (*s).to_owned()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            leaf_key: leaf_key.serialize_der(),
        }
    })
}

/// What an echo upstream received: every byte (above TLS), across its connections, and how
/// many connections it accepted.
#[derive(Debug, Default)]
pub struct Received {
    pub bytes: std::sync::Mutex<Vec<u8>>,
    pub connections: std::sync::atomic::AtomicUsize,
}

impl Received {
    /// Everything received so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An upstream on loopback: echoes every byte; on EOF from the client writes "bye\n" and
/// closes (so half-close is observable). TLS when `tls`.
pub async fn upstream(tls: bool) -> SocketAddr {
    upstream_recording(tls).await.0
}

/// As [`upstream`], recording what it receives.
pub async fn upstream_recording(tls: bool) -> (SocketAddr, Arc<Received>) {
    let received = Arc::new(Received::default());
    let log = Arc::clone(&received);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| {
        let p = pki();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.leaf_key.clone()));
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![p.leaf.clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            log.connections
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                match acceptor {
                    Some(acc) => {
                        if let Ok(s) = acc.accept(tcp).await {
                            echo(s, &log).await;
                        }
                    }
                    None => echo(tcp, &log).await,
                }
            });
        }
    });
    (addr, received)
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, log: &Received) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.write_all(b"bye\n").await;
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => {
                log.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A proxy under test, with its files.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub dir: tempfile::TempDir,
    pub uds: PathBuf,
    pub admin: PathBuf,
    pub audit_path: PathBuf,
    pub key_secret: String,
    pub profile: PathBuf,
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    /// What the plain (echo) upstream received.
    pub plain_received: Arc<Received>,
    /// The recording HTTPS upstream, and what it saw.
    pub http: SocketAddr,
    pub seen: SeenLog,
    /// The file the `api-key` secret is read from.
    pub secret_file: PathBuf,
    /// The names the proxy asked its resolver for.
    pub resolved: ResolvedLog,
    /// The audit was the test's own (not captured for the suite-wide scan).
    own_audit: bool,
}

/// The test profile. `{tls}` and `{plain}` are the upstreams' ports.
pub fn profile_text(tls: u16, plain: u16, extra: &str) -> String {
    format!(
        r#"version = 1
name = "test"

[[rules]]
name = "allowed"
hosts = ["allowed.test", "*.allowed.test"]
ports = [{tls}, {plain}]
action = "passthrough"
# Test upstreams live on loopback: this rule names that range explicitly.
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "public-only"
hosts = ["private.test", "mapped.test", "metadata.test", "cgnat.test"]
ports = [{tls}]
action = "passthrough"

[[rules]]
name = "raw"
hosts = ["raw.test"]
ports = [{plain}]
action = "passthrough"
protocols = ["tcp"]
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "curl-only"
hosts = ["curl.test"]
ports = [{tls}, {plain}]
action = "passthrough"
cidrs = ["127.0.0.0/8"]
programs = ["/usr/bin/curl"]

[[rules]]
name = "loopback-literal"
ports = [{plain}]
action = "passthrough"
protocols = ["tcp"]
cidrs = ["127.0.0.2/32"]
{extra}"#
    )
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestProxy {
        Self::start_full(limits, vec![pki().ca.clone()], false, true).await
    }

    /// A proxy that reloads only on SIGHUP (or an explicit `reload`), not on file changes.
    pub async fn start_unwatched() -> TestProxy {
        Self::start_full(Limits::default(), vec![pki().ca.clone()], false, false).await
    }

    /// A proxy whose intercepted upstreams are verified against `upstream_roots` (plus the
    /// webpki roots), with an HTTP/2-only recording upstream if `h2_upstream`, watching its
    /// policy files if `watch`.
    pub async fn start_full(
        limits: Limits,
        upstream_roots: Vec<CertificateDer<'static>>,
        h2_upstream: bool,
        watch: bool,
    ) -> TestProxy {
        Self::start_inner(limits, upstream_roots, h2_upstream, watch, None, "", None).await
    }

    /// A proxy writing its records to `audit` instead of `audit_path` (which stays empty).
    pub async fn start_with_audit(limits: Limits, audit: Audit) -> TestProxy {
        Self::start_inner(
            limits,
            vec![pki().ca.clone()],
            false,
            true,
            None,
            "",
            Some(audit),
        )
        .await
    }

    /// A proxy whose profile also holds `extra` rules, sending corporate flows to
    /// `corporate_uds`, reloading only when told to (so a reload's count of cut flows is
    /// exact).
    pub async fn start_corporate(corporate_uds: Option<PathBuf>, extra: &str) -> TestProxy {
        Self::start_inner(
            Limits::default(),
            vec![pki().ca.clone()],
            false,
            false,
            corporate_uds,
            extra,
            None,
        )
        .await
    }

    async fn start_inner(
        limits: Limits,
        upstream_roots: Vec<CertificateDer<'static>>,
        h2_upstream: bool,
        watch: bool,
        corporate_uds: Option<PathBuf>,
        extra: &str,
        audit: Option<Audit>,
    ) -> TestProxy {
        let tls = upstream(true).await;
        let (plain, plain_received) = upstream_recording(false).await;
        let (http, seen) = http_upstream(h2_upstream).await;
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("api-key");
        std::fs::write(&secret_file, format!("{SECRET_VALUE}\n")).unwrap();
        let key = signing::generate("").unwrap();
        let pubkey = dir.path().join("policy.pub");
        std::fs::write(&pubkey, &key.public).unwrap();
        let profile = dir.path().join("profile.toml");
        let text = profile_text(
            tls.port(),
            plain.port(),
            &format!("{}{extra}", intercept_rules(http.port(), &secret_file)),
        );
        write_signed(&profile, &text, &key.secret);
        let mut resolver = StaticResolver::new();
        for name in [
            "allowed.test",
            "www.allowed.test",
            "other.test",
            "raw.test",
            "api.inject.test",
            "other.inject.test",
            "curl.test",
        ] {
            resolver.insert(name, "127.0.0.1".parse().unwrap()).unwrap();
        }
        resolver
            .insert("private.test", "127.0.0.1".parse().unwrap())
            .unwrap();
        resolver
            .insert("mapped.test", "::ffff:127.0.0.1".parse().unwrap())
            .unwrap();
        resolver
            .insert("metadata.test", "169.254.169.254".parse().unwrap())
            .unwrap();
        resolver
            .insert("cgnat.test", "100.64.1.1".parse().unwrap())
            .unwrap();
        let resolved = ResolvedLog::default();
        let resolver = RecordingResolver {
            inner: resolver,
            asked: Arc::clone(&resolved),
        };
        let audit_path = dir.path().join("audit.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&audit_path)
            .unwrap();
        let own_audit = audit.is_some();
        let audit =
            audit.unwrap_or_else(|| Audit::to_writer(Box::new(leak::TeeAudit(file)), "test-ws"));
        let uds = dir.path().join("v.sock");
        let admin = dir.path().join("admin.sock");
        let config = Config {
            workspace: "test-ws".into(),
            uds: uds.clone(),
            port: moat_egress::EGRESS_VSOCK_PORT,
            admin: Some(admin.clone()),
            source: PolicySource::new(&profile, &pubkey).unwrap(),
            watch,
            limits,
            upstream_roots,
            corporate_uds,
        };
        let proxy = Proxy::start(config, Box::new(resolver), audit).unwrap();
        TestProxy {
            proxy,
            dir,
            uds,
            admin,
            audit_path,
            key_secret: key.secret,
            profile,
            tls,
            plain,
            plain_received,
            http,
            seen,
            secret_file,
            resolved,
            own_audit,
        }
    }

    /// The profile text this proxy started with, plus `extra`.
    pub fn profile_with(&self, extra: &str) -> String {
        profile_text(
            self.tls.port(),
            self.plain.port(),
            &format!(
                "{}{extra}",
                intercept_rules(self.http.port(), &self.secret_file)
            ),
        )
    }

    /// A TLS connection to `host` on the recording upstream's port, through the proxy, from a
    /// client that trusts only the workspace CA (as the guest does once guest-init installed it).
    pub async fn intercepted(&self, host: &str) -> std::io::Result<GuestTls> {
        self.intercepted_alpn(host, &[b"http/1.1"]).await
    }

    /// As [`Self::intercepted`], offering `alpn`.
    pub async fn intercepted_alpn(&self, host: &str, alpn: &[&[u8]]) -> std::io::Result<GuestTls> {
        self.intercepted_at(host, self.http.port(), alpn).await
    }

    /// As [`Self::intercepted`], to `port`, offering `alpn`.
    pub async fn intercepted_at(
        &self,
        host: &str,
        port: u16,
        alpn: &[&[u8]],
    ) -> std::io::Result<GuestTls> {
        // The TLS bytes themselves are not captured; what the guest reads above TLS is.
        let stream = self.named(host, port).await.0;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.proxy.ca_der()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name(host), stream)
            .await
            .map(Tapped)
    }

    /// What the recording upstream has seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Opens a flow stream and writes a header for `host` (or an IP literal) and `port`.
    pub async fn flow(&self, host: Option<&str>, addr: IpAddr, port: u16) -> GuestStream {
        self.flow_from(host, addr, port, None).await
    }

    /// A named flow whose header (version 2) says `program` opened it, as guest-init would.
    pub async fn named_from(&self, host: &str, port: u16, program: &str) -> GuestStream {
        let program = moat_flow_header::Program::new(
            4242,
            moat_flow_header::ProgramPath::new(program).unwrap(),
            Some([0x5a; 32]),
        );
        self.flow_from(
            Some(host),
            "198.18.0.5".parse().unwrap(),
            port,
            Some(program),
        )
        .await
    }

    /// [`TestProxy::flow`], its header naming `program` (version 2) if given.
    pub async fn flow_from(
        &self,
        host: Option<&str>,
        addr: IpAddr,
        port: u16,
        program: Option<moat_flow_header::Program>,
    ) -> GuestStream {
        let mut s = UnixStream::connect(self.proxy.listen_path()).await.unwrap();
        let header = FlowHeader {
            flow_id: 7,
            transport: Transport::Tcp,
            destination: SocketAddr::new(addr, port),
            hostname: host.map(|h| Hostname::new(h).unwrap()),
            program,
        };
        s.write_all(&header.encode()).await.unwrap();
        Tapped(s)
    }

    /// A named flow, with a fake guest address as the netstack would claim.
    pub async fn named(&self, host: &str, port: u16) -> GuestStream {
        self.flow(Some(host), "198.18.0.5".parse().unwrap(), port)
            .await
    }

    /// Rewrites and re-signs the profile with `extra` rules appended (or replaced `text`).
    pub fn rewrite_profile(&self, text: &str) {
        write_signed(&self.profile, text, &self.key_secret);
    }

    /// Waits until the audit log holds a record matching `pred`, and returns it.
    pub async fn wait_record(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            if let Some(r) = self.records().into_iter().find(|r| pred(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "no matching audit record; log:\n{}",
            std::fs::read_to_string(&self.audit_path).unwrap_or_default()
        );
    }

    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the refusal record with `reason` and returns it.
    pub async fn refused(&self, reason: &str) -> Value {
        self.wait_record(|r| r["unmapped"]["moat"]["reason"] == reason && r["activity_id"] == 5)
            .await
    }

    /// GET a path from the admin socket.
    pub async fn admin_get(&self, path: &str) -> String {
        let mut s = UnixStream::connect(&self.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

impl Drop for TestProxy {
    /// The suite-wide scan, over everything every test of this binary captured so far (by a
    /// proxy whose audit the harness captures: a test's own audit is not); and the audit
    /// invariants over this proxy's log.
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.own_audit {
            leak::assert_no_leak();
            let active = self
                .proxy
                .metrics()
                .active
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_audit_invariants(&self.records(), active);
        }
    }
}

pub fn write_signed(profile: &Path, text: &str, secret: &str) {
    let sig = signing::sign(text.as_bytes(), secret, "").unwrap();
    let mut sig_path = profile.as_os_str().to_owned();
    sig_path.push(".minisig");
    // Signature first, then the profile: either order must end with the new policy in force.
    std::fs::write(&sig_path, sig).unwrap();
    std::fs::write(profile, text).unwrap();
}

/// A TLS client over the flow stream that trusts the test CA and sends `sni` (none for an IP).
pub async fn tls_client(
    stream: GuestStream,
    sni: ServerName<'static>,
) -> std::io::Result<GuestTls> {
    let stream = stream.0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni, stream)
        .await
        .map(Tapped)
}

pub fn name(s: &str) -> ServerName<'static> {
    ServerName::try_from(s.to_owned()).unwrap()
}

/// Reads until EOF or error, with a timeout; returns what was read.
pub async fn read_all<R: tokio::io::AsyncRead + Unpin>(r: &mut R, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, r.read_to_end(&mut out)).await;
    out
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The published OCSF validator over an audit log (one helper for every test crate).
#[allow(unused_imports)]
pub use moat_audit::testing::validate_ocsf;

/// The audit invariants every test's log must hold (checked for every proxy the harness
/// captures, when it is dropped): every flow ends in exactly one terminal record (one Refuse
/// or Fail and nothing else, or an Open and then one Close), except the flows still spliced
/// (`active`), which have their Open and no terminal record yet; every intercepted flow's Close
/// says how many requests it carried, and its HTTP Activity records are numbered exactly 1 to
/// that many (one record per request, besides the interim alerts of reflected secrets, each
/// for a request that has its own); no HTTP record belongs to a flow that never opened.
pub fn assert_audit_invariants(records: &[Value], active: i64) {
    use std::collections::BTreeMap;
    #[derive(Default, Debug)]
    struct Flow {
        open: u32,
        close: u32,
        refuse_or_fail: u32,
        requests: Option<u64>,
        http: Vec<u64>,
        interim: Vec<u64>,
        messages: Vec<String>,
        first_terminal: Option<usize>,
        open_at: Option<usize>,
    }
    let mut flows: BTreeMap<String, Flow> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        match r["class_uid"].as_u64() {
            Some(4001) => {
                // A summary stands for flows the rate limit held back: no uid of theirs.
                if r.get("count").is_some() {
                    continue;
                }
                let uid = r["metadata"]["uid"].as_str().unwrap().to_owned();
                let f = flows.entry(uid).or_default();
                match r["activity_id"].as_u64().unwrap() {
                    1 => {
                        f.open += 1;
                        f.open_at = Some(i);
                    }
                    2 => {
                        f.close += 1;
                        f.requests = r["unmapped"]["moat"]["requests"].as_u64();
                    }
                    4 | 5 => f.refuse_or_fail += 1,
                    other => panic!("record {i}: unexpected Network Activity {other}: {r}"),
                }
                if matches!(r["activity_id"].as_u64(), Some(2 | 4 | 5)) {
                    f.first_terminal.get_or_insert(i);
                }
            }
            Some(4002) => {
                let uid = r["unmapped"]["moat"]["flow_uid"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let n = r["unmapped"]["moat"]["request"].as_u64().unwrap();
                let f = flows.entry(uid).or_default();
                // An interim record (a reflected secret's alert) precedes its request's own.
                if r["unmapped"]["moat"]["interim"] == true {
                    f.interim.push(n);
                    continue;
                }
                f.http.push(n);
                f.messages
                    .push(r["message"].as_str().unwrap_or_default().to_owned());
            }
            _ => {}
        }
    }
    let mut still_open = 0;
    for (uid, f) in &flows {
        let terminal = f.close + f.refuse_or_fail;
        assert!(
            terminal <= 1,
            "flow {uid}: {terminal} terminal records: {f:?}"
        );
        assert!(f.open <= 1, "flow {uid}: {} Open records", f.open);
        if f.refuse_or_fail == 1 {
            assert_eq!(f.open, 0, "flow {uid}: refused or failed after it opened");
            assert!(
                f.http.is_empty(),
                "flow {uid}: HTTP records on a flow never opened"
            );
        }
        if f.close == 1 {
            assert_eq!(f.open, 1, "flow {uid}: closed without an Open record");
            assert!(
                f.open_at < f.first_terminal,
                "flow {uid}: Close before Open"
            );
        }
        if f.open == 1 && terminal == 0 {
            still_open += 1;
        }
        if f.open == 0 {
            assert!(
                f.http.is_empty(),
                "flow {uid}: HTTP records without an Open"
            );
        }
        if let Some(n) = f.requests {
            let mut got = f.http.clone();
            got.sort_unstable();
            assert_eq!(
                got,
                (1..=n).collect::<Vec<_>>(),
                "flow {uid}: its Close counts {n} requests; its HTTP records are numbered {:?}: {:#?}",
                f.http,
                f.messages
            );
        }
        for n in &f.interim {
            assert!(
                f.http.contains(n),
                "flow {uid}: an interim record of request {n}, which has no record of its own"
            );
        }
    }
    assert_eq!(
        still_open, active,
        "flows with an Open and no terminal record, against the flows the proxy still splices"
    );
}
