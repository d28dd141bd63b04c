//! Deterministic simulation of the netstack (in the style of smoltcp's tests/netsim.rs): a
//! client TCP/IP stack (smoltcp) talks to [`moat_netstack::Stack`] over a simulated wire with
//! seeded loss, reordering and delay, on a virtual clock. The host side of each flow is one end
//! of a socketpair that echoes what it gets after reading the flow header.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use std::net::SocketAddrV4;

use moat_flow_header::{FlowHeader, Program, ProgramPath};
use moat_netstack::{FlowTransport, GATEWAY, GUEST_ADDR, Limits, PacketIo, ProgramLookup, Stack};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// xorshift64*: a seeded, reproducible generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One direction of the wire: packets with the virtual time they arrive.
#[derive(Default)]
struct Lane(VecDeque<(i64, Vec<u8>)>);

struct Wire {
    now: i64,
    rng: Rng,
    loss: u64,
    max_delay: u64,
    to_stack: Lane,
    to_client: Lane,
}

impl Wire {
    fn put(&mut self, to_stack: bool, packet: Vec<u8>) {
        if self.rng.chance(self.loss) {
            return;
        }
        // A random delay per packet reorders packets too.
        let jitter = i64::try_from(self.rng.next() % (self.max_delay + 1)).unwrap_or(0);
        let at = self.now + 1 + jitter;
        let lane = if to_stack {
            &mut self.to_stack
        } else {
            &mut self.to_client
        };
        lane.0.push_back((at, packet));
    }
    fn take(&mut self, to_stack: bool) -> Option<Vec<u8>> {
        let now = self.now;
        let lane = if to_stack {
            &mut self.to_stack
        } else {
            &mut self.to_client
        };
        let i = lane.0.iter().position(|(at, _)| *at <= now)?;
        lane.0.remove(i).map(|(_, p)| p)
    }
}

#[derive(Clone)]
struct StackSide(Rc<RefCell<Wire>>);

impl PacketIo for StackSide {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.0.borrow_mut().take(true).map(|p| {
            buf[..p.len()].copy_from_slice(&p);
            p.len()
        }))
    }
    fn send(&mut self, packet: &[u8]) {
        self.0.borrow_mut().put(false, packet.to_vec());
    }
}

