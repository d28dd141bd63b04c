//! Process events for the host's audit log: one JSON line per event on the host's audit
//! socket (vsock port 1026 in a VM; in the namespace backend `<uds>_1026`). Best effort: a
//! workspace whose host stopped listening keeps running, and says so on stderr once.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
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
    /// Processes besides the agent whose end is reported when PID 1 reaps them (SSH sessions).
    tracked: Mutex<HashSet<u32>>,
}

impl Reporter {
    pub(crate) fn new(sink: Sink) -> Self {
        Reporter {
            sink,
            warned: AtomicBool::new(false),
            tracked: Mutex::new(HashSet::new()),
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

    fn tracked_set(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reports `pid`'s end when [`Reporter::reaped`] sees it.
    pub(crate) fn track(&self, pid: u32) {
        self.tracked_set().insert(pid);
    }

    /// How many tracked processes are alive.
    pub(crate) fn tracked(&self) -> usize {
        self.tracked_set().len()
    }

    /// PID 1 reaped `pid`: reports its end if it was tracked.
    pub(crate) fn reaped(&self, pid: u32, exit_code: i32) {
        if self.tracked_set().remove(&pid) {
            self.terminate(pid, exit_code);
        }
    }

    pub(crate) fn terminate(&self, pid: u32, exit_code: i32) {
        self.send(&serde_json::json!({
            "activity": "terminate",
            "pid": pid,
            "exit_code": exit_code,
        }));
    }
}
