//! Audit: one OCSF Network Activity (class 4001) record per flow event, and one OCSF HTTP
//! Activity (class 4002) record per intercepted request, as JSON Lines.
//!
//! Every flow produces either one `Refuse`/`Fail` record, or an `Open` record followed by a
//! `Close` record with bytes and duration. Records carry names, addresses, ports, the deciding
//! rule, its action (and, for a corporate flow, the service asked of the broker) and the reason;
//! never payload bytes, so never a secret. HTTP records carry the method,
//! host, path (the query is redacted), status and the *names* of the secrets injected; never a
//! header value.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_policy::Action;
use serde_json::{Value, json};

use crate::outcome::Reason;

/// OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.8.0";

/// OCSF Network Activity activities we emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// The flow was allowed and connected upstream.
    Open,
    /// An opened flow ended.
    Close,
    /// The flow was refused by policy or by a protocol check.
    Refuse,
    /// The flow was allowed but could not be connected.
    Fail,
}

impl Activity {
    fn id(self) -> u32 {
        match self {
            Activity::Open => 1,
            Activity::Close => 2,
            Activity::Fail => 4,
            Activity::Refuse => 5,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Activity::Open => "Open",
            Activity::Close => "Close",
            Activity::Fail => "Fail",
            Activity::Refuse => "Refuse",
        }
    }
}

/// What is known about a flow when a record is written.
#[derive(Debug, Clone, Default)]
pub struct FlowInfo {
    /// Unique id of this flow in the proxy's lifetime (`<workspace>-<n>`).
    pub uid: String,
    /// The guest's flow id from the header, once read.
    pub guest_flow_id: Option<u64>,
    /// The normalised hostname from the header.
    pub hostname: Option<String>,
    /// The destination the guest claimed.
    pub claimed: Option<SocketAddr>,
    /// When the flow arrived.
    pub started: Option<SystemTime>,
}

/// One record's variable part.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// The OCSF activity.
    pub activity: Activity,
    /// The flow.
    pub flow: &'a FlowInfo,
    /// The rule that allowed it, if any did.
    pub rule: Option<&'a str>,
    /// That rule's action.
    pub action: Option<Action>,
    /// The corporate service the flow was sent to through the broker (corporate rules only).
    pub service: Option<&'a str>,
    /// The upstream address connected to (none for corporate flows: the broker connects).
    pub upstream: Option<SocketAddr>,
    /// Why it was refused, failed or closed.
    pub reason: Option<Reason>,
    /// Human-readable detail (never payload).
    pub detail: Option<String>,
    /// Bytes agent -> upstream and upstream -> agent (Close only).
    pub bytes: Option<(u64, u64)>,
    /// Whether the flow was allowed at the time of this record.
    pub allowed: bool,
}

/// The audit sink: JSON Lines to a file or stdout, one `write` per record.
pub struct Audit {
    out: Mutex<Box<dyn Write + Send>>,
    workspace: String,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_millis() -> u64 {
    millis(SystemTime::now())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Audit {
    /// Appends to `path`, creating it (mode 0600) if needed.
    pub fn to_file(path: &Path, workspace: &str) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self::to_writer(Box::new(file), workspace))
    }

    /// Writes to any writer (stdout, a test buffer).
    pub fn to_writer(out: Box<dyn Write + Send>, workspace: &str) -> Self {
        Audit {
            out: Mutex::new(out),
            workspace: workspace.to_owned(),
        }
    }

