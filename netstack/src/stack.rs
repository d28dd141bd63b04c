//! The userspace network stack: packets from the workspace's TUN device go through smoltcp;
//! every TCP connection becomes one flow stream to the host, opened with a flow header.
//!
//! ```text
//!  TUN fd --read--> inspect (SYN? DNS? drop) --> smoltcp Interface (any-ip) --> TCP sockets
//!                                                                      |  pump (backpressure)
//!  TUN fd <-write-- smoltcp egress <------------------------------------+--> flow streams
//! ```
//!
//! A SYN to a destination not seen before gets a fresh listening socket bound to exactly that
//! destination, before smoltcp sees the SYN; so the stack accepts TCP to any address while
//! every socket still belongs to one connection. Where flow headers name the calling program,
//! the SYN is first held until the lookup thread names it ([`crate::program`]). UDP to the virtual DNS address is answered
//! locally; every other UDP datagram, ICMP and anything else is dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moat_flow_header::{FlowHeader, Hostname, Program, Transport as WireTransport};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
    UdpPacket,
};

use crate::dns;
use crate::pool::FakePool;
use crate::program::{ProgramLookup, ProgramWorker};
use crate::transport::FlowTransport;

/// The netstack's own address on the workspace network (gateway and DNS server).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The workspace kernel's address on its TUN interface.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// MTU of the TUN interface: as large as loopback's, so the workspace kernel sends 64 KiB TCP
/// segments and every packet costs one system call for 64 KiB instead of 1.5 KiB
/// (measured: 2.6 -> 5.7 Gbit/s for one flow).
pub const MTU: usize = 65520;
/// Bytes of socket buffer per direction per TCP flow.
const TCP_BUFFER: usize = 256 * 1024;
/// Bytes of socket buffer per direction for a DNS-over-TCP connection (one largest message).
const DNS_TCP_BUFFER: usize = 64 * 1024 + 2;
/// SYNs held at once while their program is looked up; more are dropped (and sent again by
/// the agent's kernel a second later), bounding the memory a burst of connects can hold.
const MAX_HELD_SYNS: usize = 256;

/// Bounds of the stack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent TCP flows; SYNs beyond it are answered with RST.
    pub max_flows: usize,
    /// Packets read from the device per step.
    pub rx_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 1024,
            rx_batch: 1024,
        }
    }
}

/// Counters, readable from other threads.
#[derive(Debug, Default)]
pub struct Counters {
    /// TCP flows accepted and handed to the host.
    pub flows_opened: AtomicU64,
    /// SYNs refused because the flow limit was reached.
    pub flows_over_limit: AtomicU64,
    /// Flow streams that could not be opened to the host.
    pub transport_errors: AtomicU64,
    /// DNS queries answered.
    pub dns_queries: AtomicU64,
    /// Flows whose program the lookup could not tell (only counted with a lookup).
    pub programs_unknown: AtomicU64,
    /// SYNs dropped because too many were already waiting for their program's lookup (the
    /// agent's kernel sends them again).
    pub syns_over_lookup_limit: AtomicU64,
    /// UDP datagrams dropped (anything but DNS to the gateway).
    pub dropped_udp: AtomicU64,
    /// ICMP packets dropped.
    pub dropped_icmp: AtomicU64,
    /// Other packets dropped (IPv6, unknown protocols, malformed).
    pub dropped_other: AtomicU64,
}

/// Where packets come from and go to: the TUN device, or a simulated wire in tests.
pub trait PacketIo {
    /// Reads one packet into `buf`; `Ok(None)` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one packet (best effort: a drop is retransmitted by TCP).
    fn send(&mut self, packet: &[u8]);
}

/// An open, configured TUN device (see [`crate::setup_tun`] and [`crate::run`]).
#[derive(Debug)]
pub struct Tun(pub OwnedFd);

/// smoltcp's view of the device: received packets come from a queue filled (and inspected)
/// by the stack; transmitted packets go straight to the [`PacketIo`].
struct QueueDevice<'a, P: PacketIo> {
    rx: &'a mut VecDeque<Vec<u8>>,
    io: &'a mut P,
}

struct RxToken(Vec<u8>);
struct TxToken<'a, P: PacketIo>(&'a mut P);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl<P: PacketIo> phy::TxToken for TxToken<'_, P> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.send(&buf);
        r
    }
}

