//! The host side of vsock: guest streams multiplexed onto host Unix sockets, by Firecracker's
//! documented convention.
//!
//! - Guest connects to host port P: the muxer connects (non-blocking) to `<uds>_P` and answers
//!   RESPONSE, or RST when nobody listens there.
//! - A host client connects to `<uds>` and writes `CONNECT P\n`: the muxer sends the guest a
//!   REQUEST from a fresh host port L; on RESPONSE it writes `OK L\n` to the client, on RST it
//!   closes the client.
//!
//! Flow control: the muxer grants the guest exactly its own per-connection buffer
//! ([`CONN_BUF`]) as credit; a guest that sends past its credit is reset. Towards the guest it
//! reads from a host socket only what the guest's credit and the RX buffer in hand allow, into
//! one fixed scratch buffer, so a guest that advertises a huge window and reads slowly cannot
//! grow host memory. Every protocol error resets the connection (RST) and never more than that.
//! Connection count, pending host accepts and queued control packets are all bounded.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_flow_header::vsock::{self, LineBuf};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::metrics::VsockMetrics;
use super::packet::{
    HOST_CID, Header, MAX_PKT_PAYLOAD, RxBuffer, TYPE_STREAM, TxPacket, op, shutdown,
};
use crate::devices::metrics::add;
use crate::guest_warn;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Per-connection buffer for guest-to-host bytes, and so the credit granted to the guest.
/// 64 KiB (Firecracker's size too): with [`MAX_CONNS`] connections a guest can make the VMM
/// hold at most 64 MiB of bytes the host has not read yet, and the device-model benchmark
/// still moves more than 20 Gbit/s on one connection.
pub const CONN_BUF: u32 = 64 * 1024;
/// Most connections at once.
pub const MAX_CONNS: usize = 1024;

/// Every byte a guest can make the VMM buffer for the host, across all its connections.
pub const MAX_BUFFERED: usize = MAX_CONNS * CONN_BUF as usize;
const _: () = assert!(MAX_BUFFERED <= 64 << 20);
/// Most host clients waiting to finish their `CONNECT` line.
pub const MAX_PENDING_ACCEPTS: usize = 64;
/// Most control packets waiting for RX buffers.
pub const MAX_CONTROL: usize = 2048;
/// How long the guest gets to answer a REQUEST or finish a close, and a host client to send
/// its CONNECT line (Firecracker uses 2 s for the same waits).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll token of the listener.
pub const TOKEN_LISTENER: u64 = 4;
/// Epoll tokens at or above this are stream fds (token - TOKEN_FD_BASE).
pub const TOKEN_FD_BASE: u64 = 64;

/// (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// We sent SHUTDOWN after host EOF; waiting for the guest's RST.
    Closing,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream may have data (edge-triggered).
    readable: bool,
    /// The guest will receive no more.
    peer_rcv_shut: bool,
    /// Guest bytes not yet written to the host stream.
    pending: VecDeque<u8>,
    /// Bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    credit_update_queued: bool,
    /// Shut the host stream's write half once `pending` drains.
    shut_write_when_drained: bool,
    /// When a Connecting or Closing connection gives up on the guest.
    deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: true,
            peer_rcv_shut: false,
            pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_update_queued: false,
            shut_write_when_drained: false,
            deadline: None,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_rx(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.peer_rcv_shut
            && self.peer_credit() > 0
    }

    /// Writes as much of `pending` as the host stream takes; counts the bytes into `written`.
    fn flush(&mut self, written: &AtomicU64) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    add(written, n as u64);
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.shut_write_when_drained {
            self.shut_write_when_drained = false;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct PendingAccept {
    stream: UnixStream,
    line: LineBuf,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Control {
    hdr: Header,
    key: Option<ConnKey>,
}

/// What filling one RX buffer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A packet of this many bytes was written.
    Written(u32),
    /// Nothing was ready after all (a stream had no data yet).
    Nothing,
    /// The buffer can hold a header but no data, and data was waiting.
    TooSmall,
}

/// The vsock connection multiplexer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    by_fd: HashMap<RawFd, ConnKey>,
    accepts: HashMap<RawFd, PendingAccept>,
    control: VecDeque<Control>,
    next_local_port: u32,
    scratch: Vec<u8>,
    max_conns: usize,
    timeout: Duration,
    metrics: Arc<VsockMetrics>,
}

fn fd_token(fd: RawFd) -> u64 {
    TOKEN_FD_BASE + u64::try_from(fd).unwrap_or(0)
}

