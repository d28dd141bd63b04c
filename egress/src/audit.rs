//! Audit: one OCSF Network Activity (class 4001) record per flow event, and one OCSF HTTP
//! Activity (class 4002) record per intercepted request, as JSON Lines.
//!
//! Every flow produces either one `Refuse`/`Fail` record (or a share of a summary of them, see
//! below), or an `Open` record followed by a `Close` record with bytes and duration. Records carry names, addresses, ports, the deciding
//! rule, its action (and, for a corporate flow, the service asked of the broker) and the reason;
//! never payload bytes, so never a secret. HTTP records carry the method,
//! host, path (the query is redacted), status and the *names* of the secrets injected; never a
//! header value.
//!
//! Fail closed: a record that cannot be written (a full or failing disk) marks the audit
//! [`Audit::failing`]; while it is, the proxy refuses every new flow (`audit_unavailable`), and
//! a flow whose own Open record cannot be written is closed before a byte moves. Flows already
//! open run on. Each refused flow's record is a new attempt: the first one written clears the
//! state, and the flows after it are admitted again. A record cut short by the failure is ended
//! with a newline before the next one, so every later line still parses.
//!
//! Bounded: records of flows that never opened (Refuse and Fail) go through a token bucket per
//! workspace ([`RecordRate`]); what it holds back is counted by kind and reason and written as
//! one summary record per kind (OCSF `count`, `start_time`, `end_time`) at most a second later
//! ([`Audit::flush_suppressed`]) and at shutdown. Open and Close records are never held back:
//! they are the account of bytes that moved, and the flow cap already bounds how many flows can
//! be open. Refusals for `audit_unavailable` are not held back either: each is the retry.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use moat_audit::ocsf::{HTTP_ACTIVITY, NETWORK_ACTIVITY, Product, Severity, Skeleton, Status};
use moat_audit::{AuditKey, Log};
use moat_policy::Action;
use serde_json::{Value, json};

use crate::outcome::Reason;

/// OCSF schema version the records follow.
pub use moat_audit::OCSF_VERSION;

/// The egress proxy's records.
pub const EGRESS: Product = Product {
    name: "moat egress proxy",
    log_name: "egress",
};

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
    /// The program the guest says opened the flow (flow header version 2), if it named one.
    pub program: Option<moat_flow_header::Program>,
}

impl FlowInfo {
    /// The flow's program as the policy sees it.
    pub fn program_claim(&self) -> Option<moat_policy::ProgramClaim<'_>> {
        self.program.as_ref().map(|p| moat_policy::ProgramClaim {
            path: p.path().as_str(),
            sha256: p.sha256(),
        })
    }

    /// Adds the flow's program to `rec`: as OCSF's `actor.process` (the `host` profile), the
    /// guest's claim; or, once the header is read and named none, `unmapped.moat.program`
    /// "unknown".
    fn record_program(&self, rec: &mut Value, unmapped: &mut serde_json::Map<String, Value>) {
        let Some(p) = &self.program else {
            if self.guest_flow_id.is_some() {
                unmapped.insert("program".into(), json!("unknown"));
            }
            return;
        };
        let path = p.path().as_str();
        let name = path.rsplit('/').next().unwrap_or(path);
        let mut file = json!({
            "name": name,
            "path": path,
            "type_id": 1,
            "type": "Regular File",
        });
        if let Some(hex) = p.sha256_hex() {
            file["hashes"] = json!([{ "algorithm_id": 3, "algorithm": "SHA-256", "value": hex }]);
        }
        rec["actor"] = json!({ "process": { "pid": p.pid(), "name": name, "file": file } });
        if let Some(profiles) = rec["metadata"]["profiles"].as_array_mut() {
            profiles.push(json!("host"));
        }
        unmapped.insert("program".into(), json!("claimed by the guest"));
    }
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
    /// Requests the flow carried (Close of an intercepted flow only).
    pub requests: Option<u64>,
}