    /// Builds the OCSF record for `event`.
    pub fn record(&self, event: &Event<'_>) -> Value {
        let now = SystemTime::now();
        let f = event.flow;
        let (action_id, action, disposition_id, disposition) = if event.allowed {
            (1, "Allowed", 1, "Allowed")
        } else {
            (2, "Denied", 2, "Blocked")
        };
        let failed = matches!(event.activity, Activity::Refuse | Activity::Fail)
            || event.reason.is_some_and(|r| r != Reason::Finished);
        let (status_id, status) = if failed {
            (2, "Failure")
        } else {
            (1, "Success")
        };
        let severity_id = match event.activity {
            Activity::Refuse => 3,
            Activity::Fail => 2,
            _ => 1,
        };
        let severity = match severity_id {
            3 => "Medium",
            2 => "Low",
            _ => "Informational",
        };
        let mut dst = serde_json::Map::new();
        if let Some(h) = &f.hostname {
            dst.insert("hostname".into(), json!(h));
        }
        if let Some(service) = event.service {
            dst.insert("svc_name".into(), json!(service));
        }
        match (event.upstream, f.claimed) {
            (Some(up), _) => {
                dst.insert("ip".into(), json!(up.ip().to_string()));
                dst.insert("port".into(), json!(up.port()));
            }
            (None, Some(claimed)) => {
                if f.hostname.is_none() {
                    dst.insert("ip".into(), json!(claimed.ip().to_string()));
                }
                dst.insert("port".into(), json!(claimed.port()));
            }
            (None, None) => {}
        }
        let mut rec = json!({
            "class_uid": 4001,
            "class_name": "Network Activity",
            "category_uid": 4,
            "category_name": "Network Activity",
            "activity_id": event.activity.id(),
            "activity_name": event.activity.name(),
            "type_uid": 400100 + event.activity.id(),
            "type_name": format!("Network Activity: {}", event.activity.name()),
            "severity_id": severity_id,
            "severity": severity,
            "time": millis(now),
            "status_id": status_id,
            "status": status,
            "action_id": action_id,
            "action": action,
            "disposition_id": disposition_id,
            "disposition": disposition,
            "metadata": {
                "version": OCSF_VERSION,
                "uid": f.uid,
                "log_name": "egress",
                // action, disposition and firewall_rule belong to this profile.
                "profiles": ["security_control"],
                "product": {
                    "name": "moat egress proxy",
                    "vendor_name": "moat",
                    "version": env!("CARGO_PKG_VERSION"),
                },
            },
            "src_endpoint": { "uid": self.workspace, "name": "workspace" },
            "dst_endpoint": Value::Object(dst),
            "connection_info": {
                "protocol_name": "tcp",
                "protocol_num": 6,
                "direction_id": 2,
                "direction": "Outbound",
            },
        });
        let mut unmapped = serde_json::Map::new();
        if let Some(id) = f.guest_flow_id {
            rec["connection_info"]["uid"] = json!(id.to_string());
            unmapped.insert("guest_flow_id".into(), json!(id));
        }
        if let Some(reason) = event.reason {
            rec["status_detail"] = json!(reason.code());
            unmapped.insert("reason".into(), json!(reason.code()));
            unmapped.insert("blame".into(), json!(reason.blame().as_str()));
        }
        if let Some(rule) = event.rule {
            rec["firewall_rule"] = json!({ "name": rule, "uid": rule });
        }
        if let Some(action) = event.action {
            unmapped.insert("policy_action".into(), json!(action.as_str()));
        }
        if let Some(claimed) = f.claimed {
            unmapped.insert("claimed_destination".into(), json!(claimed.to_string()));
        }
        rec["message"] = json!(message(event));
        if let (Some((up, down)), Some(start)) = (event.bytes, f.started) {
            rec["traffic"] = json!({ "bytes_out": up, "bytes_in": down, "bytes": up + down });
            let duration = now.duration_since(start).unwrap_or(Duration::ZERO);
            rec["start_time"] = json!(millis(start));
            rec["end_time"] = json!(millis(now));
            rec["duration"] = json!(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        }
        rec["unmapped"] = json!({ "moat": Value::Object(unmapped) });
        rec
    }

    /// The workspace these records are about.
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    /// Writes the record for `event`. Failures are logged, never propagated: audit must not
    /// be a way for a flow to crash the proxy.
    pub fn emit(&self, event: &Event<'_>) {
        self.emit_value(&self.record(event));
    }

    /// Writes one record, as one line in one write.
    pub fn emit_value(&self, record: &Value) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise audit record");
                return;
            }
        };
        line.push(b'\n');
        let mut out = match self.out.lock() {
            Ok(out) => out,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write audit record");
        }
    }
}

/// One intercepted request, for its OCSF HTTP Activity record.
#[derive(Debug, Clone)]
pub struct HttpEvent<'a> {
    /// The flow it travelled on.
    pub flow: &'a FlowInfo,
    /// The rule that allowed the flow.
    pub rule: &'a str,
    /// The upstream address the flow is pinned to.
    pub upstream: SocketAddr,
    /// The request method.
    pub method: &'a str,
    /// The upstream's hostname (the flow's, or a routed rule's route).
    pub host: &'a str,
    /// The in-workspace name the agent used, when a routed rule sent it elsewhere.
    pub routed_from: Option<&'a str>,
    /// The request path, without its query.
    pub path: &'a str,
    /// Whether the request had a query (its value is never recorded).
    pub query: bool,
    /// The HTTP version, e.g. `HTTP/1.1`.
    pub version: &'a str,
    /// The status sent to the agent.
    pub status: u16,
    /// Why the proxy refused or failed the request, if it did.
    pub reason: Option<Reason>,
    /// Human-readable detail (never a header value).
    pub detail: Option<String>,
    /// Names of the secrets injected into the request.
    pub secrets: Vec<String>,
    /// Body bytes agent -> upstream and upstream -> agent, once the response has ended.
    pub bytes: Option<(u64, u64)>,
}

fn http_activity(method: &str) -> (u32, &'static str) {
    match method {
        "CONNECT" => (1, "Connect"),
        "DELETE" => (2, "Delete"),
        "GET" => (3, "Get"),
        "HEAD" => (4, "Head"),
        "OPTIONS" => (5, "Options"),
        "POST" => (6, "Post"),
        "PUT" => (7, "Put"),
        "TRACE" => (8, "Trace"),
        "PATCH" => (9, "Patch"),
        _ => (99, "Other"),
    }
}

