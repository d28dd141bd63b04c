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
    tracked: Mutex<Tracked>,
}

/// How many pids reaped during starts in progress are kept for them.
const EARLY_KEPT: usize = 64;

/// The processes PID 1 reports the end of, besides the agent.
#[derive(Debug, Default)]
struct Tracked {
    /// Started, and not reaped yet.
    live: HashSet<u32>,
    /// Slots taken by starts in progress (their pid is not known yet).
    starting: usize,
    /// Reaped before their start was recorded (the reaper ran first): with exit codes.
    early: Vec<(u32, i32)>,
}

impl Reporter {
    pub(crate) fn new(sink: Sink) -> Self {
        Reporter {
            sink,
            warned: AtomicBool::new(false),
            tracked: Mutex::new(Tracked::default()),
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

    /// A workspace service started ([`crate::service`]).
    pub(crate) fn service_launch(&self, pid: u32, name: &str, argv: &[String]) {
        self.send(&serde_json::json!({
            "activity": "launch",
            "pid": pid,
            "cmd_line": argv.join(" "),
            "service": name,
        }));
    }

    /// A workspace service ended.
    pub(crate) fn service_terminate(&self, pid: u32, name: &str, exit_code: i32) {
        self.send(&serde_json::json!({
            "activity": "terminate",
            "pid": pid,
            "exit_code": exit_code,
            "service": name,
        }));
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one of `max` slots for a process about to start; `false` when all are taken.
    pub(crate) fn reserve(&self, max: usize) -> bool {
        let mut t = self.tracked();
        if t.live.len() + t.starting >= max {
            return false;
        }
        t.starting += 1;
        true
    }

    /// Gives back a slot whose process did not start.
    pub(crate) fn release(&self) {
        let mut t = self.tracked();
        t.starting = t.starting.saturating_sub(1);
    }

    /// The process of a reserved slot started as `pid`: its end is reported when PID 1 reaps
    /// it (or now, if PID 1 already did).
    pub(crate) fn started(&self, pid: u32) {
        let ended = {
            let mut t = self.tracked();
            t.starting = t.starting.saturating_sub(1);
            match t.early.iter().position(|(p, _)| *p == pid) {
                Some(i) => Some(t.early.swap_remove(i).1),
                None => {
                    t.live.insert(pid);
                    None
                }
            }
        };
        if let Some(code) = ended {
            self.terminate(pid, code);
        }
    }

    /// PID 1 reaped `pid` (not the agent): reports its end if it was tracked, or keeps it for
    /// [`Reporter::started`] while a start is in progress.
    pub(crate) fn reaped(&self, pid: u32, exit_code: i32) {
        let tracked = {
            let mut t = self.tracked();
            if t.live.remove(&pid) {
                true
            } else {
                // Only while a start is in progress, and only a few: other orphans PID 1
                // reaps meanwhile are not kept for long.
                if t.starting > 0 {
                    if t.early.len() >= EARLY_KEPT {
                        t.early.remove(0);
                    }
                    t.early.push((pid, exit_code));
                }
                false
            }
        };
        if tracked {
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