impl<P: PacketIo> Device for QueueDevice<'_, P> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b, P>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_, P>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(self.io)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_, P>> {
        Some(TxToken(self.io))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// One TCP connection and its stream to the host.
struct Flow {
    /// DNS over TCP to the gateway: answered here, never sent to the host.
    dns: bool,
    /// (agent address, destination) of the connection.
    key: (SocketAddrV4, SocketAddrV4),
    stream: Option<UnixStream>,
    /// Bytes for the host not yet written (the header, at first).
    to_host: Vec<u8>,
    /// We shut down writing towards the host (agent sent FIN).
    host_write_closed: bool,
    /// The host side ended (EOF or error); the TCP side is closing.
    host_done: bool,
    /// Bytes received from the host so far.
    from_host: u64,
    /// The program that opened the connection, looked up at its SYN.
    program: Option<Program>,
}

/// The stack.
pub struct Stack<P: PacketIo> {
    io: P,
    iface: Interface,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    flows: HashMap<SocketHandle, Flow>,
    keys: HashMap<(SocketAddrV4, SocketAddrV4), SocketHandle>,
    rx: VecDeque<Vec<u8>>,
    new_streams: Vec<std::os::fd::RawFd>,
    pool: FakePool,
    transport: Box<dyn FlowTransport>,
    limits: Limits,
    next_flow_id: u64,
    counters: Arc<Counters>,
    /// Set only when the host reads flow header version 2.
    programs: Option<ProgramWorker>,
    /// SYNs waiting for their program's lookup, unanswered: until smoltcp sees a SYN the
    /// agent's socket stays in SYN_SENT, owned by the process that is connecting.
    held_syns: HashMap<(SocketAddrV4, SocketAddrV4), Vec<u8>>,

    /// Names answered inside the workspace ([`crate::local`]).
    local: crate::local::LocalRoutes,
}

impl<P: PacketIo> std::fmt::Debug for Stack<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("flows", &self.flows.len())
            .finish()
    }
}