impl Audit {
    /// Builds the OCSF HTTP Activity (4002) record for `event`.
    pub fn http_record(&self, event: &HttpEvent<'_>) -> Value {
        let now = SystemTime::now();
        let f = event.flow;
        let (activity_id, activity) = http_activity(event.method);
        let refused = event
            .reason
            .is_some_and(|r| r.blame() == crate::outcome::Blame::Agent);
        let (action_id, action, disposition_id, disposition) = if refused {
            (2, "Denied", 2, "Blocked")
        } else {
            (1, "Allowed", 1, "Allowed")
        };
        let (status_id, status) = if event.reason.is_some() {
            (2, "Failure")
        } else {
            (1, "Success")
        };
        let (severity_id, severity) = if refused {
            (3, "Medium")
        } else if event.reason.is_some() {
            (2, "Low")
        } else {
            (1, "Informational")
        };
        let mut url = json!({
            "hostname": event.host,
            "path": event.path,
            "port": event.upstream.port(),
            "scheme": "https",
        });
        if event.query {
            url["query_string"] = json!("[redacted]");
        }
        let mut rec = json!({
            "class_uid": 4002,
            "class_name": "HTTP Activity",
            "category_uid": 4,
            "category_name": "Network Activity",
            "activity_id": activity_id,
            "activity_name": activity,
            "type_uid": 400200 + activity_id,
            "type_name": format!("HTTP Activity: {activity}"),
            "severity_id": severity_id,
            "severity": severity,
            "time": millis(now),
            "status_id": status_id,
            "status": status,
            "action_id": action_id,
            "action": action,
            "disposition_id": disposition_id,
            "disposition": disposition,
            "metadata": {
                "version": OCSF_VERSION,
                "uid": format!("{}-{}", f.uid, millis(now)),
                "correlation_uid": f.uid,
                "log_name": "egress",
                "profiles": ["security_control"],
                "product": {
                    "name": "moat egress proxy",
                    "vendor_name": "moat",
                    "version": env!("CARGO_PKG_VERSION"),
                },
            },
            "src_endpoint": { "uid": self.workspace, "name": "workspace" },
            "dst_endpoint": {
                "hostname": event.host,
                "ip": event.upstream.ip().to_string(),
                "port": event.upstream.port(),
            },
            "http_request": {
                "http_method": event.method,
                "url": url,
                "version": event.version,
            },
            "http_response": { "code": event.status },
            "firewall_rule": { "name": event.rule, "uid": event.rule },
        });
        let mut unmapped = serde_json::Map::new();
        unmapped.insert("flow_uid".into(), json!(f.uid));
        if !event.secrets.is_empty() {
            unmapped.insert("secrets_injected".into(), json!(event.secrets));
        }
        if let Some((out, inb)) = event.bytes {
            rec["traffic"] = json!({ "bytes_out": out, "bytes_in": inb, "bytes": out + inb });
        }
        if let Some(from) = event.routed_from {
            unmapped.insert("routed_from".into(), json!(from));
        }
        let reason = event.reason.map_or(String::new(), |r| format!(" ({r})"));
        if let Some(r) = event.reason {
            rec["status_detail"] = json!(r.code());
            unmapped.insert("reason".into(), json!(r.code()));
            unmapped.insert("blame".into(), json!(r.blame().as_str()));
        }
        let detail = event
            .detail
            .as_deref()
            .map_or(String::new(), |d| format!(": {d}"));
        let verb = if refused { "refused" } else { "forwarded" };
        rec["message"] = json!(format!(
            "{verb} {} https://{}{} -> {}{reason}{detail}",
            event.method, event.host, event.path, event.status
        ));
        rec["unmapped"] = json!({ "moat": Value::Object(unmapped) });
        rec
    }

    /// Writes the HTTP Activity record for `event`.
    pub fn emit_http(&self, event: &HttpEvent<'_>) {
        self.emit_value(&self.http_record(event));
    }
}

fn message(event: &Event<'_>) -> String {
    let f = event.flow;
    let dest = match (&f.hostname, f.claimed) {
        (Some(h), Some(c)) => format!("{h}:{}", c.port()),
        (None, Some(c)) => c.to_string(),
        (Some(h), None) => h.clone(),
        (None, None) => "unknown destination".into(),
    };
    let reason = event.reason.map_or(String::new(), |r| format!(" ({r})"));
    let detail = event
        .detail
        .as_deref()
        .map_or(String::new(), |d| format!(": {d}"));
    let dest = match event.service {
        Some(service) => format!("{dest} (corporate service {service})"),
        None => dest,
    };
    match event.activity {
        Activity::Open => format!("opened flow to {dest}"),
        Activity::Close => format!("closed flow to {dest}{reason}{detail}"),
        Activity::Refuse => format!("refused flow to {dest}{reason}{detail}"),
        Activity::Fail => format!("failed flow to {dest}{reason}{detail}"),
    }
}