/// How many records of flows that never opened (Refuse and Fail) are written per workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRate {
    /// Records per second, sustained.
    pub per_second: u32,
    /// Records that may be written at once before the sustained rate applies.
    pub burst: u32,
}

impl Default for RecordRate {
    /// 20 a second after a burst of 200: an agent retrying a refused host, or a package manager
    /// walking its mirrors, stays well inside; a flood is bounded to about 20 KB/s of records
    /// (1.7 GB a day) plus one summary a second, instead of what the disk can take.
    fn default() -> Self {
        RecordRate {
            per_second: 20,
            burst: 200,
        }
    }
}

/// A token bucket, and what it held back since the last summary.
#[derive(Debug)]
struct Limiter {
    rate: RecordRate,
    tokens: f64,
    last: Option<Instant>,
    /// Held back since the last summary: (activity, reason, count), in first-seen order.
    held: Vec<(Activity, Reason, u64)>,
    /// When the first of `held` was held back.
    since: Option<SystemTime>,
}

impl Limiter {
    fn new(rate: RecordRate) -> Self {
        Limiter {
            rate,
            tokens: f64::from(rate.burst),
            last: None,
            held: Vec::new(),
            since: None,
        }
    }

    /// Takes a token at `now`; without one, counts the record as held back and says no.
    fn admit(&mut self, activity: Activity, reason: Reason, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill =
                now.saturating_duration_since(last).as_secs_f64() * f64::from(self.rate.per_second);
            self.tokens = (self.tokens + refill).min(f64::from(self.rate.burst));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.hold(activity, reason, 1);
        false
    }

    fn hold(&mut self, activity: Activity, reason: Reason, count: u64) {
        self.since.get_or_insert_with(SystemTime::now);
        match self
            .held
            .iter_mut()
            .find(|(a, r, _)| *a == activity && *r == reason)
        {
            Some((_, _, n)) => *n += count,
            None => self.held.push((activity, reason, count)),
        }
    }
}

/// The audit sink: JSON Lines to a file or stdout, one record per line.
pub struct Audit {
    log: Log,
    workspace: String,
    /// The last record could not be written: new flows are refused until one is.
    failing: AtomicBool,
    /// Records that could not be written.
    unwritten: AtomicU64,
    /// Records held back by the rate limit, in all.
    suppressed: AtomicU64,
    limiter: Mutex<Limiter>,
    /// Summaries written, for their unique ids.
    summaries: AtomicU64,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("workspace", &self.workspace)
            .finish()
    }
}

use moat_audit::ocsf::millis;

impl Audit {
    /// Appends to `path`, creating it (mode 0600) if needed; the new run is chained to the
    /// last record already there. Checkpoints are signed with a key of this process only until
    /// [`Audit::signed_by`] gives the host's.
    pub fn to_file(path: &Path, workspace: &str) -> io::Result<Self> {
        let log = Log::append_to(path, EGRESS, AuditKey::ephemeral().ok())?;
        Ok(Self::to_log(log, workspace))
    }

    /// Writes to any writer (stdout, a test buffer).
    pub fn to_writer(out: Box<dyn Write + Send>, workspace: &str) -> Self {
        let log = Log::new(
            out,
            EGRESS,
            AuditKey::ephemeral().ok(),
            moat_audit::chain::GENESIS,
        );
        Self::to_log(log, workspace)
    }

    /// Signs the log's checkpoints with `key` (the per-host audit key). Before any record.
    #[must_use]
    pub fn signed_by(mut self, key: AuditKey) -> Self {
        self.log.set_key(key);
        self
    }

    /// The log itself: its checkpoints, export and end.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log, to set its checkpoints or export. Before any record.
    pub fn log_mut(&mut self) -> &mut Log {
        &mut self.log
    }

    fn to_log(log: Log, workspace: &str) -> Self {
        Audit {
            log,
            workspace: workspace.to_owned(),
            failing: AtomicBool::new(false),
            unwritten: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            limiter: Mutex::new(Limiter::new(RecordRate::default())),
            summaries: AtomicU64::new(0),
        }
    }

