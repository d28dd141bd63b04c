//! Audit: OCSF JSON Lines. Sign-ins, and sessions ended early (revoked, or the entitlement lost
//! or unconfirmed at the identity provider), are Authentication (class 3002) Logon/Logoff
//! records; each remote session (one stream through a tunnel) is SSH Activity (class 4007):
//! Open, then Close with bytes and duration, or a single Refuse. Each corporate egress flow (a
//! workspace reaching a corporate service through the broker) is Network Activity (class 4001),
//! like the egress proxy's flows.
//!
//! Records say who (subject, email, groups), when, from where, to which workspace, how long and
//! how many bytes. They never hold a token (bearer or refresh), an authorization code, a key or
//! payload.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use moat_audit::ocsf::{
    AUTHENTICATION, Class, NETWORK_ACTIVITY, Product, SSH_ACTIVITY, Severity, Skeleton, Status,
    millis,
};
use moat_audit::{AuditKey, Log};
use serde_json::{Value, json};

use crate::config::WorkspaceName;
use crate::oidc::Identity;
use crate::session::Session;

/// OCSF schema version the records follow (the same as the egress proxy's).
pub use moat_audit::OCSF_VERSION;

/// The broker's records.
const BROKER: Product = Product {
    name: "moat broker",
    log_name: "broker",
};

/// The SSH Activity activities written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshActivity {
    /// A session's stream reached the workspace.
    Open,
    /// It ended.
    Close,
    /// It was refused (no session, not entitled, workspace not connected).
    Refuse,
}

impl SshActivity {
    fn id(self) -> u32 {
        match self {
            SshActivity::Open => 1,
            SshActivity::Close => 2,
            SshActivity::Refuse => 5,
        }
    }
    fn name(self) -> &'static str {
        match self {
            SshActivity::Open => "Open",
            SshActivity::Close => "Close",
            SshActivity::Refuse => "Refuse",
        }
    }
}

/// One remote session's record.
#[derive(Debug)]
pub struct RemoteEvent<'a> {
    /// What happened.
    pub activity: SshActivity,
    /// The session, once known.
    pub session: Option<&'a Session>,
    /// The workspace asked for.
    pub workspace: &'a WorkspaceName,
    /// The person's client address.
    pub src: SocketAddr,
    /// Why it was refused or closed.
    pub detail: Option<&'a str>,
    /// Bytes person -> workspace and back (Close only).
    pub bytes: Option<(u64, u64)>,
    /// When the stream opened (Close only).
    pub started: Option<SystemTime>,
}

/// The Network Activity activities of a corporate egress flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowActivity {
    /// Connected to the service.
    Open,
    /// Ended.
    Close,
    /// The service could not be connected.
    Fail,
    /// Refused (not a service this workspace may reach).
    Refuse,
}

impl FlowActivity {
    fn id(self) -> u32 {
        match self {
            FlowActivity::Open => 1,
            FlowActivity::Close => 2,
            FlowActivity::Fail => 4,
            FlowActivity::Refuse => 5,
        }
    }
    fn name(self) -> &'static str {
        match self {
            FlowActivity::Open => "Open",
            FlowActivity::Close => "Close",
            FlowActivity::Fail => "Fail",
            FlowActivity::Refuse => "Refuse",
        }
    }
}

/// One corporate egress flow's record.
#[derive(Debug)]
pub struct CorporateEvent<'a> {
    activity: FlowActivity,
    workspace: &'a WorkspaceName,
    service: &'a str,
    address: Option<&'a str>,
    peer: Option<SocketAddr>,
    bytes: Option<(u64, u64)>,
    started: Option<SystemTime>,
    detail: Option<&'a str>,
}

impl<'a> CorporateEvent<'a> {
    fn new(activity: FlowActivity, workspace: &'a WorkspaceName, service: &'a str) -> Self {
        CorporateEvent {
            activity,
            workspace,
            service,
            address: None,
            peer: None,
            bytes: None,
            started: None,
            detail: None,
        }
    }

    /// `requested` was refused because `why`.
    pub fn refuse(workspace: &'a WorkspaceName, requested: &'a str, why: &'a str) -> Self {
        CorporateEvent {
            detail: Some(why),
            ..Self::new(FlowActivity::Refuse, workspace, requested)
        }
    }

    /// `service` at `address` could not be connected.
    pub fn fail(workspace: &'a WorkspaceName, service: &'a str, address: &'a str) -> Self {
        CorporateEvent {
            address: Some(address),
            detail: Some("cannot connect to the service"),
            ..Self::new(FlowActivity::Fail, workspace, service)
        }
    }