impl<P: PacketIo> Stack<P> {
    /// A stack on `io`, sending flows through `transport`.
    pub fn new(mut io: P, transport: Box<dyn FlowTransport>, limits: Limits, now: Instant) -> Self {
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = now.total_millis().unsigned_abs();
        let mut rx = VecDeque::new();
        let mut iface = Interface::new(
            config,
            &mut QueueDevice {
                rx: &mut rx,
                io: &mut io,
            },
            now,
        );
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), 24));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 512], vec![0; 256 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 512], vec![0; 256 * 1024]),
        );
        let _ = dns.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GATEWAY)),
            port: 53,
        });
        let dns = sockets.add(dns);
        Stack {
            io,
            iface,
            sockets,
            dns,
            flows: HashMap::new(),
            keys: HashMap::new(),
            rx,
            new_streams: Vec::new(),
            pool: FakePool::default(),
            transport,
            limits,
            next_flow_id: 1,
            counters: Arc::new(Counters::default()),
            programs: None,
            held_syns: HashMap::new(),
            local: crate::local::LocalRoutes::default(),
        }
    }

    /// Looks up the program of every new connection with `lookup` and names it in the flow
    /// header (version 2). Only for a host that reads version 2: without it, every header is
    /// version 1.
    ///
    /// The lookups run on a thread of their own (reading `/proc` and hashing an executable
    /// the first time takes milliseconds to tens of them), so flows already open never wait
    /// for one; `wake` is called when an answer is ready, to end the caller's sleep.
    pub fn set_programs(
        &mut self,
        lookup: Box<dyn ProgramLookup>,
        wake: Option<Box<dyn Fn() + Send>>,
    ) -> io::Result<()> {
        self.programs = Some(ProgramWorker::spawn(lookup, wake)?);
        Ok(())
    }

    /// Connects flows to the names of `routes` to workspace services instead of the host.
    pub fn set_local_routes(&mut self, routes: crate::local::LocalRoutes) {
        self.local = routes;
    }

    /// The counters.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Live flows.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Descriptors of the flow streams opened since the last call, for registering with a
    /// poller.
    pub fn take_new_streams(&mut self) -> Vec<std::os::fd::RawFd> {
        std::mem::take(&mut self.new_streams)
    }

    /// One round: read packets, accept new connections, run smoltcp, answer DNS, move bytes
    /// between sockets and flow streams, and send what smoltcp produced. Returns how long the
    /// caller may sleep before the next round if nothing wakes it earlier.
    pub fn step(&mut self, now: Instant) -> Option<smoltcp::time::Duration> {
        self.read_packets();
        self.release_held_syns();
        self.poll(now);
        let dns_waiting = self.serve_dns();
        self.pump_flows();
        self.poll(now);
        self.reap();
        if dns_waiting || !self.rx.is_empty() {
            return Some(smoltcp::time::Duration::ZERO);
        }
        let delay = self.iface.poll_delay(now, &self.sockets);
        if self.held_syns.is_empty() {
            return delay;
        }
        // Answers wake the caller where it gave a waker; this bounds the wait where it did not.
        let held = smoltcp::time::Duration::from_millis(1);
        Some(delay.map_or(held, |d| d.min(held)))
    }

    /// Hands smoltcp the SYNs whose program lookup has answered, each with a listening socket
    /// that carries the answer.
    fn release_held_syns(&mut self) {
        let Some(worker) = &self.programs else {
            return;
        };
        let (mut answers, gone) = worker.answers();
        if gone {
            // The lookup thread ended (a lookup panicked): every SYN still held goes on with
            // no program named (fail closed: a rule with `programs` refuses it), as every new
            // one now does (`ask` fails).
            tracing::warn!("the program lookup thread ended: flows carry no program from now on");
            answers.extend(self.held_syns.keys().map(|key| (*key, None)));
        }
        for (key, program) in answers {
            let Some(syn) = self.held_syns.remove(&key) else {
                continue;
            };
            if program.is_none() {
                self.counters
                    .programs_unknown
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.listen_for(key.0, key.1, program);
            self.rx.push_back(syn);
        }
    }

    fn poll(&mut self, now: Instant) {
        let mut dev = QueueDevice {
            rx: &mut self.rx,
            io: &mut self.io,
        };
        let _ = self.iface.poll(now, &mut dev, &mut self.sockets);
    }

    fn read_packets(&mut self) {
        let mut buf = vec![0u8; MTU + 64];
        for _ in 0..self.limits.rx_batch {
            let n = match self.io.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) | Err(_) => break,
            };
            let packet = &buf[..n];
            if self.admit(packet) {
                self.rx.push_back(packet.to_vec());
            }
        }
    }

    /// Decides what to do with one packet from the workspace: true to hand it to smoltcp.
    fn admit(&mut self, packet: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.counters.dropped_other.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        match ip.next_header() {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    self.counters.dropped_other.fetch_add(1, Ordering::Relaxed);
                    return false;
                };
                if tcp.syn() && !tcp.ack() {
                    let src = SocketAddrV4::new(ip.src_addr(), tcp.src_port());
                    let dst = SocketAddrV4::new(ip.dst_addr(), tcp.dst_port());
                    return self.admit_syn(src, dst, packet);
                }
                true
            }
            IpProtocol::Udp => {
                let is_dns = UdpPacket::new_checked(ip.payload())
                    .is_ok_and(|u| u.dst_port() == 53 && ip.dst_addr() == GATEWAY);
                if !is_dns {
                    self.counters.dropped_udp.fetch_add(1, Ordering::Relaxed);
                }
                is_dns
            }
            IpProtocol::Icmp => {
                self.counters.dropped_icmp.fetch_add(1, Ordering::Relaxed);
                false
            }
            _ => {
                self.counters.dropped_other.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Decides what to do with a SYN: true to hand it to smoltcp now. A new connection whose
    /// program must be looked up is held (and false returned) until the lookup answers; a
    /// copy the agent's kernel sends again meanwhile is dropped.
    fn admit_syn(&mut self, src: SocketAddrV4, dst: SocketAddrV4, packet: &[u8]) -> bool {
        let key = (src, dst);
        if self.keys.contains_key(&key) {
            return true; // A retransmitted SYN of a connection already listened for.
        }
        if self.held_syns.contains_key(&key) {
            return false;
        }
        let to_gateway = *dst.ip() == GATEWAY;
        let room = self.flows.len() + self.held_syns.len() < self.limits.max_flows;
        match &self.programs {
            Some(worker) if !to_gateway && room => {
                if self.held_syns.len() >= MAX_HELD_SYNS {
                    self.counters
                        .syns_over_lookup_limit
                        .fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                if !worker.ask(key) {
                    // The lookup thread is gone: say nothing rather than stall the connection.
                    self.counters
                        .programs_unknown
                        .fetch_add(1, Ordering::Relaxed);
                    self.listen_for(src, dst, None);
                    return true;
                }
                self.held_syns.insert(key, packet.to_vec());
                false
            }
            _ => {
                self.listen_for(src, dst, None);
                true
            }
        }
    }

    /// Makes sure a socket is listening for the connection `src -> dst`, which `program`
    /// opened (as far as the lookup could tell).
    fn listen_for(&mut self, src: SocketAddrV4, dst: SocketAddrV4, program: Option<Program>) {
        if self.keys.contains_key(&(src, dst)) {
            return; // A retransmitted SYN.
        }
        let dns = dst == SocketAddrV4::new(GATEWAY, 53);
        if (*dst.ip() == GATEWAY && !dns) || self.flows.len() >= self.limits.max_flows {
            // No listener: smoltcp answers the SYN with RST.
            if *dst.ip() != GATEWAY {
                self.counters
                    .flows_over_limit
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let buffer = if dns { DNS_TCP_BUFFER } else { TCP_BUFFER };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        socket.set_nagle_enabled(false);
        if socket
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*dst.ip())),
                port: dst.port(),
            })
            .is_err()
        {
            return;
        }
        let handle = self.sockets.add(socket);
        self.keys.insert((src, dst), handle);
        self.flows.insert(
            handle,
            Flow {
                dns,
                key: (src, dst),
                stream: None,
                to_host: Vec::new(),
                host_write_closed: false,
                host_done: false,
                from_host: 0,
                program,
            },
        );
    }

    /// Answers queued DNS queries, as many as there is room to reply to: a query is only
    /// taken off the receive queue when its answer can be queued, so a burst of lookups (100
    /// parallel curls ask 200 questions at once) is answered over several rounds, not dropped.
    /// Returns whether queries are still waiting.
    fn serve_dns(&mut self) -> bool {
        let socket = self.sockets.get_mut::<udp::Socket<'_>>(self.dns);
        while socket.can_send() {
            let Ok((query, meta)) = socket.recv() else {
                break;
            };
            let (query, to) = (query.to_vec(), meta.endpoint);
            if let Some(reply) = dns::answer(&query, &mut self.pool) {
                self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_slice(&reply, to);
            }
        }
        socket.can_recv()
    }

    /// Opens the host stream for a flow whose TCP handshake completed.
    fn open(&mut self, handle: SocketHandle) {
        let Some(flow) = self.flows.get_mut(&handle) else {
            return;
        };
        let (_, dst) = flow.key;
        let hostname = if FakePool::contains(*dst.ip()) {
            self.pool
                .name_of(*dst.ip())
                .and_then(|n| Hostname::new(n).ok())
        } else {
            None
        };
        let header = FlowHeader {
            flow_id: self.next_flow_id,
            transport: WireTransport::Tcp,
            destination: SocketAddr::V4(dst),
            hostname,
            program: flow.program.take(),
        };
        self.next_flow_id += 1;
        let local = header
            .hostname
            .as_ref()
            .and_then(|h| self.local.target(h.as_str(), dst.port()));
        let opened = match local {
            // Answered inside the workspace: no header, nothing to the host.
            Some(target) => crate::local::LocalRoutes::open(target).map(|s| (s, Vec::new())),
            None => self.transport.connect().map(|s| (s, header.encode())),
        };
        match opened {
            Ok((stream, first)) => {
                self.new_streams
                    .push(std::os::fd::AsRawFd::as_raw_fd(&stream));
                flow.to_host = first;
                flow.stream = Some(stream);
                self.counters.flows_opened.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open flow stream to the host");
                self.counters
                    .transport_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.sockets.get_mut::<tcp::Socket<'_>>(handle).abort();
                flow.host_done = true;
            }
        }
    }

    fn pump_flows(&mut self) {
        let handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
        for handle in handles {
            let (established, stream_open) = {
                let s = self.sockets.get::<tcp::Socket<'_>>(handle);
                let flow = &self.flows[&handle];
                (
                    matches!(s.state(), tcp::State::Established | tcp::State::CloseWait),
                    flow.stream.is_some() || flow.host_done,
                )
            };
            let is_dns = self.flows.get(&handle).is_some_and(|f| f.dns);
            if established && !stream_open && !is_dns {
                self.open(handle);
            }
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(handle);
            let Some(flow) = self.flows.get_mut(&handle) else {
                continue;
            };
            if is_dns {
                if pump_dns(flow, socket, &mut self.pool) {
                    self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                pump(flow, socket);
            }
        }
    }

    /// Forgets flows whose TCP socket has fully closed.
    fn reap(&mut self) {
        let mut done = Vec::new();
        for (handle, flow) in &self.flows {
            let s = self.sockets.get::<tcp::Socket<'_>>(*handle);
            if s.state() == tcp::State::Closed || s.state() == tcp::State::TimeWait {
                done.push((*handle, flow.key));
            }
        }
        for (handle, key) in done {
            self.flows.remove(&handle);
            self.keys.remove(&key);
            self.sockets.remove(handle);
        }
    }
}

