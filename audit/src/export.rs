//! OTLP export: every record written to the log is also sent, as an OpenTelemetry log record
//! (the OCSF JSON as its body; class, workspace, rule and reason as attributes), to an OTLP/HTTP
//! endpoint (protobuf, `POST <endpoint>/v1/logs`), batched.
//!
//! Never in a flow's way: [`Exporter::offer`] only tries to put the record in a bounded queue;
//! a full queue drops it from the export (counted) and it stays in the local log, which is the
//! record of truth. A thread of its own sends batches, retrying a failed one with backoff; a
//! batch that still fails is counted as not sent, and stays in the local log too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::log::Export;

/// How the exporter batches, queues and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Records waiting to be sent at most; past this, records are not exported (they stay in
    /// the local log).
    pub queue: usize,
    /// Records per request at most.
    pub batch: usize,
    /// How long a batch waits to fill before it is sent anyway.
    pub linger: Duration,
    /// Attempts per batch (the first included).
    pub attempts: u32,
    /// The wait before the first retry, doubled at each (at most 5 s).
    pub backoff: Duration,
    /// One request's time limit.
    pub timeout: Duration,
}

impl Default for ExportLimits {
    fn default() -> Self {
        ExportLimits {
            queue: 8192,
            batch: 512,
            linger: Duration::from_millis(200),
            attempts: 5,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why an exporter could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint is not `http://host:port[/path]`.
    #[error(
        "OTLP endpoint {0:?} is not an http:// URL with a host (https: send to a local collector)"
    )]
    Endpoint(String),
    /// Its thread could not be started.
    #[error("cannot start the OTLP exporter")]
    Start(#[source] std::io::Error),
}

/// What the exporter did, so far.
#[derive(Debug, Default)]
pub struct ExportCounts {
    /// Records the endpoint accepted.
    pub sent: AtomicU64,
    /// Records not exported: the queue was full, or their batch failed every attempt.
    pub not_sent: AtomicU64,
    /// Requests that failed (each retry counts).
    pub failed_requests: AtomicU64,
}

/// The exporter: the queue's sending end.
#[derive(Debug)]
pub struct Exporter {
    /// Taken by [`Export::close`], which ends the queue.
    tx: std::sync::Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Answers once the sending thread has sent everything queued and ended.
    done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    counts: Arc<ExportCounts>,
}

impl Export for Exporter {
    fn offer(&self, line: &[u8]) {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tx
            .as_ref()
            .is_none_or(|tx| tx.try_send(line.to_vec()).is_err())
        {
            self.counts.not_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn close(&self, wait: Duration) {
        // Ending the queue lets the thread send what is in it, then end.
        drop(
            self.tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let _ = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv_timeout(wait);
    }
}

impl Exporter {
    /// Starts exporting to `endpoint` (OTLP/HTTP; `/v1/logs` is added unless the URL has a
    /// path) as `service` (the resource's `service.name`).
    pub fn start(
        endpoint: &str,
        service: &str,
        limits: ExportLimits,
    ) -> Result<Exporter, ExportError> {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| ExportError::Endpoint(endpoint.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(ExportError::Endpoint(endpoint.to_owned()));
        }
        let uri = if uri.path() == "/" || uri.path().is_empty() {
            format!("{}/v1/logs", endpoint.trim_end_matches('/'))
                .parse()
                .map_err(|_| ExportError::Endpoint(endpoint.to_owned()))?
        } else {
            uri
        };
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let counts = Arc::new(ExportCounts::default());
        let sender = Sender {
            uri,
            service: service.to_owned(),
            limits,
            counts: Arc::clone(&counts),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ExportError::Start)?;
        let (finished, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("moat-otlp".into())
            .spawn(move || {
                rt.block_on(sender.run(rx));
                let _ = finished.send(());
            })
            .map_err(ExportError::Start)?;
        Ok(Exporter {
            tx: std::sync::Mutex::new(Some(tx)),
            done: std::sync::Mutex::new(done),
            counts,
        })
    }

    /// Its counts (shared: they go on changing).
    pub fn counts(&self) -> Arc<ExportCounts> {
        Arc::clone(&self.counts)
    }
}

struct Sender {
    uri: http::Uri,
    service: String,
    limits: ExportLimits,
    counts: Arc<ExportCounts>,
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>) {
        let mut batch = Vec::with_capacity(self.limits.batch);
        // The writer wrote these lines itself: one that does not parse is not possible, and
        // would only be left out of the export (it is in the local log).
        let parse = |line: Vec<u8>| parse_line(line);
        loop {
            // The first record waits as long as it takes; the rest of the batch `linger`.
            match rx.recv().await {
                Some(line) => batch.extend(parse(line)),
                None => return,
            }
            let deadline = tokio::time::Instant::now() + self.limits.linger;
            while batch.len() < self.limits.batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(line)) => batch.extend(parse(line)),
                    Ok(None) | Err(_) => break,
                }
            }
            self.send(&batch).await;
            batch.clear();
        }
    }

