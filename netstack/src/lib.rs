//! moat-netstack: the workspace's only network path. TUN -> smoltcp -> one flow stream per TCP
//! connection, with a virtual DNS that never lets a query leave the workspace.
//!
//! Hop in the data path: the agent's kernel routes everything to the TUN device; this crate
//! (inside guest-init) terminates TCP in userspace, and for every connection opens a stream to
//! the host ([`transport`]: vsock in a VM, a Unix socket in the namespace backend), writes a
//! `moat-flow-header` naming the destination and, when the agent looked it up through the
//! virtual DNS, the hostname; then splices with backpressure, FIN and RST carried both ways.
//!
//! Modules: [`stack`] (TUN packets -> SYN and DNS inspection -> smoltcp -> flow pumps), [`dns`]
//! and [`pool`] (the virtual DNS over 198.18.0.0/15), [`transport`] (Unix socket or vsock),
//! [`program`] (who opened a connection, asked at its SYN), `sys` (TUN ioctls).
//!
//! Invariants: the netstack decides nothing (policy is the host's); no packet reaches the
//! host except as flow-stream payload; everything that is not TCP or DNS-to-the-gateway is
//! dropped and counted; flows and buffers are bounded.

pub mod dns;
pub mod local;
pub mod pool;
pub mod program;
pub mod stack;
#[allow(unsafe_code)]
mod sys;
pub mod transport;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

pub use local::{LocalRoute, LocalRoutes};
pub use program::ProgramLookup;
pub use stack::{Counters, GATEWAY, GUEST_ADDR, Limits, MTU, PacketIo, Stack, Tun};
pub use sys::{VsockListener, vsock_connect};
pub use transport::{FlowTransport, UnixTransport, VsockTransport};

/// The host's vsock context id, as every guest sees it.
pub const HOST_CID: u32 = 2;

/// Name of the workspace's TUN interface.
pub const TUN_NAME: &str = "moat0";
/// Packets the kernel may queue towards the netstack.
pub const TUN_TX_QUEUE: u32 = 8192;

/// Creates the TUN interface, gives the workspace side its address with the default route
/// through it, and brings up loopback. Needs CAP_NET_ADMIN in the network namespace.
pub fn setup_tun() -> io::Result<Tun> {
    let fd = sys::open_tun(TUN_NAME)?;
    // A long queue towards the netstack: under a burst (100 parallel downloads) the kernel
    // must not drop packets (DNS queries, ACKs) while the netstack is busy.
    sys::configure(
        TUN_NAME,
        Some((GUEST_ADDR, 24)),
        Some(u32::try_from(MTU).unwrap_or(1500)),
        Some(TUN_TX_QUEUE),
    )?;
    sys::add_default_route(TUN_NAME, GATEWAY)?;
    sys::configure("lo", None, None, None)?;
    Ok(Tun(fd))
}

/// Packets queued between the TUN reader thread and the stack.
const RX_QUEUE: usize = 16 * 1024;

/// Runs the stack on a TUN device forever (until an I/O error on the poller). With `programs`
/// (only for a host that reads flow header version 2), every flow header names the program
/// that opened the connection, where the lookup can tell.
///
/// A reader thread drains the TUN device into a queue as fast as the kernel fills it (the
/// kernel's own queue is short and would drop DNS queries and ACKs whenever the stack is busy
/// writing); the stack thread takes packets from that queue, runs smoltcp and moves bytes.
pub fn run(
    tun: Tun,
    transport: Box<dyn FlowTransport>,
    limits: Limits,
    programs: Option<Box<dyn ProgramLookup>>,
    local: LocalRoutes,
) -> io::Result<()> {
    let fd = Arc::new(tun.0);
    let mut poll = Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), Token(0))?);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(RX_QUEUE);
    {
        let (fd, waker) = (Arc::clone(&fd), Arc::clone(&waker));
        std::thread::Builder::new()
            .name("tun-reader".into())
            .spawn(move || read_tun(&fd, &tx, &waker))?;
    }
    let io = QueuedTun { rx, fd };
    let mut stack = Stack::new(io, transport, limits, smoltcp::time::Instant::now());
    if let Some(lookup) = programs {
        let waker = Arc::clone(&waker);
        stack.set_programs(
            lookup,
            Some(Box::new(move || {
                let _ = waker.wake();
            })),
        )?;
    }
    stack.set_local_routes(local);
    let mut events = Events::with_capacity(1024);
    loop {
        let delay = stack.step(smoltcp::time::Instant::now());
        // Edge-triggered wakeups for new flow streams; every step pumps every flow, so a
        // missed edge only delays, never loses, bytes. Closed streams leave epoll by themselves.
        for fd in stack.take_new_streams() {
            let _ = poll.registry().register(
                &mut SourceFd(&fd),
                Token(1),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
        let timeout = delay
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_millis(500))
            .min(Duration::from_millis(500));
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The reader thread: blocks until the TUN device is readable, reads everything waiting,
/// queues it and wakes the stack. Packets that find the queue full are dropped (as a NIC
/// drops when its ring is full); TCP retransmits them.
fn read_tun(fd: &OwnedFd, tx: &std::sync::mpsc::SyncSender<Vec<u8>>, waker: &mio::Waker) {
    let Ok(mut poll) = Poll::new() else { return };
    let raw = fd.as_raw_fd();
    if poll
        .registry()
        .register(&mut SourceFd(&raw), Token(0), Interest::READABLE)
        .is_err()
    {
        return;
    }
    let mut events = Events::with_capacity(4);
    let mut buf = vec![0u8; MTU + 64];
    loop {
        loop {
            match sys::read_packet(fd, &mut buf) {
                Ok(Some(n)) => {
                    if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) =
                        tx.try_send(buf[..n].to_vec())
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let _ = waker.wake();
        if let Err(e) = poll.poll(&mut events, None)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return;
        }
    }
}

/// The stack's side of the TUN device: packets from the reader thread's queue, writes
/// straight to the device.
#[derive(Debug)]
struct QueuedTun {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    fd: Arc<OwnedFd>,
}

impl PacketIo for QueuedTun {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.rx.try_recv() {
            Ok(p) => {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                Ok(Some(n))
            }
            Err(_) => Ok(None),
        }
    }
    fn send(&mut self, packet: &[u8]) {
        let _ = sys::write_packet(&self.fd, packet);
    }
}