struct ClientSide(Rc<RefCell<Wire>>);
struct Rx(Vec<u8>);
struct Tx(Rc<RefCell<Wire>>);
impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for Tx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.borrow_mut().put(true, buf);
        r
    }
}
impl Device for ClientSide {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx)> {
        let p = self.0.borrow_mut().take(false)?;
        Some((Rx(p), Tx(Rc::clone(&self.0))))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx> {
        Some(Tx(Rc::clone(&self.0)))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

/// Hands the stack one end of a socketpair per flow and keeps the other for the test.
#[derive(Clone, Default)]
struct PairTransport(Arc<Mutex<Vec<UnixStream>>>);
impl FlowTransport for PairTransport {
    fn connect(&self) -> io::Result<UnixStream> {
        let (ours, host) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        host.set_nonblocking(true)?;
        self.0.lock().unwrap().push(host);
        Ok(ours)
    }
}

/// The host end of one flow: reads the header, then echoes.
#[derive(Default)]
struct Host {
    buf: Vec<u8>,
    header: Option<FlowHeader>,
    eof: bool,
    shut: bool,
}

impl Host {
    fn pump(&mut self, s: &mut UnixStream) {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        if self.header.is_none()
            && let Ok(Some((h, used))) = FlowHeader::decode(&self.buf)
        {
            self.header = Some(h);
            self.buf.drain(..used);
        }
        if self.header.is_some()
            && !self.buf.is_empty()
            && let Ok(n) = s.write(&self.buf)
        {
            self.buf.drain(..n);
        }
        // Echo everything, then pass the end of stream back.
        if self.eof && self.buf.is_empty() && !self.shut {
            self.shut = true;
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Sends `total` bytes from the client to 203.0.113.7:443 through the stack and reads the
/// echo back, on a wire with `loss` percent loss and up to `max_delay` ms of jitter.
fn echo_through_stack(
    seed: u64,
    loss: u64,
    max_delay: u64,
    total: usize,
) -> (Vec<u8>, FlowHeader, usize) {
    echo_with_programs(seed, loss, max_delay, total, None)
}

/// [`echo_through_stack`], with the stack asking `programs` who opened each connection.
fn echo_with_programs(
    seed: u64,
    loss: u64,
    max_delay: u64,
    total: usize,
    programs: Option<Box<dyn ProgramLookup>>,
) -> (Vec<u8>, FlowHeader, usize) {
    let wire = Rc::new(RefCell::new(Wire {
        now: 0,
        rng: Rng(seed),
        loss,
        max_delay,
        to_stack: Lane::default(),
        to_client: Lane::default(),
    }));
    let transport = PairTransport::default();
    let mut stack = Stack::new(
        StackSide(Rc::clone(&wire)),
        Box::new(transport.clone()),
        Limits::default(),
        Instant::from_millis(0),
    );
    if let Some(lookup) = programs {
        stack.set_programs(lookup, None).unwrap();
    }

    let mut client_dev = ClientSide(Rc::clone(&wire));
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ip),
        &mut client_dev,
        Instant::from_millis(0),
    );
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv4(GUEST_ADDR), 24))
            .unwrap();
    });
    iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
    let mut sockets = SocketSet::new(vec![]);
    let sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        tcp::SocketBuffer::new(vec![0; 64 * 1024]),
    );
    let h = sockets.add(sock);
    sockets
        .get_mut::<tcp::Socket<'_>>(h)
        .connect(
            iface.context(),
            (Ipv4Address::new(203, 0, 113, 7), 443),
            40000,
        )
        .unwrap();

    let payload: Vec<u8> = (0..total)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let (mut sent, mut got) = (0usize, Vec::new());
    let mut hosts: Vec<Host> = Vec::new();
    for ms in 0..600_000i64 {
        wire.borrow_mut().now = ms;
        let now = Instant::from_millis(ms);
        iface.poll(now, &mut client_dev, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket<'_>>(h);
        if s.can_send() && sent < payload.len() {
            sent += s.send_slice(&payload[sent..]).unwrap();
        }
        if sent == payload.len() && s.may_send() {
            s.close();
        }
        while s.can_recv() {
            let mut buf = [0u8; 4096];
            let n = s.recv_slice(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        iface.poll(now, &mut client_dev, &mut sockets);
        stack.step(now);
        let mut streams = transport.0.lock().unwrap();
        hosts.resize_with(streams.len(), Host::default);
        for (stream, host) in streams.iter_mut().zip(hosts.iter_mut()) {
            host.pump(stream);
        }
        drop(streams);
        stack.step(now);
        if got.len() == total && !sockets.get::<tcp::Socket<'_>>(h).may_recv() {
            break;
        }
    }
    let header = hosts
        .first()
        .and_then(|h| h.header.clone())
        .expect("no flow reached the host");
    // Let the last ACKs and FINs settle, then count the flows the stack still holds.
    let end = wire.borrow().now;
    for ms in end..end + 2_000 {
        wire.borrow_mut().now = ms;
        iface.poll(Instant::from_millis(ms), &mut client_dev, &mut sockets);
        stack.step(Instant::from_millis(ms));
    }
    (got, header, stack.flows())
}

fn expected(total: usize) -> Vec<u8> {
    (0..total)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect()
}

/// Compares without printing megabytes: the lengths, then the first differing offset.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "{what}: first differing byte");
}

#[test]
fn bytes_arrive_intact_on_a_clean_wire() {
    let (got, header, _) = echo_through_stack(1, 0, 0, 200_000);
    assert_same(&got, &expected(200_000), "clean wire");
    assert_eq!(header.destination, "203.0.113.7:443".parse().unwrap());
    assert_eq!(header.hostname, None);
}

#[test]
fn bytes_arrive_intact_with_loss_reordering_and_delay() {
    for seed in [7, 42, 1234] {
        let (got, _, _) = echo_through_stack(seed, 5, 20, 100_000);
        assert_same(&got, &expected(100_000), &format!("seed {seed}"));
    }
}

