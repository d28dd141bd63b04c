//! Process events for the host's audit log: one JSON line per event on the host's audit
//! socket (vsock port 1026 in a VM; in the namespace backend `<uds>_1026`). Best effort: a
//! workspace whose host stopped listening keeps running, and says so on stderr once.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the host listens for events.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Nowhere: events are dropped.
    None,
    /// A Unix socket (the namespace backend).
    Unix(PathBuf),
    /// A vsock port of the host (in a VM).
    Vsock(u32),
}

/// Where events go.
#[derive(Debug)]
pub(crate) struct Reporter {
    sink: Sink,
    warned: AtomicBool,
}

impl Reporter {
    pub(crate) fn new(sink: Sink) -> Self {
        Reporter {
            sink,
            warned: AtomicBool::new(false),
        }
    }

    fn send(&self, event: &serde_json::Value) {
        let stream = match &self.sink {
            Sink::None => return,
            Sink::Unix(path) => UnixStream::connect(path),
            Sink::Vsock(port) => moat_netstack::vsock_connect(moat_netstack::HOST_CID, *port),
        };
        let mut line = event.to_string();
        line.push('\n');
        let sent = stream.and_then(|mut s| s.write_all(line.as_bytes()));
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