    /// Bounds the records of flows that never opened to `rate` (the proxy sets its
    /// `Limits::audit_refusals` here).
    pub fn set_refusal_rate(&self, rate: RecordRate) {
        *lock(&self.limiter) = Limiter::new(rate);
    }

    /// Is the audit failing (the last record could not be written)? New flows are refused
    /// while it is.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Records that could not be written so far.
    pub fn unwritten(&self) -> u64 {
        self.unwritten.load(Ordering::Relaxed)
    }

    /// Records held back by the rate limit so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Appends the audit's own metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP moat_egress_audit_records_unwritten_total Audit records that could not be written.\n\
             # TYPE moat_egress_audit_records_unwritten_total counter\n\
             moat_egress_audit_records_unwritten_total {}\n\
             # HELP moat_egress_audit_records_suppressed_total Records of flows that never opened held back by the audit rate limit (counted in summary records).\n\
             # TYPE moat_egress_audit_records_suppressed_total counter\n\
             moat_egress_audit_records_suppressed_total {}\n\
             # HELP moat_egress_audit_failing 1 while audit records cannot be written (new flows are refused).\n\
             # TYPE moat_egress_audit_failing gauge\n\
             moat_egress_audit_failing {}",
            self.unwritten(),
            self.suppressed(),
            u8::from(self.failing()),
        );
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
        let severity = match event.activity {
            Activity::Refuse => Severity::Medium,
            Activity::Fail => Severity::Low,
            _ => Severity::Informational,
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
        let mut rec = Skeleton {
            class: NETWORK_ACTIVITY,
            activity_id: event.activity.id(),
            activity_name: event.activity.name(),
            severity,
            status: Some(Status::of(!failed)),
            time: millis(now),
            product: EGRESS,
        }
        .record();
        // action, disposition and firewall_rule belong to this profile.
        rec["metadata"]["profiles"] = json!(["security_control"]);
        rec["metadata"]["uid"] = json!(f.uid);
        let fields = json!({
            "action_id": action_id,
            "action": action,
            "disposition_id": disposition_id,
            "disposition": disposition,
            "src_endpoint": { "uid": self.workspace, "name": "workspace" },
            "dst_endpoint": Value::Object(dst),
            "connection_info": {
                "protocol_name": "tcp",
                "protocol_num": 6,
                "direction_id": 2,
                "direction": "Outbound",
            },
        });
        merge(&mut rec, fields);
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
        if let Some(n) = event.requests {
            unmapped.insert("requests".into(), json!(n));
        }
        f.record_program(&mut rec, &mut unmapped);
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

    /// Writes the record for `event`, unless the rate limit holds it back (then it is counted
    /// for a summary). False when it could not be written (the audit is then failing). Never
    /// an error a flow could crash the proxy with.
    pub fn emit(&self, event: &Event<'_>) -> bool {
        if self.held_back(event) {
            return true;
        }
        self.emit_value(self.record(event))
    }

    /// Does the rate limit hold the record of `event` back?
    fn held_back(&self, event: &Event<'_>) -> bool {
        let Some(reason) = event.reason else {
            return false;
        };
        if !matches!(event.activity, Activity::Refuse | Activity::Fail)
            || reason == Reason::AuditUnavailable
        {
            return false;
        }
        let admitted = lock(&self.limiter).admit(event.activity, reason, Instant::now());
        if !admitted {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        !admitted
    }

    /// Writes one record, as one line. False when it could not be written: the audit is then
    /// failing (logged once) until a record is written again (logged too).
    pub fn emit_value(&self, record: Value) -> bool {
        let written = self.log.append(record);
        match written {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        workspace = %self.workspace,
                        "audit records are written again; accepting new flows"
                    );
                }
                true
            }
            Err(e) => {
                self.unwritten.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        workspace = %self.workspace,
                        error = %e,
                        "cannot write audit record; refusing new flows until one is written"
                    );
                }
                false
            }
        }
    }

    /// Ends the log's run: the signed end record, with the run's counts and this audit's own
    /// (records held back by the rate limit, records that could not be written). Also done
    /// when the audit is dropped (the proxy and every flow gone). False if it could not be
    /// written.
    pub fn finish(&self) -> bool {
        self.flush_suppressed();
        self.log
            .finish(json!({
                "suppressed": self.suppressed(),
                "unwritten_total": self.unwritten(),
            }))
            .is_ok()
    }

    /// Writes one summary record per kind of record the rate limit held back since the last
    /// summary, each with its `count`. A summary that cannot be written is kept for the next
    /// call. The proxy calls this every second and at shutdown.
    pub fn flush_suppressed(&self) {
        let (held, since) = {
            let mut limiter = lock(&self.limiter);
            (
                std::mem::take(&mut limiter.held),
                limiter.since.take().unwrap_or_else(SystemTime::now),
            )
        };
        for (activity, reason, count) in held {
            let record = self.summary_record(activity, reason, count, since);
            if !self.emit_value(record) {
                lock(&self.limiter).hold(activity, reason, count);
            }
        }
    }

    /// The OCSF Network Activity record standing for `count` records of `activity` for
    /// `reason` held back since `since`: the same class, activity and disposition as they had,
    /// with OCSF's `count`, `start_time` and `end_time` for the group.
    pub fn summary_record(
        &self,
        activity: Activity,
        reason: Reason,
        count: u64,
        since: SystemTime,
    ) -> Value {
        let now = SystemTime::now();
        let fail = activity == Activity::Fail;
        let (action_id, action, disposition_id, disposition) = if fail {
            (1, "Allowed", 1, "Allowed")
        } else {
            (2, "Denied", 2, "Blocked")
        };
        let (severity, kind) = if fail {
            (Severity::Low, "failed")
        } else {
            (Severity::Medium, "refused")
        };
        let n = self.summaries.fetch_add(1, Ordering::Relaxed) + 1;
        let mut rec = Skeleton {
            class: NETWORK_ACTIVITY,
            activity_id: activity.id(),
            activity_name: activity.name(),
            severity,
            status: Some(Status::Failure),
            time: millis(now),
            product: EGRESS,
        }
        .record();
        rec["metadata"]["profiles"] = json!(["security_control"]);
        rec["metadata"]["uid"] = json!(format!("{}-suppressed-{n}", self.workspace));
        merge(
            &mut rec,
            json!({
                "count": count,
                "start_time": millis(since),
                "end_time": millis(now),
                "status_detail": reason.code(),
                "action_id": action_id,
                "action": action,
                "disposition_id": disposition_id,
                "disposition": disposition,
                "src_endpoint": { "uid": self.workspace, "name": "workspace" },
                "connection_info": {
                    "protocol_name": "tcp",
                    "protocol_num": 6,
                    "direction_id": 2,
                    "direction": "Outbound",
                },
                "message": format!(
                    "{count} {kind} flow records ({reason}) not written: over the audit rate limit"
                ),
                "unmapped": { "moat": {
                    "reason": reason.code(),
                    "blame": reason.blame().as_str(),
                    "suppressed": count,
                } },
            }),
        );
        rec
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
    /// The request's number on its flow, from 1 (`unmapped.moat.request`; the flow's Close
    /// record has the count, so a missing or doubled record shows).
    pub request: u64,
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
    /// The HTTP rule of the intercept rule that decided the request (`default` for the rule's
    /// default), where the rule has HTTP rules and the request got as far as them.
    pub http_rule: Option<&'a str>,
    /// On an MCP endpoint: the JSON-RPC messages (method, tool, the MCP rule entry that
    /// decided) and the tools taken out of the answer (`tools_hidden`).
    pub mcp: Option<Value>,
    /// Names of the secrets injected into the request.
    pub secrets: Vec<String>,
    /// Body bytes agent -> upstream and upstream -> agent, once the response has ended.
    pub bytes: Option<(u64, u64)>,
    /// Names of the secrets the response carried back, each replaced by its placeholder, and
    /// how many times (never a value).
    pub reflected: Vec<(String, u64)>,
    /// An alert written while the request is still under way (a secret reflected in the
    /// response, at its first hit): `unmapped.moat.interim`. Every request has exactly one
    /// record that is not interim, written at its end.
    pub interim: bool,
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
        // A reflected secret: the response was passed on, corrected (each hit replaced).
        let reflected = event.reason == Some(Reason::SecretReflected);
        let (action_id, action, disposition_id, disposition) = if refused {
            (2, "Denied", 2, "Blocked")
        } else if reflected {
            (4, "Modified", 11, "Corrected")
        } else {
            (1, "Allowed", 1, "Allowed")
        };
        let failed = event.reason.is_some() && !reflected;
        let severity = if refused || reflected {
            Severity::Medium
        } else if event.reason.is_some() {
            Severity::Low
        } else {
            Severity::Informational
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
        let mut rec = Skeleton {
            class: HTTP_ACTIVITY,
            activity_id,
            activity_name: activity,
            severity,
            status: Some(Status::of(!failed)),
            time: millis(now),
            product: EGRESS,
        }
        .record();
        rec["metadata"]["profiles"] = json!(["security_control"]);
        rec["metadata"]["uid"] = json!(format!("{}-{}", f.uid, millis(now)));
        rec["metadata"]["correlation_uid"] = json!(f.uid);
        let fields = json!({
            "action_id": action_id,
            "action": action,
            "disposition_id": disposition_id,
            "disposition": disposition,
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
        merge(&mut rec, fields);
        let mut unmapped = serde_json::Map::new();
        unmapped.insert("flow_uid".into(), json!(f.uid));
        unmapped.insert("request".into(), json!(event.request));
        if event.interim {
            unmapped.insert("interim".into(), json!(true));
        }
        f.record_program(&mut rec, &mut unmapped);
        if let Some(name) = event.http_rule {
            unmapped.insert("http_rule".into(), json!(name));
        }
        if let Some(mcp) = &event.mcp {
            unmapped.insert("mcp".into(), mcp.clone());
        }
        if !event.secrets.is_empty() {
            unmapped.insert("secrets_injected".into(), json!(event.secrets));
        }
        if !event.reflected.is_empty() {
            let reflected: Vec<Value> = event
                .reflected
                .iter()
                .map(|(name, count)| json!({ "name": name, "count": count }))
                .collect();
            unmapped.insert("secrets_reflected".into(), json!(reflected));
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
        let verb = if refused {
            "refused"
        } else if reflected {
            "corrected"
        } else {
            "forwarded"
        };
        rec["message"] = json!(format!(
            "{verb} {} https://{}{} -> {}{reason}{detail}",
            event.method, event.host, event.path, event.status
        ));
        rec["unmapped"] = json!({ "moat": Value::Object(unmapped) });
        rec
    }

    /// Writes the HTTP Activity record for `event`.
    pub fn emit_http(&self, event: &HttpEvent<'_>) {
        let _ = self.emit_value(self.http_record(event));
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Adds the fields of the object `more` to the object `rec`.
fn merge(rec: &mut Value, more: Value) {
    if let (Value::Object(rec), Value::Object(more)) = (rec, more) {
        rec.extend(more);
    }
}

/// Locks `m`, also after a panic elsewhere (the audit must keep working).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn bucket_allows_its_burst_then_its_rate_and_counts_the_rest() {
        let mut l = Limiter::new(RecordRate {
            per_second: 10,
            burst: 5,
        });
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| l.admit(Activity::Refuse, Reason::NoRule, t0))
            .count();
        assert_eq!(admitted, 5);
        // Half a second refills five tokens, never more than the burst.
        let t1 = t0 + Duration::from_millis(500);
        let admitted = (0..20)
            .filter(|_| l.admit(Activity::Refuse, Reason::NoRule, t1))
            .count();
        assert_eq!(admitted, 5);
        let t2 = t1 + Duration::from_secs(60);
        let admitted = (0..20)
            .filter(|_| l.admit(Activity::Fail, Reason::ConnectFailed, t2))
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(
            l.held,
            vec![
                (Activity::Refuse, Reason::NoRule, 30),
                (Activity::Fail, Reason::ConnectFailed, 15)
            ]
        );
    }

    /// Accepts `room` bytes, then fails every write with ENOSPC until given more room.
    #[derive(Clone, Default)]
    struct Disk {
        room: Arc<AtomicUsize>,
        bytes: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(room);
            self.room.fetch_sub(n, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn refusal(flow: &FlowInfo) -> Event<'_> {
        Event {
            activity: Activity::Refuse,
            flow,
            rule: None,
            action: None,
            service: None,
            upstream: None,
            reason: Some(Reason::AuditUnavailable),
            detail: None,
            bytes: None,
            allowed: false,
            requests: None,
        }
    }

    #[test]
    fn a_failed_write_marks_the_audit_failing_until_one_succeeds_and_torn_lines_are_ended() {
        let disk = Disk::default();
        disk.room.store(10, Ordering::SeqCst);
        let audit = Audit::to_writer(Box::new(disk.clone()), "ws");
        let flow = FlowInfo::default();
        assert!(!audit.failing());
        // Ten bytes of the record fit, then the disk is full.
        assert!(!audit.emit(&refusal(&flow)));
        assert!(audit.failing());
        assert!(!audit.emit(&refusal(&flow)));
        assert_eq!(audit.unwritten(), 2);
        disk.room.store(usize::MAX / 2, Ordering::SeqCst);
        assert!(audit.emit(&refusal(&flow)));
        assert!(!audit.failing());
        let text = String::from_utf8(disk.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // The torn start of the run, the run's start once the disk has room, the refusal.
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0].len(), 10);
        let start: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(start["unmapped"]["moat"]["seq"], 0);
        assert_eq!(start["unmapped"]["moat"]["unwritten_before"], 2);
        let record: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(record["status_detail"], "audit_unavailable");
        // The verifier steps over the torn line and says why records are missing.
        let report = moat_audit::verify(&text, None);
        assert!(report.intact(), "{report}");
        assert_eq!(report.torn, vec![1]);
        assert_eq!(report.unwritten, vec![(2, 2)]);
    }

    #[test]
    fn refusals_over_the_rate_are_summarised_with_their_count() {
        let disk = Disk::default();
        disk.room.store(usize::MAX / 2, Ordering::SeqCst);
        let audit = Audit::to_writer(Box::new(disk.clone()), "ws");
        audit.set_refusal_rate(RecordRate {
            per_second: 0,
            burst: 3,
        });
        let flow = FlowInfo::default();
        let mut event = refusal(&flow);
        event.reason = Some(Reason::NoRule);
        for _ in 0..10 {
            assert!(audit.emit(&event));
        }
        // Never held back: the account of an opened flow, and the audit's own retries.
        let mut open = refusal(&flow);
        open.activity = Activity::Open;
        open.reason = None;
        assert!(audit.emit(&open));
        assert!(audit.emit(&refusal(&flow)));
        assert_eq!(audit.suppressed(), 7);
        audit.flush_suppressed();
        audit.flush_suppressed();
        let text = String::from_utf8(disk.bytes.lock().unwrap().clone()).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // The run's start, three admitted, the two never held back, one summary.
        assert_eq!(records.len(), 1 + 3 + 2 + 1);
        let summary = &records[6];
        assert_eq!(summary["count"], 7);
        assert_eq!(summary["activity_id"], 5);
        assert_eq!(summary["status_detail"], "no_rule");
        assert_eq!(summary["metadata"]["uid"], "ws-suppressed-1");
    }
}