impl Muxer {
    /// A muxer for guest `guest_cid`, serving `uds` through `listener`, registering its fds in
    /// `epoll`.
    pub fn new(
        guest_cid: u64,
        uds: &Path,
        listener: UnixListener,
        epoll: Epoll,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Self {
            guest_cid,
            uds: uds.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            accepts: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0u8; usize::try_from(MAX_PKT_PAYLOAD).unwrap_or(65536)],
            max_conns: MAX_CONNS,
            timeout: PEER_TIMEOUT,
            metrics: Arc::default(),
        })
    }

    /// Counts into `metrics` (shared with the device, read by `--stats`).
    pub fn set_metrics(&mut self, metrics: Arc<VsockMetrics>) {
        self.metrics = metrics;
    }

    /// Changes how long the guest (or a host client) gets to answer (tests).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The earliest deadline of any waiting connection or host client.
    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.deadline);
        let accepts = self.accepts.values().map(|a| a.deadline);
        conns.chain(accepts).min()
    }

    /// Gives up on everything whose deadline passed: host clients that never finished their
    /// CONNECT line are closed; connections the guest never accepted are closed on the host and
    /// reset towards the guest; connections the guest never finished closing are reset.
    pub fn expire(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .accepts
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            self.accepts.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            guest_warn!(
                host_port = key.0,
                guest_port = key.1,
                "vsock peer timed out; resetting"
            );
            self.fail(key);
        }
    }

    /// Lowers the connection limit (tests).
    pub fn set_max_conns(&mut self, n: usize) {
        self.max_conns = n.min(MAX_CONNS);
    }

    /// The epoll instance the muxer's fds are registered in.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Bytes buffered for the host across all connections (bounded by `CONN_BUF` each).
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.pending.len()).sum()
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL {
            guest_warn!("vsock control queue full (guest not posting RX buffers); dropping");
            return;
        }
        let hdr = self.header(key, op, flags);
        let key = (op != op::RST).then_some(key);
        self.control.push_back(Control { hdr, key });
    }

    /// Resets a connection because something went wrong (counted).
    fn fail(&mut self, key: ConnKey) {
        add(&self.metrics.resets, 1);
        self.reset(key);
    }

    /// Drops a connection and tells the guest (RST).
    fn reset(&mut self, key: ConnKey) {
        self.remove(key);
        self.push_control(key, op::RST, 0);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn register_stream(
        &mut self,
        key: ConnKey,
        conn: Conn,
        already_in_epoll: bool,
    ) -> std::io::Result<()> {
        let fd = conn.stream.as_raw_fd();
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        let op = if already_in_epoll {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(events, fd_token(fd)))?;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        Ok(())
    }

    /// Handles one packet the guest sent.
    pub fn handle_tx(&mut self, pkt: TxPacket) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            guest_warn!(
                src = h.src_cid,
                dst = h.dst_cid,
                "vsock packet with wrong CIDs dropped"
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.fail(key);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.guest_connect(key, &h),
                op::RST => {}
                _ => self.push_control(key, op::RST, 0),
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match (conn.state, h.op) {
            (State::Connecting, op::RESPONSE) => {
                add(&self.metrics.host_connects, 1);
                conn.state = State::Established;
                conn.deadline = None;
                if conn
                    .stream
                    .write_all(vsock::ok_line(key.0).as_bytes())
                    .is_err()
                {
                    self.fail(key);
                }
            }
            (State::Established, op::RW) => {
                let too_much = conn.pending.len() + pkt.payload.len()
                    > usize::try_from(CONN_BUF).unwrap_or(usize::MAX);
                if too_much {
                    guest_warn!(port = key.1, "guest sent past its vsock credit; resetting");
                    self.fail(key);
                    return;
                }
                conn.pending.extend(pkt.payload.iter());
                if conn.flush(&self.metrics.tx_bytes).is_err() {
                    self.fail(key);
                    return;
                }
                self.maybe_credit_update(key);
            }
            (State::Established | State::Closing, op::SHUTDOWN) => {
                let both = shutdown::RCV | shutdown::SEND;
                if h.flags & both == both {
                    self.reset(key);
                    return;
                }
                if h.flags & shutdown::RCV != 0 {
                    conn.peer_rcv_shut = true;
                }
                if h.flags & shutdown::SEND != 0 {
                    conn.shut_write_when_drained = true;
                    if conn.flush(&self.metrics.tx_bytes).is_err() {
                        self.fail(key);
                    }
                }
            }
            (_, op::CREDIT_UPDATE) => {}
            (_, op::CREDIT_REQUEST) => self.push_control(key, op::CREDIT_UPDATE, 0),
            (_, op::RST) => self.remove(key),
            (_, other) => {
                guest_warn!(
                    op = other,
                    "unexpected vsock op for this connection; resetting"
                );
                self.fail(key);
            }
        }
    }

    /// A guest packet that could not be parsed: reset the connection it names, if any.
    pub fn handle_bad_packet(&mut self, h: Option<Header>) {
        add(&self.metrics.bad_packets, 1);
        if let Some(h) = h
            && h.src_cid == self.guest_cid
            && h.dst_cid == HOST_CID
        {
            let key = (h.dst_port, h.src_port);
            self.fail(key);
        }
    }

    fn maybe_credit_update(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if (c.fwd_cnt - c.last_fwd_cnt_sent).0 >= CONN_BUF / 4 && !c.credit_update_queued {
            c.credit_update_queued = true;
            self.push_control(key, op::CREDIT_UPDATE, 0);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.len() >= self.max_conns {
            guest_warn!("vsock connection limit reached; refusing");
            add(&self.metrics.guest_refused, 1);
            self.push_control(key, op::RST, 0);
            return;
        }
        let mut path = OsString::from(self.uds.as_os_str());
        path.push(format!("_{}", key.0));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(port = key.0, error = %e, "no host listener for guest connection");
                add(&self.metrics.guest_refused, 1);
                self.push_control(key, op::RST, 0);
                return;
            }
        };
        let mut conn = Conn::new(stream, State::Established);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.register_stream(key, conn, false).is_err() {
            self.push_control(key, op::RST, 0);
            return;
        }
        add(&self.metrics.guest_connects, 1);
        self.push_control(key, op::RESPONSE, 0);
    }

    /// Accepts host clients waiting on the listener.
    pub fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock accept failed");
                    return;
                }
            };
            if self.accepts.len() >= MAX_PENDING_ACCEPTS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, fd_token(fd)),
                )
                .is_err()
            {
                continue;
            }
            self.accepts.insert(
                fd,
                PendingAccept {
                    stream,
                    line: LineBuf::new(),
                    deadline: Instant::now() + self.timeout,
                },
            );
        }
    }

    /// Handles readiness on a stream fd (`token` from epoll).
    pub fn stream_event(&mut self, token: u64, events: EventSet) {
        let Some(fd) = token
            .checked_sub(TOKEN_FD_BASE)
            .and_then(|f| RawFd::try_from(f).ok())
        else {
            return;
        };
        if self.accepts.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        if events.contains(EventSet::ERROR) {
            self.fail(key);
            return;
        }
        if events.contains(EventSet::OUT) {
            if conn.flush(&self.metrics.tx_bytes).is_err() {
                self.fail(key);
                return;
            }
            self.maybe_credit_update(key);
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.accepts.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                // A malformed or endless line closes the client.
                Ok(1) => match p.line.push(byte[0]) {
                    Ok(Some(line)) => break vsock::parse_connect(line).ok(),
                    Ok(None) => {}
                    Err(_) => break None,
                },
                Ok(_) => break None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(p) = self.accepts.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        if self.conns.len() >= self.max_conns {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        }
        let local = self.alloc_local_port();
        let key = (local, port);
        let mut conn = Conn::new(p.stream, State::Connecting);
        conn.readable = false;
        conn.deadline = Some(Instant::now() + self.timeout);
        if self.register_stream(key, conn, true).is_err() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.remove(key);
            return;
        }
        self.push_control(key, op::REQUEST, 0);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// Whether there is anything to send to the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(Conn::wants_rx)
    }

    /// Fills one guest RX buffer.
    pub fn fill_rx(&mut self, buf: RxBuffer<'_>) -> Fill {
        match self.fill_rx_inner(buf) {
            Ok(Some(n)) => Fill::Written(n),
            Ok(None) => Fill::Nothing,
            Err(()) => Fill::TooSmall,
        }
    }

    fn fill_rx_inner(&mut self, buf: RxBuffer<'_>) -> Result<Option<u32>, ()> {
        if let Some(ctl) = self.control.pop_front() {
            let mut hdr = ctl.hdr;
            if let Some(key) = ctl.key {
                if let Some(c) = self.conns.get_mut(&key) {
                    hdr.fwd_cnt = c.fwd_cnt.0;
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    if hdr.op == op::CREDIT_UPDATE {
                        c.credit_update_queued = false;
                    }
                } else if hdr.op != op::RST {
                    // The connection went away after this was queued; the RST already went.
                    return self.fill_rx_inner(buf);
                }
            }
            return Ok(buf.write(hdr, &[]));
        }
        let Some(key) = self
            .conns
            .iter()
            .find(|(_, c)| c.wants_rx())
            .map(|(k, _)| *k)
        else {
            return Ok(None);
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(None);
        };
        let credit = usize::try_from(conn.peer_credit()).unwrap_or(0);
        if buf.payload_capacity() == 0 {
            return Err(());
        }
        let n = credit.min(buf.payload_capacity()).min(self.scratch.len());
        let Some(scratch) = self.scratch.get_mut(..n) else {
            return Ok(None);
        };
        match conn.stream.read(scratch) {
            Ok(0) => {
                conn.readable = false;
                conn.state = State::Closing;
                conn.deadline = Some(Instant::now() + self.timeout);
                let hdr = self.header(key, op::SHUTDOWN, shutdown::RCV | shutdown::SEND);
                Ok(buf.write(hdr, &[]))
            }
            Ok(k) => {
                add(&self.metrics.rx_bytes, k as u64);
                conn.rx_cnt += Wrapping(u32::try_from(k).unwrap_or(0));
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                let hdr = self.header(key, op::RW, 0);
                Ok(self.scratch.get(..k).and_then(|data| buf.write(hdr, data)))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                conn.readable = false;
                Ok(None)
            }
            Err(_) => {
                self.remove(key);
                let hdr = self.header(key, op::RST, 0);
                Ok(buf.write(hdr, &[]))
            }
        }
    }
}

/// Connects to a Unix socket without blocking: a listener whose backlog is full refuses
/// rather than stalling the device thread. (socket2 opens sockets close-on-exec.)
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    sock.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(sock)))
}
