//! Signals of the waiting processes (the namespace backend's outer process, and PID 1).
//!
//! Ctrl-C and Ctrl-\ at an interactive shell are for the shell: the waiting processes catch
//! them and do nothing; PID 1 of an agent without a terminal of its own passes them on to the
//! agent's process group (the agent leads a session of its own, so the terminal's signals no
//! longer reach it directly). SIGTERM and SIGHUP are passed on, one level at a time (outer process ->
//! PID 1 -> agent), so the agent can shut down in order. Handlers, not SIG_IGN, so that exec
//! resets them and the agent gets every default action.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The longest a signal waits in a flag before it is passed on: see [`wait_for`].
const WAKE_EVERY: Duration = Duration::from_millis(50);

/// Waits for `pid` (or any child) to change state, as `waitpid` does, but returns at least
/// every [`WAKE_EVERY`] with `StillAlive`, so that the caller passes on a signal that arrived
/// just before it began to wait: a handler that runs between the caller's check of the flag
/// and a blocking `waitpid` interrupts nothing, and the signal would wait for the next child
/// to end. The caller checks its flags at every return.
pub(crate) fn wait_for(pid: Option<Pid>) -> nix::Result<WaitStatus> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => {
            // A signal cuts this short (EINTR); std's sleep would resume it.
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: i64::from(WAKE_EVERY.subsec_nanos()),
            };
            // SAFETY: `pause` is a live local; the remainder is not wanted.
            #[allow(unsafe_code)]
            unsafe {
                libc::nanosleep(&pause, std::ptr::null_mut())
            };
            Ok(WaitStatus::StillAlive)
        }
        other => other,
    }
}

/// The last SIGTERM/SIGHUP received and not yet passed on (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);

/// The last SIGINT/SIGQUIT received and not yet passed on (0: none); kept only where
/// [`forward_interrupts`] was called.
static INTERRUPT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(_: libc::c_int) {}

extern "C" fn on_interrupt_forwarded(sig: libc::c_int) {
    INTERRUPT.store(sig, Ordering::SeqCst);
}

extern "C" fn on_terminate(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs the handlers. Without SA_RESTART for the forwarded signals, so a blocking
/// waitpid returns EINTR and the waiter can pass the signal on.
pub(crate) fn install() {
    let quiet = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let forward = SigAction::new(
        SigHandler::Handler(on_terminate),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for (sig, action) in [
        (Signal::SIGINT, &quiet),
        (Signal::SIGQUIT, &quiet),
        (Signal::SIGTERM, &forward),
        (Signal::SIGHUP, &forward),
    ] {
        // SAFETY: both handlers only touch an atomic (or nothing): async-signal-safe.
        #[allow(unsafe_code)]
        let _ = unsafe { sigaction(sig, action) };
    }
}

/// For PID 1 of an agent with no terminal of its own: the agent leads its own session, out of
/// reach of the terminal's Ctrl-C and Ctrl-\ (which reach PID 1's group), so PID 1 keeps
/// them for [`forward_pending_interrupt`]. Without SA_RESTART, so the blocking waitpid returns
/// and the signal is passed on at once.
pub(crate) fn forward_interrupts() {
    let keep = SigAction::new(
        SigHandler::Handler(on_interrupt_forwarded),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: the handler only touches an atomic: async-signal-safe.
        #[allow(unsafe_code)]
        let _ = unsafe { sigaction(sig, &keep) };
    }
}

/// Passes a pending SIGINT/SIGQUIT on to the process group `leader` leads (the agent and
/// the pipeline it runs, as the terminal would have).
pub(crate) fn forward_pending_interrupt(leader: Pid) {
    let sig = INTERRUPT.swap(0, Ordering::SeqCst);
    if let Ok(sig) = Signal::try_from(sig) {
        let _ = nix::sys::signal::killpg(leader, sig);
    }
}

/// Passes a pending SIGTERM/SIGHUP on to `to`. Call before every blocking wait and after
/// every EINTR.
pub(crate) fn forward_pending(to: Pid) {
    let sig = PENDING.swap(0, Ordering::SeqCst);
    if let Ok(sig) = Signal::try_from(sig)
        && sig != Signal::SIGKILL
    {
        let _ = kill(to, sig);
    }
}
