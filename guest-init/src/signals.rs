//! Signals of the waiting processes (the namespace backend's outer process, and PID 1).
//!
//! Ctrl-C and Ctrl-\ at an interactive shell are for the shell: the waiting processes catch
//! them and do nothing. SIGTERM and SIGHUP are passed on, one level at a time (outer process ->
//! PID 1 -> agent), so the agent can shut down in order. Handlers, not SIG_IGN, so that exec
//! resets them and the agent gets every default action.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;

/// The last SIGTERM/SIGHUP received and not yet passed on (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(_: libc::c_int) {}

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