#[test]
fn fin_from_the_agent_reaches_the_host_and_the_hosts_fin_comes_back() {
    // The echo host shuts down its side after seeing our FIN; the client's socket then sees
    // the end of the stream (may_recv false), which is what ends the loop above.
    let (got, _, live) = echo_through_stack(3, 2, 5, 10_000);
    assert_same(&got, &expected(10_000), "fin");
    // Both FINs exchanged: the stack has forgotten the flow.
    assert_eq!(live, 0);
}

/// A lookup that names one program and remembers what it was asked.
struct FixedLookup {
    program: Option<Program>,
    asked: Arc<Mutex<Vec<(SocketAddrV4, SocketAddrV4)>>>,
}

impl ProgramLookup for FixedLookup {
    fn program_of(&mut self, agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program> {
        self.asked.lock().unwrap().push((agent, destination));
        self.program.clone()
    }
}

#[test]
fn a_flow_header_names_the_program_the_lookup_found_for_its_syn() {
    let curl = Program::new(
        12,
        ProgramPath::new("/usr/bin/curl").unwrap(),
        Some([9; 32]),
    );
    let asked = Arc::new(Mutex::new(Vec::new()));
    let lookup = FixedLookup {
        program: Some(curl.clone()),
        asked: Arc::clone(&asked),
    };
    let (got, header, _) = echo_with_programs(5, 0, 0, 1_000, Some(Box::new(lookup)));
    assert_same(&got, &expected(1_000), "with a program");
    assert_eq!(header.program, Some(curl));
    assert_eq!(
        *asked.lock().unwrap(),
        vec![(
            SocketAddrV4::new(GUEST_ADDR, 40000),
            "203.0.113.7:443".parse().unwrap()
        )]
    );
}

#[test]
fn a_flow_whose_program_is_unknown_carries_none() {
    let lookup = FixedLookup {
        program: None,
        asked: Arc::default(),
    };
    let (_, header, _) = echo_with_programs(6, 0, 0, 1_000, Some(Box::new(lookup)));
    assert_eq!(header.program, None);
    assert_eq!(header.version(), moat_flow_header::VERSION_1);
}

#[test]
fn without_a_lookup_headers_stay_version_1() {
    let (_, header, _) = echo_through_stack(1, 0, 0, 1_000);
    assert_eq!(header.version(), moat_flow_header::VERSION_1);
    assert_eq!(header.program, None);
}

/// A lookup that answers at once, except for connections to `slow`, whose answer waits until
/// the test opens the gate (or 10 s pass, which the test counts as a failure).
struct GatedLookup {
    slow: SocketAddrV4,
    gate: std::sync::mpsc::Receiver<()>,
    gate_timed_out: Arc<Mutex<bool>>,
    program: Program,
}

impl ProgramLookup for GatedLookup {
    fn program_of(&mut self, _agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program> {
        if destination == self.slow
            && self
                .gate
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_err()
        {
            *self.gate_timed_out.lock().unwrap() = true;
        }
        Some(self.program.clone())
    }
}

#[test]
fn a_slow_program_lookup_holds_only_its_own_connection() {
    // Connection A is open and moving bytes when B's SYN arrives and its lookup stalls (the
    // first hash of a large executable): A must finish while B's lookup is still waiting,
    // then B must open with its program once the lookup answers. A lookup run on the stack's
    // own thread stalls A too: the gate then times out.
    let (fast, slow): (SocketAddrV4, SocketAddrV4) = (
        "203.0.113.7:443".parse().unwrap(),
        "203.0.113.8:443".parse().unwrap(),
    );
    let (open_gate, gate) = std::sync::mpsc::channel();
    let gate_timed_out = Arc::new(Mutex::new(false));
    let program = Program::new(1, ProgramPath::new("/usr/bin/git").unwrap(), None);
    let wire = Rc::new(RefCell::new(Wire {
        now: 0,
        rng: Rng(9),
        loss: 0,
        max_delay: 0,
        to_stack: Lane::default(),
        to_client: Lane::default(),
    }));
    let transport = PairTransport::default();
    let mut stack = Stack::new(
        StackSide(Rc::clone(&wire)),
        Box::new(transport.clone()),
        Limits::default(),
        Instant::from_millis(0),
    );
    let lookup = GatedLookup {
        slow,
        gate,
        gate_timed_out: Arc::clone(&gate_timed_out),
        program: program.clone(),
    };
    stack.set_programs(Box::new(lookup), None).unwrap();

    let mut client_dev = ClientSide(Rc::clone(&wire));
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ip),
        &mut client_dev,
        Instant::from_millis(0),
    );
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv4(GUEST_ADDR), 24))
            .unwrap();
    });
    iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
    let mut sockets = SocketSet::new(vec![]);
    let mut socket = || {
        sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        ))
    };
    let (a, b) = (socket(), socket());
    sockets
        .get_mut::<tcp::Socket<'_>>(a)
        .connect(iface.context(), (*fast.ip(), fast.port()), 40000)
        .unwrap();

    let total = 200_000;
    let payload = expected(total);
    let (mut sent, mut got) = (0usize, Vec::new());
    let (mut b_connected, mut gate_opened, mut a_done_while_b_waited) = (false, false, false);
    let mut b_got = Vec::new();
    let mut hosts: Vec<Host> = Vec::new();
    for ms in 1..600_000i64 {
        wire.borrow_mut().now = ms;
        let now = Instant::from_millis(ms);
        iface.poll(now, &mut client_dev, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket<'_>>(a);
        if s.can_send() && sent < payload.len() {
            sent += s.send_slice(&payload[sent..]).unwrap();
        }
        if sent == payload.len() && s.may_send() {
            s.close();
        }
        while s.can_recv() {
            let mut buf = [0u8; 4096];
            let n = s.recv_slice(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        // B connects once A is well under way.
        if !b_connected && got.len() >= total / 10 {
            b_connected = true;
            sockets
                .get_mut::<tcp::Socket<'_>>(b)
                .connect(iface.context(), (*slow.ip(), slow.port()), 40001)
                .unwrap();
        }
        let a_done = got.len() == total && !sockets.get::<tcp::Socket<'_>>(a).may_recv();
        if a_done && !gate_opened {
            // A finished: B must not have been answered yet (its lookup is at the gate).
            a_done_while_b_waited = !sockets.get::<tcp::Socket<'_>>(b).may_send();
            gate_opened = true;
            open_gate.send(()).unwrap();
        }
        let sb = sockets.get_mut::<tcp::Socket<'_>>(b);
        if sb.can_send() && b_got.is_empty() && sb.send_queue() == 0 {
            sb.send_slice(b"ping").unwrap();
        }
        while sb.can_recv() {
            let mut buf = [0u8; 64];
            let n = sb.recv_slice(&mut buf).unwrap();
            b_got.extend_from_slice(&buf[..n]);
        }
        iface.poll(now, &mut client_dev, &mut sockets);
        stack.step(now);
        let mut streams = transport.0.lock().unwrap();
        hosts.resize_with(streams.len(), Host::default);
        for (stream, host) in streams.iter_mut().zip(hosts.iter_mut()) {
            host.pump(stream);
        }
        drop(streams);
        stack.step(now);
        if a_done && b_got.len() >= 4 {
            break;
        }
    }
    assert!(
        !*gate_timed_out.lock().unwrap(),
        "the open flow waited for another connection's program lookup"
    );
    assert!(
        a_done_while_b_waited,
        "A did not finish while B's lookup waited"
    );
    assert_same(&got, &expected(total), "the flow that was open");
    assert_eq!(
        b_got, b"ping",
        "the held connection after its lookup answered"
    );
    let headers: Vec<_> = hosts.iter().map(|h| h.header.clone().unwrap()).collect();
    assert_eq!(headers.len(), 2);
    assert_eq!(headers[1].destination, std::net::SocketAddr::V4(slow));
    assert_eq!(headers[1].program, Some(program));
}

/// A lookup that panics (a bug in it): the lookup thread ends.
struct PanickingLookup;

impl ProgramLookup for PanickingLookup {
    fn program_of(&mut self, _: SocketAddrV4, _: SocketAddrV4) -> Option<Program> {
        panic!("a lookup that fails");
    }
}

#[test]
fn a_connection_held_by_a_lookup_that_panics_goes_on_with_no_program() {
    // The held SYN must not wait forever for an answer that cannot come.
    let (got, header, _) = echo_with_programs(8, 0, 0, 1_000, Some(Box::new(PanickingLookup)));
    assert_same(&got, &expected(1_000), "after the lookup thread ended");
    assert_eq!(header.program, None);
}
