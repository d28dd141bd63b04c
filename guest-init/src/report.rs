//! Process events for the host's audit log: one JSON line per event on the host's audit
//! socket (vsock port 1026; in the namespace backend `<uds>_1026`). Best effort: a workspace
//! whose host stopped listening keeps running, and says so on stderr once.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where events go.
#[derive(Debug)]
pub(crate) struct Reporter {
    path: Option<PathBuf>,
    warned: AtomicBool,
}

impl Reporter {
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        Reporter {
            path,
            warned: AtomicBool::new(false),
        }
    }

    fn send(&self, event: &serde_json::Value) {
        let Some(path) = &self.path else { return };
        let mut line = event.to_string();
        line.push('\n');
        let sent = UnixStream::connect(path).and_then(|mut s| s.write_all(line.as_bytes()));
        if let Err(e) = sent
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            eprintln!("moat guest-init: cannot report process events to the host: {e}");
        }
    }

    pub(crate) fn launch(&self, pid: u32, argv: &[String]) {
        self.send(&serde_json::json!({
            "activity": "launch",
            "pid": pid,
            "cmd_line": argv.join(" "),
        }));
    }

    pub(crate) fn terminate(&self, pid: u32, exit_code: i32) {
        self.send(&serde_json::json!({
            "activity": "terminate",
            "pid": pid,
            "exit_code": exit_code,
        }));
    }
}
