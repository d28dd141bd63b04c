//! The VM's control stream while the workspace runs ([`Link`]): the host's signals in, the
//! agent's outcome out, and what it means when the stream ends before the outcome went.
//!
//! The stream ends early in two cases, and guest-init cannot tell which from the end alone:
//! a snapshot of the running VM (moat-vmm drops its host connections while it writes the
//! snapshot, and on `resume` the guest's vsock transport is reset), or a restore of such a
//! snapshot somewhere else, where this VM's host is gone (its proxy, its audit socket, its
//! `moat run`). So it asks: it connects the control port again and says
//! [`VmReattach`](control::VmReattach). The same `moat run`, still waiting for this VM's
//! outcome, answers [`VmReattached`](control::VmReattached), and the workspace goes on on the
//! new stream. Anything else (nobody listening, a listener that closes, a new host that sends a
//! workspace, silence for [`REATTACH_WITHIN`]) means the host is gone: the workspace is
//! stopped and the VM powered off, rather than an agent left running with no host to report
//! to, no audit and no way to be stopped.
//!
//! A reset also means this machine may be one of several restores of one snapshot, all with
//! the same RNG state: the RNG is reseeded from the host's entropy device before the control
//! stream is connected again, as a template's restore does.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::control::{self, VmOutcome};

/// How long the host has to answer a reattach, from the first connect.
pub(crate) const REATTACH_WITHIN: Duration = Duration::from_secs(10);
/// How long the host has to acknowledge the outcome (by closing the stream) before the VM
/// resets anyway; without the wait the reset could overtake bytes still queued in the guest's
/// vsock transport or in the VMM.
const ACK_WITHIN: Duration = Duration::from_secs(3);
/// The reattach answer is one short line.
const MAX_ANSWER: usize = 256;

/// Where the stream stands.
enum State {
    /// Connected: signals come in on this stream.
    Up(UnixStream),
    /// The stream ended; the control thread is connecting again.
    Reattaching,
    /// The outcome is on its way: the end of the stream is the host's acknowledgement.
    Reporting,
    /// The host is gone: the workspace is being stopped.
    Gone,
}

/// The control stream of a running workspace, shared by the thread that reads the host's
/// signals (and reattaches) and the main thread that reports the outcome.
pub(crate) struct Link {
    state: Mutex<State>,
    changed: Condvar,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, state: State) {
        *self.state() = state;
        self.changed.notify_all();
    }

    /// The link over `stream`, the control stream the workspace came on. Nothing reads it
    /// until [`Link::listen`]; [`Link::report`] works from the start (a setup that failed).
    pub(crate) fn new(stream: UnixStream) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Up(stream)),
            changed: Condvar::new(),
        })
    }

    /// Starts reading the host's signals on a thread of its own: each is passed to `raise`.
    /// When the stream ends before the outcome is reported, the thread reattaches
    /// ([`reattach`]); if that fails it says why on the console and calls `host_gone`, which
    /// stops the workspace and never returns.
    pub(crate) fn listen(
        self: &Arc<Self>,
        raise: impl Fn(control::VmSignal) + Send + 'static,
        host_gone: fn() -> !,
    ) -> std::io::Result<()> {
        let reader = match &*self.state() {
            State::Up(s) => s.try_clone()?,
            _ => return Ok(()),
        };
        // The workspace came with a read timeout; signals may come at any time, or never.
        reader.set_read_timeout(None)?;
        let shared = Arc::clone(self);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || shared.serve(reader, &raise, host_gone))?;
        Ok(())
    }

    fn serve(
        &self,
        mut stream: UnixStream,
        raise: &dyn Fn(control::VmSignal),
        host_gone: fn() -> !,
    ) {
        loop {
            read_signals(&stream, raise);
            {
                let mut state = self.state();
                if !matches!(*state, State::Up(_)) {
                    // The outcome is being reported: its end is the host's acknowledgement.
                    return;
                }
                *state = State::Reattaching;
            }
            match reattach().and_then(|s| s.try_clone().map(|c| (s, c))) {
                Ok((s, reader)) => {
                    // Nothing is printed: the console is the agent's output.
                    let mut state = self.state();
                    if !matches!(*state, State::Reattaching) {
                        // The report went ahead meanwhile (it waited as long as it may).
                        return;
                    }
                    *state = State::Up(s);
                    drop(state);
                    self.changed.notify_all();
                    stream = reader;
                }
                Err(e) => {
                    self.set(State::Gone);
                    eprintln!(
                        "moat guest-init: the host is gone (the control stream ended and \
                         cannot be reattached: {e}); stopping the workspace"
                    );
                    host_gone();
                }
            }
        }
    }

    /// Whether the host is gone: the link's thread then stops the workspace and resets the VM.
    pub(crate) fn host_gone(&self) -> bool {
        matches!(*self.state(), State::Gone)
    }

    /// Writes the outcome and waits (at most [`ACK_WITHIN`]) for the host to close the stream:
    /// its acknowledgement. A reattach under way is waited for first; a stream reset under
    /// the report (a snapshot as the agent ended) is reattached once and the outcome sent
    /// again. With the host gone, nothing is sent.
    pub(crate) fn report(&self, outcome: &VmOutcome) {
        let stream = {
            let deadline = Instant::now() + 2 * REATTACH_WITHIN;
            let mut state = self.state();
            while matches!(*state, State::Reattaching) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            match std::mem::replace(&mut *state, State::Reporting) {
                State::Up(s) => Some(s),
                State::Gone => {
                    *state = State::Gone;
                    None
                }
                State::Reattaching | State::Reporting => None,
            }
        };
        let Some(stream) = stream else {
            eprintln!("moat guest-init: the host is gone: the outcome goes nowhere");
            return;
        };
        if deliver(stream, outcome) == Delivery::Reset {
            match reattach() {
                Ok(again) => {
                    if deliver(again, outcome) == Delivery::Reset {
                        eprintln!("moat guest-init: cannot report to the host: reset twice");
                    }
                }
                Err(e) => eprintln!("moat guest-init: cannot report to the host: {e}"),
            }
        }
    }
}