    /// A flow to `service` opened.
    pub fn open(
        workspace: &'a WorkspaceName,
        service: &'a str,
        address: &'a str,
        peer: Option<SocketAddr>,
    ) -> Self {
        CorporateEvent {
            address: Some(address),
            peer,
            ..Self::new(FlowActivity::Open, workspace, service)
        }
    }

    /// A flow to `service` closed, with bytes (workspace -> service, back) and why.
    pub fn close(
        workspace: &'a WorkspaceName,
        service: &'a str,
        address: &'a str,
        peer: Option<SocketAddr>,
        bytes: (u64, u64),
        started: SystemTime,
        why: &'a str,
    ) -> Self {
        CorporateEvent {
            address: Some(address),
            peer,
            bytes: Some(bytes),
            started: Some(started),
            detail: Some(why),
            ..Self::new(FlowActivity::Close, workspace, service)
        }
    }
}

/// The sink.
pub struct Audit {
    log: Log,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

/// The skeleton of a broker record of `class`.
fn skeleton(
    class: Class,
    activity_id: u32,
    activity_name: &str,
    severity: Severity,
    status: Status,
    time: SystemTime,
) -> Value {
    Skeleton {
        class,
        activity_id,
        activity_name,
        severity,
        status: Some(status),
        time: millis(time),
        product: BROKER,
    }
    .record()
}

/// Adds the fields of the object `more` to the object `rec`.
fn merge(rec: &mut Value, more: Value) {
    if let (Value::Object(rec), Value::Object(more)) = (rec, more) {
        rec.extend(more);
    }
}

fn user(identity: &Identity) -> Value {
    let mut user = json!({ "uid": identity.subject, "type_id": 1, "type": "User" });
    if let Some(email) = &identity.email {
        user["email_addr"] = json!(email);
    }
    if !identity.groups.is_empty() {
        user["groups"] = Value::Array(
            identity
                .groups
                .iter()
                .map(|g| json!({ "name": g }))
                .collect(),
        );
    }
    user
}

fn session_object(session: &Session) -> Value {
    json!({
        "uid": session.id,
        "created_time": millis(session.created),
        "expiration_time": millis(session.expires),
        "is_remote": true,
    })
}

fn endpoint(addr: SocketAddr) -> Value {
    json!({ "ip": addr.ip().to_string(), "port": addr.port() })
}

fn status(ok: bool) -> (Status, Severity) {
    if ok {
        (Status::Success, Severity::Informational)
    } else {
        (Status::Failure, Severity::Medium)
    }
}

impl Audit {
    /// Appends to `path`, creating it (mode 0600) if needed.
    /// The records are chained (moat-audit); checkpoints are signed with a key of this
    /// process (named in the log's start record).
    pub fn to_file(path: &Path) -> io::Result<Self> {
        Ok(Audit {
            log: Log::append_to(path, BROKER, AuditKey::ephemeral().ok())?,
        })
    }

    /// Signs the log's checkpoints with `key` (the broker's audit key, `audit.key` in its state
    /// directory) instead of one of this process's. Before any record.
    #[must_use]
    pub fn signed_by(mut self, key: AuditKey) -> Self {
        self.log.set_key(key);
        self
    }

