//! The host terminal under an interactive console. When console input is on and stdin is a
//! TTY, the terminal goes to raw mode (keys reach the guest as typed: no line editing, no echo,
//! no signals from Ctrl-C, Enter as CR as a serial terminal sends it; output processing kept,
//! so the guest's `\n` still starts a new line) and comes back, exactly as it was, on every
//! exit path:
//!
//! - every normal exit of `moat-vmm` (guest stop, VMM error, timeout, jail parent) calls
//!   [`restore`] before exiting;
//! - SIGINT, SIGTERM, SIGHUP and SIGQUIT run a handler that restores it and exits with
//!   128 + the signal. The signals are blocked in every thread but the main one (blocked when
//!   raw mode starts, before any thread exists; unblocked by the main thread once the others
//!   run, [`unblock_exit_signals`]), so the handler runs under the main thread's seccomp role,
//!   which allows `ioctl(TCSETS)` for exactly this.
//!
//! This module holds `unsafe` for termios, sigaction and the signal mask; each block states
//! why it is sound.

use std::io::{self, IsTerminal};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The terminal's mode before raw mode.
static SAVED: OnceLock<libc::termios> = OnceLock::new();
/// Whether raw mode is on (and so needs restoring).
static RAW: AtomicBool = AtomicBool::new(false);

/// Signals whose default action would end the process with the terminal left raw.
const EXIT_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Puts stdin's terminal in raw mode if stdin is a terminal; returns whether it did. Call
/// before any thread is started.
pub fn enter_raw_mode() -> io::Result<bool> {
    if !io::stdin().is_terminal() {
        return Ok(false);
    }
    // SAFETY: all-zero is a valid `termios` (plain integers and arrays), overwritten by
    // tcgetattr before use.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a valid, writable termios for the duration of the call.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } == -1 {
        return Err(io::Error::last_os_error());
    }
    if SAVED.set(saved).is_err() {
        // Raw mode was entered before: keep the first saved mode, the terminal's own.
        return Ok(RAW.load(Ordering::Acquire));
    }
    set_mask(libc::SIG_BLOCK)?;
    for sig in EXIT_SIGNALS {
        install_handler(sig)?;
    }
    let raw = raw_mode(saved);
    // SAFETY: `raw` is a valid termios that outlives the call.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } == -1 {
        return Err(io::Error::last_os_error());
    }
    RAW.store(true, Ordering::Release);
    Ok(true)
}

/// `mode` with input made raw: no canonical line editing, no echo, no signal keys, no
/// extended input processing, no flow control keys, CR passed through as CR; reads return
/// each byte as it arrives. Output processing is left as it was.
pub fn raw_mode(mut mode: libc::termios) -> libc::termios {
    mode.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::ISIG | libc::IEXTEN);
    mode.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR | libc::ISTRIP);
    mode.c_cc[libc::VMIN] = 1;
    mode.c_cc[libc::VTIME] = 0;
    mode
}

/// Puts the terminal back as it was, if raw mode is on. Async-signal-safe (an atomic swap and
/// `tcsetattr`), so the signal handler uses it too.
pub fn restore() {
    if !RAW.swap(false, Ordering::AcqRel) {
        return;
    }
    if let Some(saved) = SAVED.get() {
        // SAFETY: `saved` is the valid termios tcgetattr filled; it lives in a static.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

/// Lets the calling thread (the main thread, once every other thread runs) take the exit
/// signals again. A no-op unless raw mode is on.
pub fn unblock_exit_signals() -> io::Result<()> {
    if SAVED.get().is_none() {
        return Ok(());
    }
    set_mask(libc::SIG_UNBLOCK)
}

fn set_mask(how: libc::c_int) -> io::Result<()> {
    // SAFETY: all-zero is a valid sigset_t; sigemptyset then initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in EXIT_SIGNALS {
        // SAFETY: `set` is initialised and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: `set` is valid for the call; the old mask is not asked for (NULL).
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

extern "C" fn on_exit_signal(sig: libc::c_int) {
    restore();
    // SAFETY: _exit is async-signal-safe and ends the process at once, without running
    // anything that could take a lock the interrupted code holds.
    unsafe { libc::_exit(128 + sig) }
}

fn install_handler(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: all-zero is a valid sigaction (no flags, empty mask) before the fields below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_exit_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: `action` is valid for the call; the old action is not asked for (NULL). The
    // handler only calls async-signal-safe functions.
    if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_mode_stops_line_editing_echo_and_signal_keys_but_keeps_output_processing() {
        // SAFETY: all-zero is a valid termios.
        let mut mode: libc::termios = unsafe { std::mem::zeroed() };
        mode.c_lflag = libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN;
        mode.c_iflag = libc::ICRNL | libc::IXON;
        mode.c_oflag = libc::OPOST | libc::ONLCR;
        let raw = raw_mode(mode);
        assert_eq!(
            raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN),
            0
        );
        assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR);
        assert_eq!(raw.c_cc[libc::VMIN], 1);
    }

    #[test]
    fn restore_without_raw_mode_does_nothing() {
        restore();
        assert!(!RAW.load(Ordering::Acquire));
    }
}