/// Reads signal lines until the stream ends; a line that is not a signal is skipped.
fn read_signals(stream: &UnixStream, raise: &dyn Fn(control::VmSignal)) {
    let mut reader = std::io::BufReader::new(stream);
    while let Ok(line) = control::read_line(&mut reader) {
        match control::parse::<control::VmSignal>(&line) {
            Ok(signal) => raise(signal),
            Err(_) => {
                eprintln!("moat guest-init: the host sent a control line that is not a signal");
            }
        }
    }
}

/// How a report went.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Written; the host closed the stream after it (or did not within [`ACK_WITHIN`]).
    Done,
    /// The stream was reset before it could be written.
    Reset,
}

fn deliver(mut stream: UnixStream, outcome: &VmOutcome) -> Delivery {
    let sent = stream
        .write_all(&control::encode(outcome))
        .and_then(|()| stream.shutdown(std::net::Shutdown::Write));
    if sent.is_err() {
        // The stream was reset before the outcome went (a snapshot as the agent ended).
        return Delivery::Reset;
    }
    // The host's close ends the wait: as end of file, or as a reset once both sides are shut
    // (how moat-vmm passes a close on). A snapshot that resets the stream in the moment after
    // the write looks the same: that outcome is lost, and `moat run` says the VM stopped
    // without one.
    let _ = stream.set_read_timeout(Some(ACK_WITHIN));
    let mut sink = [0u8; 64];
    let deadline = Instant::now() + ACK_WITHIN;
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Delivery::Done
}

/// After a transport reset: reseeds the RNG, connects the control port again and asks the
/// host to take this VM back. Ok only with the answer of the `moat run` that started it.
pub(crate) fn reattach() -> std::io::Result<UnixStream> {
    use std::io::{Error, ErrorKind};
    crate::vm::reseed_rng().map_err(|e| Error::new(e.kind(), format!("cannot reseed: {e}")))?;
    let deadline = Instant::now() + REATTACH_WITHIN;
    let mut stream = loop {
        match moat_netstack::vsock_connect(moat_netstack::HOST_CID, control::CONTROL_VSOCK_PORT) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::new(
                    e.kind(),
                    format!("nothing answers on the control port: {e}"),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream.set_read_timeout(Some(left))?;
    stream.write_all(&control::encode(&control::VmReattach::Reattach))?;
    // Byte by byte, to the newline: whatever the host sends next (a signal) stays unread.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() <= MAX_ANSWER {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the host closed the control stream",
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("the host did not answer within {REATTACH_WITHIN:?}"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    control::parse::<control::VmReattached>(&line).map_err(|_| {
        Error::new(
            ErrorKind::InvalidData,
            "the host answered as another workspace's host",
        )
    })?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}