/// Answers DNS over TCP (RFC 7766: each message prefixed with its 16-bit length) on one
/// connection to the gateway. Queries wait in `flow.to_host` until their answer fits in the
/// send buffer. Returns whether a query was answered.
fn pump_dns(flow: &mut Flow, socket: &mut tcp::Socket<'_>, pool: &mut FakePool) -> bool {
    while socket.can_recv() && flow.to_host.len() < DNS_TCP_BUFFER {
        let room = DNS_TCP_BUFFER - flow.to_host.len();
        let buf = &mut flow.to_host;
        let r = socket.recv(|data| {
            let n = data.len().min(room);
            buf.extend_from_slice(&data[..n]);
            (n, n)
        });
        if !matches!(r, Ok(n) if n > 0) {
            break;
        }
    }
    let mut answered = false;
    while flow.to_host.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([flow.to_host[0], flow.to_host[1]]));
        if flow.to_host.len() < 2 + len {
            break;
        }
        let reply = dns::answer(&flow.to_host[2..2 + len], pool);
        let Some(reply) = reply else {
            // Not a query we answer: close rather than guess at the stream's framing.
            socket.close();
            flow.to_host.clear();
            return answered;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            socket.abort();
            return answered;
        };
        if socket.send_capacity() - socket.send_queue() < reply.len() + 2 {
            break;
        }
        let _ = socket.send_slice(&reply_len.to_be_bytes());
        let _ = socket.send_slice(&reply);
        flow.to_host.drain(..2 + len);
        answered = true;
    }
    if !socket.may_recv() && flow.to_host.is_empty() && socket.may_send() {
        socket.close();
    }
    answered
}