    /// Sends one batch, retrying with backoff; counts what was sent or not.
    async fn send(&self, batch: &[(Value, String)]) {
        let body = bytes::Bytes::from(self.request(batch).encode_to_vec());
        let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
        let mut wait = self.limits.backoff;
        for attempt in 1..=self.limits.attempts.max(1) {
            match tokio::time::timeout(self.limits.timeout, self.post(body.clone())).await {
                Ok(Ok(())) => {
                    self.counts.sent.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(attempt, error = %e, "OTLP export failed");
                }
                Err(_) => tracing::debug!(attempt, "OTLP export timed out"),
            }
            self.counts.failed_requests.fetch_add(1, Ordering::Relaxed);
            if attempt < self.limits.attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
        tracing::warn!(
            records = n,
            "OTLP export gave up on a batch; the records stay in the local audit log"
        );
        self.counts.not_sent.fetch_add(n, Ordering::Relaxed);
    }

    async fn post(&self, body: bytes::Bytes) -> Result<(), String> {
        let host = self.uri.host().unwrap_or("localhost");
        let port = self.uri.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let authority = self
            .uri
            .authority()
            .map_or_else(|| host.to_owned(), ToString::to_string);
        let req = http::Request::post(self.uri.path())
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(http_body_util::Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("endpoint answered {}", resp.status()))
        }
    }

    fn request(&self, batch: &[(Value, String)]) -> ExportLogsServiceRequest {
        request(&self.service, batch)
    }
}

/// A written line, parsed for its attributes and kept as the body (without its newline).
pub fn parse_line(mut line: Vec<u8>) -> Option<(Value, String)> {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let value = serde_json::from_slice(&line).ok()?;
    Some((value, String::from_utf8(line).ok()?))
}

/// The OTLP request for `batch` (from [`parse_line`]), as `service`, encoded (protobuf): what
/// one POST carries.
pub fn encode(service: &str, batch: &[(Value, String)]) -> Vec<u8> {
    request(service, batch).encode_to_vec()
}

fn request(service: &str, batch: &[(Value, String)]) -> ExportLogsServiceRequest {
    {
        let records = batch
            .iter()
            .map(|(rec, line)| log_record(rec, line))
            .collect();
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", string(service))],
                    ..Resource::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "moat-audit".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    log_records: records,
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        }
    }
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

fn int(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..KeyValue::default()
    }
}

/// OpenTelemetry's severity number for an OCSF severity_id (1 Informational: INFO, 2 Low:
/// INFO2, 3 Medium: WARN, 4 High: ERROR, 5 Critical: FATAL).
fn severity_number(ocsf: u64) -> i32 {
    match ocsf {
        1 => 9,
        2 => 10,
        3 => 13,
        4 => 17,
        5 | 6 => 21,
        _ => 0,
    }
}

/// One audit record (and its line, the body) as an OpenTelemetry log record.
fn log_record(rec: &Value, line: &str) -> LogRecord {
    let s = |p: &str| rec.pointer(p).and_then(Value::as_str);
    let mut attributes = Vec::new();
    if let Some(class) = rec["class_uid"].as_i64() {
        attributes.push(kv("ocsf.class_uid", int(class)));
    }
    for (key, pointer) in [
        ("ocsf.class_name", "/class_name"),
        ("ocsf.activity_name", "/activity_name"),
        ("moat.rule", "/firewall_rule/name"),
        ("moat.reason", "/unmapped/moat/reason"),
        ("moat.hash", "/unmapped/moat/hash"),
    ] {
        if let Some(v) = s(pointer) {
            attributes.push(kv(key, string(v)));
        }
    }
    // The workspace: a flow's source, a process event's device, a broker record's service.
    if let Some(ws) = s("/src_endpoint/uid")
        .or_else(|| s("/device/uid"))
        .or_else(|| s("/service/uid"))
    {
        attributes.push(kv("moat.workspace", string(ws)));
    }
    if let Some(seq) = rec.pointer("/unmapped/moat/seq").and_then(Value::as_i64) {
        attributes.push(kv("moat.seq", int(seq)));
    }
    let millis = rec["time"].as_u64().unwrap_or(0);
    LogRecord {
        time_unix_nano: millis.saturating_mul(1_000_000),
        observed_time_unix_nano: crate::ocsf::now_millis().saturating_mul(1_000_000),
        severity_number: severity_number(rec["severity_id"].as_u64().unwrap_or(0)),
        severity_text: s("/severity").unwrap_or_default().to_owned(),
        body: Some(string(line)),
        attributes,
        ..LogRecord::default()
    }
}
