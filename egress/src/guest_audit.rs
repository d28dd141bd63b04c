//! Process events reported by the workspace's guest-init, turned into OCSF Process Activity
//! (class 1007) records in the same audit log as the flows.
//!
//! guest-init connects to `<uds>_1026` (vsock port 1026 in a VM) and writes one JSON object per
//! line. The guest is untrusted: lines are bounded, parsed strictly, and only re-emitted as
//! what they are (claims by guest-init, marked so in `unmapped.moat.reported_by`); a malformed
//! line closes the connection.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use moat_audit::ocsf::{PROCESS_ACTIVITY, Product, Severity, Skeleton};

use crate::audit::Audit;

/// Process events: reported by guest-init, written by the host.
const GUEST_INIT: Product = Product {
    name: "moat guest-init",
    log_name: "workspace",
};

/// The vsock port guest-init reports process events on.
pub const GUEST_AUDIT_VSOCK_PORT: u32 = 1026;
/// Longest line accepted.
pub const MAX_LINE: usize = 8 * 1024;
/// Longest command line kept in a record.
const MAX_CMD_LINE: usize = 4096;
/// Longest service name kept in a record (guest-init's names are at most 32 bytes).
const MAX_SERVICE_NAME: usize = 64;

/// One event, as guest-init sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "activity", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestEvent {
    /// The agent (or another supervised process) started.
    Launch {
        /// Its pid inside the workspace.
        pid: u32,
        /// Its command line.
        cmd_line: String,
        /// The workspace service it is, if it is one (absent for the agent and SSH sessions).
        #[serde(default)]
        service: Option<String>,
    },
    /// It exited.
    Terminate {
        /// Its pid inside the workspace.
        pid: u32,
        /// Exit code (128 + signal when killed).
        exit_code: i32,
        /// The workspace service it was, if it was one.
        #[serde(default)]
        service: Option<String>,
    },
}

impl GuestEvent {
    /// Parses one line; `None` for anything but a well-formed event.
    pub fn parse(line: &[u8]) -> Option<GuestEvent> {
        if line.len() > MAX_LINE {
            return None;
        }
        serde_json::from_slice(line).ok()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Audit {
    /// The OCSF Process Activity record for a guest event.
    pub fn process_record(&self, event: &GuestEvent) -> serde_json::Value {
        let (activity_id, activity, pid) = match event {
            GuestEvent::Launch { pid, .. } => (1, "Launch", *pid),
            GuestEvent::Terminate { pid, .. } => (2, "Terminate", *pid),
        };
        let mut process = json!({ "pid": pid });
        let mut rec = Skeleton {
            class: PROCESS_ACTIVITY,
            activity_id,
            activity_name: activity,
            severity: Severity::Informational,
            status: None,
            time: moat_audit::ocsf::now_millis(),
            product: GUEST_INIT,
        }
        .record();
        let fields = json!({
            "device": { "type_id": 99, "type": "moat workspace", "hostname": "workspace", "uid": self.workspace() },
            "actor": { "process": { "pid": 1, "name": "guest-init" } },
            "unmapped": { "moat": { "reported_by": "guest-init" } },
        });
        if let (Some(rec), serde_json::Value::Object(fields)) = (rec.as_object_mut(), fields) {
            rec.extend(fields);
        }
        match event {
            GuestEvent::Launch { cmd_line, .. } => {
                let cmd_line = truncate(cmd_line, MAX_CMD_LINE);
                process["cmd_line"] = json!(cmd_line);
                if let Some(name) = cmd_line.split_whitespace().next() {
                    process["name"] = json!(name.rsplit('/').next().unwrap_or(name));
                }
                rec["message"] = json!(format!("launched: {cmd_line}"));
            }
            GuestEvent::Terminate { exit_code, .. } => {
                rec["exit_code"] = json!(exit_code);
                rec["message"] = json!(format!("exited with status {exit_code}"));
            }
        }
        let (GuestEvent::Launch { service, .. } | GuestEvent::Terminate { service, .. }) = event;
        if let Some(service) = service {
            // A claim of guest-init's, like the rest: named where it is (unmapped.moat).
            rec["unmapped"]["moat"]["service"] = json!(truncate(service, MAX_SERVICE_NAME));
        }
        rec["process"] = process;
        rec
    }
}

async fn serve_conn(stream: UnixStream, audit: Arc<Audit>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded: never buffer more than one maximal line.
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let Some(event) = GuestEvent::parse(body) else {
            tracing::warn!("malformed process event from guest-init; closing its audit stream");
            return;
        };
        audit.emit_value(audit.process_record(&event));
    }
}

/// Binds the process-event socket at `path`, replacing a stale one. Bound before anything
/// is started that connects to it or changes its permissions. Needs a tokio runtime context.
///
/// # Errors
/// The socket cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serves guest process events on `listener` (from [`bind`]) until `shutdown`.
pub async fn serve(listener: UnixListener, audit: Arc<Audit>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => { tokio::spawn(serve_conn(s, Arc::clone(&audit))); }
                Err(e) => {
                    tracing::warn!(error = %e, "guest audit accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_events_parse() {
        assert_eq!(
            GuestEvent::parse(br#"{"activity":"launch","pid":3,"cmd_line":"sh -c x"}"#),
            Some(GuestEvent::Launch {
                pid: 3,
                cmd_line: "sh -c x".into(),
                service: None,
            })
        );
        assert_eq!(
            GuestEvent::parse(br#"{"activity":"terminate","pid":3,"exit_code":7}"#),
            Some(GuestEvent::Terminate {
                pid: 3,
                exit_code: 7,
                service: None,
            })
        );
    }

    #[test]
    fn a_services_events_name_it_in_their_records() {
        let event =
            GuestEvent::parse(br#"{"activity":"terminate","pid":9,"exit_code":1,"service":"llm"}"#)
                .unwrap();
        let audit = Audit::to_writer(Box::new(std::io::sink()), "ws");
        let rec = audit.process_record(&event);
        assert_eq!(rec["unmapped"]["moat"]["service"], "llm");
        assert_eq!(rec["exit_code"], 1);
    }

    #[test]
    fn unknown_fields_activities_and_oversized_lines_are_refused() {
        assert_eq!(
            GuestEvent::parse(br#"{"activity":"launch","pid":3,"cmd_line":"x","uid":0}"#),
            None
        );
        assert_eq!(GuestEvent::parse(br#"{"activity":"fork","pid":3}"#), None);
        let big = format!(
            r#"{{"activity":"launch","pid":3,"cmd_line":"{}"}}"#,
            "a".repeat(MAX_LINE)
        );
        assert_eq!(GuestEvent::parse(big.as_bytes()), None);
    }

    #[test]
    fn long_command_lines_are_truncated_in_records() {
        let audit = Audit::to_writer(Box::new(std::io::sink()), "ws");
        let rec = audit.process_record(&GuestEvent::Launch {
            pid: 2,
            cmd_line: "é".repeat(4000),
            service: None,
        });
        assert!(rec["process"]["cmd_line"].as_str().unwrap().len() <= MAX_CMD_LINE);
    }
}