    /// Writes to any writer.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Audit {
            log: Log::new(
                out,
                BROKER,
                AuditKey::ephemeral().ok(),
                moat_audit::chain::GENESIS,
            ),
        }
    }

    /// A sign-in: `Ok(session)` or a refusal with its reason; `identity` when the ID token was
    /// valid (a refused entitlement still names the person).
    pub fn sign_in(
        &self,
        identity: Option<&Identity>,
        workspace: &WorkspaceName,
        src: SocketAddr,
        outcome: Result<&Session, &str>,
    ) {
        let (status, severity) = status(outcome.is_ok());
        let mut rec = skeleton(
            AUTHENTICATION,
            1,
            "Logon",
            severity,
            status,
            SystemTime::now(),
        );
        merge(
            &mut rec,
            json!({
                "auth_protocol_id": 4,
                "auth_protocol": "OpenID",
                "is_remote": true,
                "src_endpoint": endpoint(src),
                "service": { "name": "moat broker", "uid": workspace.as_str() },
                "dst_endpoint": { "hostname": workspace.as_str() },
                // OCSF requires a user; an anonymous refusal (bad token) names none we can trust.
                "user": identity.map_or_else(|| json!({ "name": "unknown" }), user),
            }),
        );
        match outcome {
            Ok(session) => {
                rec["session"] = session_object(session);
                rec["message"] = json!(format!("signed in to {workspace}"));
            }
            Err(reason) => {
                rec["status_detail"] = json!(reason);
                rec["message"] = json!(format!("sign-in to {workspace} refused: {reason}"));
            }
        }
        self.emit(rec);
    }

    /// A session ended before its time: revoked, or its entitlement lost or unconfirmed at the
    /// identity provider (`reason` says which).
    pub fn logoff(&self, session: &Session, reason: &str) {
        let mut rec = skeleton(
            AUTHENTICATION,
            2,
            "Logoff",
            Severity::Informational,
            Status::Success,
            SystemTime::now(),
        );
        merge(
            &mut rec,
            json!({
                "status_detail": reason,
                "auth_protocol_id": 4,
                "auth_protocol": "OpenID",
                "is_remote": true,
                "service": { "name": "moat broker", "uid": session.workspace.as_str() },
                "dst_endpoint": { "hostname": session.workspace.as_str() },
                "user": user(&session.identity),
                "session": session_object(session),
                "message": format!("session {} ended: {reason}", session.id),
            }),
        );
        self.emit(rec);
    }

    /// One remote session event.
    pub fn remote(&self, event: &RemoteEvent<'_>) {
        let ok = event.activity != SshActivity::Refuse;
        let (status, severity) = status(ok);
        let now = SystemTime::now();
        let mut rec = skeleton(
            SSH_ACTIVITY,
            event.activity.id(),
            event.activity.name(),
            severity,
            status,
            now,
        );
        merge(
            &mut rec,
            json!({
                "src_endpoint": endpoint(event.src),
                "dst_endpoint": { "hostname": event.workspace.as_str(), "name": "workspace" },
                "connection_info": {
                    "protocol_name": "tcp",
                    "protocol_num": 6,
                    "direction_id": 1,
                    "direction": "Inbound",
                },
            }),
        );
        if let Some(session) = event.session {
            // `actor` belongs to the host profile in SSH Activity.
            rec["metadata"]["profiles"] = json!(["host"]);
            rec["actor"] =
                json!({ "user": user(&session.identity), "session": session_object(session) });
            rec["connection_info"]["uid"] = json!(session.id);
        }
        if let Some(detail) = event.detail {
            rec["status_detail"] = json!(detail);
        }
        if let (Some((up, down)), Some(start)) = (event.bytes, event.started) {
            rec["traffic"] = json!({ "bytes_out": up, "bytes_in": down, "bytes": up + down });
            let duration = now.duration_since(start).unwrap_or(Duration::ZERO);
            rec["start_time"] = json!(millis(start));
            rec["end_time"] = json!(millis(now));
            rec["duration"] = json!(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        }
        rec["message"] = json!(format!(
            "remote session to {} {}",
            event.workspace,
            event.activity.name().to_lowercase()
        ));
        self.emit(rec);
    }

    /// One corporate egress flow event.
    pub fn corporate(&self, event: &CorporateEvent<'_>) {
        let ok = matches!(event.activity, FlowActivity::Open | FlowActivity::Close);
        let (status, severity) = status(ok);
        let now = SystemTime::now();
        let mut dst = json!({ "svc_name": event.service });
        if let Some(peer) = event.peer {
            dst["ip"] = json!(peer.ip().to_string());
            dst["port"] = json!(peer.port());
        }
        let mut rec = skeleton(
            NETWORK_ACTIVITY,
            event.activity.id(),
            event.activity.name(),
            severity,
            status,
            now,
        );
        merge(
            &mut rec,
            json!({
                "src_endpoint": { "uid": event.workspace.as_str(), "name": "workspace" },
                "dst_endpoint": dst,
                "connection_info": {
                    "protocol_name": "tcp",
                    "protocol_num": 6,
                    "direction_id": 2,
                    "direction": "Outbound",
                },
                "message": format!(
                    "corporate flow from {} to {} {}",
                    event.workspace,
                    event.service,
                    event.activity.name().to_lowercase()
                ),
            }),
        );
        if let Some(detail) = event.detail {
            rec["status_detail"] = json!(detail);
        }
        if let Some(address) = event.address {
            rec["unmapped"] = json!({ "moat": { "service_address": address } });
        }
        if let (Some((out, back)), Some(start)) = (event.bytes, event.started) {
            rec["traffic"] = json!({ "bytes_out": out, "bytes_in": back, "bytes": out + back });
            let duration = now.duration_since(start).unwrap_or(Duration::ZERO);
            rec["start_time"] = json!(millis(start));
            rec["end_time"] = json!(millis(now));
            rec["duration"] = json!(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        }
        self.emit(rec);
    }

    /// Writes one record, chained, as one line; failures are logged, never propagated.
    fn emit(&self, record: Value) {
        if let Err(e) = self.log.append(record) {
            tracing::error!("audit write failed: {e}");
        }
    }

    /// Ends the log's run with its signed end record (also done when the audit is dropped).
    pub fn finish(&self) {
        if let Err(e) = self.log.finish(json!({})) {
            tracing::error!("audit write failed: {e}");
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.finish();
    }
}