/// Moves bytes both ways between one TCP socket and its host stream, as far as both sides'
/// buffers allow (backpressure: nothing is buffered beyond the two socket buffers).
fn pump(flow: &mut Flow, socket: &mut tcp::Socket<'_>) {
    let Some(stream) = flow.stream.as_mut() else {
        return;
    };
    // Pending header bytes first.
    while !flow.to_host.is_empty() {
        match stream.write(&flow.to_host) {
            Ok(n) => {
                flow.to_host.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                socket.abort();
                flow.host_done = true;
                return;
            }
        }
    }
    // Agent -> host.
    let mut host_failed = false;
    while socket.can_recv() {
        let r = socket.recv(|buf| match stream.write(buf) {
            Ok(n) => (n, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, 0),
            Err(_) => {
                host_failed = true;
                (0, 0)
            }
        });
        if !matches!(r, Ok(n) if n > 0) {
            break;
        }
    }
    if host_failed {
        socket.abort();
        flow.host_done = true;
        return;
    }
    if !socket.may_recv() && socket.recv_queue() == 0 && !flow.host_write_closed {
        // The agent sent FIN and we passed on everything before it: half-close towards host.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        flow.host_write_closed = true;
    }
    // Host -> agent.
    if flow.host_done {
        return;
    }
    while socket.can_send() {
        let mut eof = false;
        let mut err = false;
        let r = socket.send(|buf| match stream.read(buf) {
            Ok(0) => {
                eof = true;
                (0, 0)
            }
            Ok(n) => (n, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, 0),
            Err(_) => {
                err = true;
                (0, 0)
            }
        });
        if let Ok(n) = r {
            flow.from_host += n as u64;
        }
        if eof {
            flow.host_done = true;
            if flow.from_host == 0 {
                // The host closed without a byte: the proxy refused this flow. Reset, so the
                // agent sees "connection reset" at once rather than an empty reply.
                socket.abort();
            } else {
                socket.close();
            }
            return;
        }
        if err {
            flow.host_done = true;
            socket.abort();
            return;
        }
        if !matches!(r, Ok(n) if n > 0) {
            break;
        }
    }
}
