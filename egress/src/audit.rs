//! Audit: one OCSF Network Activity (class 4001) record per flow event, as JSON Lines.
//!
//! Every flow produces either one `Refuse`/`Fail` record, or an `Open` record followed by a
//! `Close` record with bytes and duration. Records carry names, addresses, ports, the deciding
//! rule and the reason; never payload bytes, so never a secret.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The upstream address connected to.
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
    match event.activity {
        Activity::Open => format!("opened flow to {dest}"),
        Activity::Close => format!("closed flow to {dest}{reason}"),
        Activity::Refuse => format!("refused flow to {dest}{reason}{detail}"),
        Activity::Fail => format!("failed flow to {dest}{reason}{detail}"),
    }
}
