//! moat-netstack: the workspace's only network path. TUN -> smoltcp -> one flow stream per TCP
//! connection, with a virtual DNS that never lets a query leave the workspace.
//!
//! Hop in the data path: the agent's kernel routes everything to the TUN device; this crate
//! (inside guest-init) terminates TCP in userspace, and for every connection opens a stream to
//! the host ([`transport`]: vsock in a VM, a Unix socket in the namespace backend), writes a
//! `moat-flow-header` naming the destination and, when the agent looked it up through the
//! virtual DNS, the hostname; then splices with backpressure, FIN and RST carried both ways.
//!
//! Invariants: the netstack decides nothing (policy is the host's); no packet reaches the
//! host except as flow-stream payload; everything that is not TCP or DNS-to-the-gateway is
//! dropped and counted; flows and buffers are bounded.

pub mod dns;
pub mod pool;
pub mod stack;
#[allow(unsafe_code)]
mod sys;
pub mod transport;

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

pub use stack::{Counters, GATEWAY, GUEST_ADDR, Limits, MTU, PacketIo, Stack, Tun};
pub use transport::{FlowTransport, UnixTransport, VsockTransport};

/// Name of the workspace's TUN interface.
pub const TUN_NAME: &str = "moat0";

/// Creates the TUN interface, gives the workspace side its address with the default route
/// through it, and brings up loopback. Needs CAP_NET_ADMIN in the network namespace.
pub fn setup_tun() -> io::Result<Tun> {
    let fd = sys::open_tun(TUN_NAME)?;
    sys::configure(
        TUN_NAME,
        Some((GUEST_ADDR, 24)),
        Some(u32::try_from(MTU).unwrap_or(1500)),
    )?;
    sys::add_default_route(TUN_NAME, GATEWAY)?;
    sys::configure("lo", None, None)?;
    Ok(Tun(fd))
}

/// Runs the stack on a TUN device forever (until an I/O error on the poller).
pub fn run(tun: Tun, transport: Box<dyn FlowTransport>, limits: Limits) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let tun_fd = tun.0.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&tun_fd), Token(0), Interest::READABLE)?;
    let mut stack = Stack::new(tun, transport, limits, smoltcp::time::Instant::now());
    let mut registered: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let mut events = Events::with_capacity(1024);
    loop {
        let delay = stack.step(smoltcp::time::Instant::now());
        // (Re)register flow streams: edge-triggered wakeups; every step pumps every flow, so a
        // missed edge only delays, never loses, bytes.
        let live: std::collections::HashSet<i32> =
            stack.streams().map(AsRawFd::as_raw_fd).collect();
        for fd in live.difference(&registered) {
            let _ = poll.registry().register(
                &mut SourceFd(fd),
                Token(1),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
        registered = live;
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
