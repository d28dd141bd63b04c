//! The OCSF record skeleton every producer starts from: class, category, activity, type_uid,
//! severity, status, metadata and time. Producers add only their own fields.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// OCSF schema version every record follows (egress, guest-init's process events, broker).
pub const OCSF_VERSION: &str = "1.8.0";

/// OCSF's `activity_id` 99, "Other": the source names the activity in `activity_name`.
pub const OTHER: u32 = 99;

/// An OCSF event class and its category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// `class_uid`.
    pub uid: u32,
    /// `class_name`, the schema's caption.
    pub name: &'static str,
    /// `category_uid`.
    pub category_uid: u32,
    /// `category_name`, the schema's caption.
    pub category_name: &'static str,
}

/// Process Activity: the workspace's processes, as guest-init reports them.
pub const PROCESS_ACTIVITY: Class = Class {
    uid: 1007,
    name: "Process Activity",
    category_uid: 1,
    category_name: "System Activity",
};
/// Event Log Activity: the audit log's own records (a run's start, checkpoints, its end).
pub const EVENT_LOG_ACTIVITY: Class = Class {
    uid: 1008,
    name: "Event Log Activity",
    category_uid: 1,
    category_name: "System Activity",
};
/// Authentication: the broker's sign-ins and early logoffs.
pub const AUTHENTICATION: Class = Class {
    uid: 3002,
    name: "Authentication",
    category_uid: 3,
    category_name: "Identity & Access Management",
};
/// Network Activity: a flow (egress proxy, or a corporate flow through the broker).
pub const NETWORK_ACTIVITY: Class = Class {
    uid: 4001,
    name: "Network Activity",
    category_uid: 4,
    category_name: "Network Activity",
};
/// HTTP Activity: one intercepted request.
pub const HTTP_ACTIVITY: Class = Class {
    uid: 4002,
    name: "HTTP Activity",
    category_uid: 4,
    category_name: "Network Activity",
};
/// SSH Activity: a remote session through the broker.
pub const SSH_ACTIVITY: Class = Class {
    uid: 4007,
    name: "SSH Activity",
    category_uid: 4,
    category_name: "Network Activity",
};

/// OCSF `severity_id` and its caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// 1.
    Informational,
    /// 2.
    Low,
    /// 3.
    Medium,
}

impl Severity {
    /// `severity_id`.
    pub fn id(self) -> u32 {
        match self {
            Severity::Informational => 1,
            Severity::Low => 2,
            Severity::Medium => 3,
        }
    }
    /// `severity`.
    pub fn caption(self) -> &'static str {
        match self {
            Severity::Informational => "Informational",
            Severity::Low => "Low",
            Severity::Medium => "Medium",
        }
    }
}

/// OCSF `status_id` and its caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 1.
    Success,
    /// 2.
    Failure,
}

impl Status {
    /// Success when `ok`.
    pub fn of(ok: bool) -> Status {
        if ok { Status::Success } else { Status::Failure }
    }
    /// `status_id`.
    pub fn id(self) -> u32 {
        match self {
            Status::Success => 1,
            Status::Failure => 2,
        }
    }
    /// `status`.
    pub fn caption(self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Failure => "Failure",
        }
    }
}

/// Who writes a record: `metadata.product` and `metadata.log_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// `metadata.product.name`, e.g. "moat egress proxy".
    pub name: &'static str,
    /// `metadata.log_name`, e.g. "egress".
    pub log_name: &'static str,
}

/// One record's skeleton.
#[derive(Debug, Clone, Copy)]
pub struct Skeleton<'a> {
    /// The class.
    pub class: Class,
    /// `activity_id`.
    pub activity_id: u32,
    /// `activity_name`, the schema's caption (or the source's own for 99, Other).
    pub activity_name: &'a str,
    /// The severity.
    pub severity: Severity,
    /// The status, for the classes that have one.
    pub status: Option<Status>,
    /// `time`, milliseconds since the Unix epoch.
    pub time: u64,
    /// Who writes it.
    pub product: Product,
}

impl Skeleton<'_> {
    /// The record: every attribute the skeleton names, `type_uid` = class * 100 + activity,
    /// `type_name` `"<class>: <activity>"`, and `metadata` with the schema version, log name and
    /// product (version: this build's).
    pub fn record(&self) -> Value {
        // `type_name` is the caption of `type_uid`: "Other" for every source-specific activity.
        let type_activity = if self.activity_id == OTHER {
            "Other"
        } else {
            self.activity_name
        };
        let mut rec = json!({
            "class_uid": self.class.uid,
            "class_name": self.class.name,
            "category_uid": self.class.category_uid,
            "category_name": self.class.category_name,
            "activity_id": self.activity_id,
            "activity_name": self.activity_name,
            "type_uid": u64::from(self.class.uid) * 100 + u64::from(self.activity_id),
            "type_name": format!("{}: {}", self.class.name, type_activity),
            "severity_id": self.severity.id(),
            "severity": self.severity.caption(),
            "time": self.time,
            "metadata": {
                "version": OCSF_VERSION,
                "log_name": self.product.log_name,
                "product": {
                    "name": self.product.name,
                    "vendor_name": "moat",
                    "version": env!("CARGO_PKG_VERSION"),
                },
            },
        });
        if let Some(status) = self.status {
            rec["status_id"] = json!(status.id());
            rec["status"] = json!(status.caption());
        }
        rec
    }
}

/// Milliseconds since the Unix epoch at `t` (0 before it).
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    millis(SystemTime::now())
}

/// The `unmapped.moat` object of `rec`, made if missing (where moat's own fields go); `None`
/// when `rec` is not an object, or its `unmapped` or `unmapped.moat` is something else.
pub fn moat_fields(rec: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    rec.as_object_mut()?
        .entry("unmapped")
        .or_insert_with(|| json!({}))
        .as_object_mut()?
        .entry("moat")
        .or_insert_with(|| json!({}))
        .as_object_mut()
}
