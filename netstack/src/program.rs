//! Who opened a flow: the seam through which guest-init tells the netstack which program owns
//! the agent's connecting socket. The netstack asks once per connection, when it first sees the
//! SYN, and holds that SYN unanswered until the answer comes: the socket then stays in the
//! workspace kernel's table in SYN_SENT, owned by the process that called `connect`, which
//! cannot yet hand a connected socket on. The answer goes in the flow header (version 2) when
//! the handshake completes.
//!
//! Lookups run on a thread of their own (`ProgramWorker`), one at a time in SYN order: a
//! slow one (the first hash of a large executable) delays the connections that wait behind it,
//! never the bytes of flows already open.
//!
//! The netstack decides nothing with it: the answer is the guest's claim, which the egress
//! proxy's rules may only use to narrow what the destination allows. guest-init's lookup
//! (`moat_guest_init::program`) reads the kernel's socket table and `/proc`; tests plug in
//! their own.

use std::io;
use std::net::SocketAddrV4;
use std::sync::mpsc;

use moat_flow_header::Program;

/// Finds the program that opened a connection.
pub trait ProgramLookup: Send {
    /// The program owning the workspace socket `agent -> destination`, if it can be told.
    /// Called on the lookup thread for every new connection, in order: it must bound its own
    /// work, since the connections behind it wait.
    fn program_of(&mut self, agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program>;
}

/// A connection: (agent address, destination).
type Key = (SocketAddrV4, SocketAddrV4);

/// The lookup thread and the two channels to it. Dropping this ends the thread (after the
/// lookup it is in, if any).
pub(crate) struct ProgramWorker {
    requests: mpsc::Sender<Key>,
    answers: mpsc::Receiver<(Key, Option<Program>)>,
}

impl ProgramWorker {
    /// Starts the thread; `wake` is called after each answer is queued.
    pub(crate) fn spawn(
        mut lookup: Box<dyn ProgramLookup>,
        wake: Option<Box<dyn Fn() + Send>>,
    ) -> io::Result<Self> {
        let (requests, asked) = mpsc::channel::<Key>();
        let (answer, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("program-lookup".into())
            .spawn(move || {
                for key in asked {
                    let program = lookup.program_of(key.0, key.1);
                    if answer.send((key, program)).is_err() {
                        return;
                    }
                    if let Some(wake) = &wake {
                        wake();
                    }
                }
            })?;
        Ok(ProgramWorker { requests, answers })
    }

    /// Asks for the program of `key`; false if the thread has ended.
    pub(crate) fn ask(&self, key: Key) -> bool {
        self.requests.send(key).is_ok()
    }

    /// The answers ready now, without waiting, and whether the thread has ended (a lookup
    /// that panicked): then no held SYN will ever be answered.
    pub(crate) fn answers(&self) -> (Vec<(Key, Option<Program>)>, bool) {
        let mut ready = Vec::new();
        loop {
            match self.answers.try_recv() {
                Ok(answer) => ready.push(answer),
                Err(mpsc::TryRecvError::Empty) => return (ready, false),
                Err(mpsc::TryRecvError::Disconnected) => return (ready, true),
            }
        }
    }
}
