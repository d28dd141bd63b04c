//! vsock device tests through the driver simulator and real host Unix sockets.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::muxer::{CONN_BUF, Muxer};
use super::packet::{HDR_LEN, HOST_CID, Header, TYPE_STREAM, op, shutdown};
use super::worker::Worker;
use crate::devices::virtio::Interrupt;
use crate::devices::virtio::testing::{DriverQueue, F_NEXT, memory};

const GUEST_CID: u64 = 3;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;
const TX_AREA: u64 = 0x10_0000;
const TX_AREA_END: u64 = 0x80_0000;
const RX_AREA: u64 = 0x80_0000;

struct Harness {
    mem: Arc<GuestMemoryMmap>,
    rx: DriverQueue,
    tx: DriverQueue,
    worker: Worker,
    interrupt: Interrupt,
    uds: PathBuf,
    dir: PathBuf,
    tx_next: u64,
    rx_next: u64,
    rx_bufs: std::collections::HashMap<u32, u64>,
}

fn ghdr(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl Harness {
    fn new(name: &str) -> Self {
        Self::build(name, |_| {})
    }

    fn new_with(name: &str, f: impl FnOnce(&mut Muxer)) -> Self {
        Self::build(name, f)
    }

    fn build(name: &str, f: impl FnOnce(&mut Muxer)) -> Self {
        let dir = std::env::temp_dir().join(format!("moat-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let mem = memory(16);
        let rx = DriverQueue::new(0x1000, 256);
        let tx = DriverQueue::new(0x1_0000, 256);
        let ev = DriverQueue::new(0x2_0000, 256);
        let queues = vec![
            rx.device_queue(&mem),
            tx.device_queue(&mem),
            ev.device_queue(&mem),
        ];
        let evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let listener = UnixListener::bind(&uds).unwrap();
        let mut muxer = Muxer::new(GUEST_CID, &uds, listener, Epoll::new().unwrap()).unwrap();
        f(&mut muxer);
        let kill = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker =
            Worker::new(mem.clone(), queues, evts, kill, interrupt.clone(), muxer).unwrap();
        Self {
            mem,
            rx,
            tx,
            worker,
            interrupt,
            uds,
            dir,
            tx_next: TX_AREA,
            rx_next: RX_AREA,
            rx_bufs: std::collections::HashMap::new(),
        }
    }

    fn host_listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }

    fn tx_alloc(&mut self, len: u64) -> u64 {
        if self.tx_next + len > TX_AREA_END {
            self.tx_next = TX_AREA;
        }
        let a = self.tx_next;
        self.tx_next += (len + 15) & !15;
        a
    }

    /// The guest sends one packet (header and payload in two descriptors).
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = u32::try_from(payload.len()).unwrap();
        self.send_raw(hdr, payload);
    }

    /// Sends with `hdr.len` as given, whatever the payload.
    fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.tx_alloc(HDR_LEN as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&self.mem, &[(h, HDR_LEN as u32, false)]);
        } else {
            let p = self.tx_alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            self.tx.add_chain(
                &self.mem,
                &[
                    (h, HDR_LEN as u32, false),
                    (p, u32::try_from(payload.len()).unwrap(), false),
                ],
            );
        }
        self.worker.process_tx();
        self.worker.process_rx();
    }

    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.rx_next;
            self.rx_next += u64::from(size + 15) & !15;
            let head = self.rx.add_chain(&self.mem, &[(a, size, true)]);
            self.rx_bufs.insert(u32::from(head), a);
        }
        self.worker.process_rx();
    }

    /// Packets the device delivered to the guest so far.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        used.into_iter()
            .filter(|(_, len)| *len as usize >= HDR_LEN)
            .map(|(id, len)| {
                let a = self.rx_bufs[&id];
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(a)).unwrap();
                let h = Header::from_bytes(&raw);
                let mut data = vec![0u8; len as usize - HDR_LEN];
                self.mem
                    .read_slice(&mut data, GuestAddress(a + HDR_LEN as u64))
                    .unwrap();
                (h, data)
            })
            .collect()
    }

    /// Runs the device loop until `f` returns Some, or 5 s pass.
    fn pump_until<T>(&mut self, mut f: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            self.worker.turn(20);
        }
    }

    fn recv_op(&mut self, want: u16) -> Header {
        self.pump_until(|h| h.recv().into_iter().map(|p| p.0).find(|p| p.op == want))
    }

    /// Guest connects to host `port` from guest port 1000; returns the accepted host stream.
    fn established(&mut self, port: u32) -> UnixStream {
        let l = self.host_listen(port);
        self.post_rx(8, RX_BUF);
        self.send(ghdr(op::REQUEST, 1000, port), &[]);
        let r = self.recv_op(op::RESPONSE);
        assert_eq!((r.src_port, r.dst_port), (port, 1000));
        let (s, _) = l.accept().unwrap();
        s
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn guest_connect_to_listening_port_gets_response() {
    let mut h = Harness::new("resp");
    let l = h.host_listen(1234);
    h.post_rx(4, RX_BUF);
    h.send(ghdr(op::REQUEST, 1000, 1234), &[]);
    let r = h.recv_op(op::RESPONSE);
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((r.src_port, r.dst_port), (1234, 1000));
    assert_eq!(r.buf_alloc, CONN_BUF);
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_ok());
}

#[test]
fn guest_connect_to_port_nobody_listens_on_gets_rst() {
    let mut h = Harness::new("rst");
    h.post_rx(4, RX_BUF);
    h.send(ghdr(op::REQUEST, 1000, 4321), &[]);
    let r = h.recv_op(op::RST);
    assert_eq!((r.src_port, r.dst_port), (4321, 1000));
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn guest_bytes_reach_the_host_and_host_bytes_reach_the_guest() {
    let mut h = Harness::new("echo");
    let mut s = h.established(5000);
    h.send(ghdr(op::RW, 1000, 5000), b"ping from guest");
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping from guest");
    s.write_all(b"pong from host").unwrap();
    let data = h.pump_until(|h| {
        h.recv()
            .into_iter()
            .find(|(p, _)| p.op == op::RW)
            .map(|(_, d)| d)
    });
    assert_eq!(data, b"pong from host");
}

#[test]
fn host_connect_command_opens_a_guest_connection() {
    let mut h = Harness::new("hostconn");
    h.post_rx(4, RX_BUF);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = h.recv_op(op::REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= 1 << 30);
    h.send(ghdr(op::RESPONSE, 52, req.src_port), &[]);
    let mut line = [0u8; 14];
    c.read_exact(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line).unwrap(),
        format!("OK {}\n", req.src_port)
    );
}

#[test]
fn host_connect_refused_by_the_guest_closes_the_client() {
    let mut h = Harness::new("hostrst");
    h.post_rx(4, RX_BUF);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = h.recv_op(op::REQUEST);
    h.send(ghdr(op::RST, 52, req.src_port), &[]);
    let mut buf = [0u8; 8];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 0);
}

#[test]
fn malformed_connect_line_closes_the_client() {
    let mut h = Harness::new("badline");
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"HELLO 52\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.pump_until(|h| {
        h.worker.turn(20);
        let mut buf = [0u8; 1];
        c.set_nonblocking(true).unwrap();
        matches!(c.read(&mut buf), Ok(0)).then_some(())
    });
}

#[test]
fn guest_sending_past_its_credit_is_reset_and_host_buffer_stays_bounded() {
    let mut h = Harness::new("credit");
    let _s = h.established(6000); // the host never reads
    let chunk = vec![0x5au8; 64 * 1024];
    let mut reset = false;
    for _ in 0..32 {
        h.send(ghdr(op::RW, 1000, 6000), &chunk);
        assert!(h.worker.muxer().buffered_bytes() <= CONN_BUF as usize);
        if h.recv().iter().any(|(p, _)| p.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit must be reset");
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn huge_guest_window_does_not_make_the_host_read_ahead() {
    let mut h = Harness::new("window");
    let l = h.host_listen(7000);
    h.post_rx(1, RX_BUF);
    let mut req = ghdr(op::REQUEST, 1000, 7000);
    req.buf_alloc = u32::MAX;
    h.send(req, &[]);
    h.recv_op(op::RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let block = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    while let Ok(n) = s.write(&block) {
        written += n;
    }
    h.post_rx(2, RX_BUF);
    for _ in 0..10 {
        h.worker.turn(10);
    }
    let got: Vec<_> = h
        .recv()
        .into_iter()
        .filter(|(p, _)| p.op == op::RW)
        .collect();
    assert_eq!(got.len(), 2, "one packet per posted buffer, no more");
    assert!(got.iter().all(|(_, d)| d.len() <= 4096));
    assert!(written > 8192);
    assert_eq!(h.worker.muxer().buffered_bytes(), 0);
}

#[test]
fn host_bytes_never_exceed_the_guest_credit() {
    let mut h = Harness::new("peercredit");
    let l = h.host_listen(7100);
    h.post_rx(8, RX_BUF);
    let mut req = ghdr(op::REQUEST, 1000, 7100);
    req.buf_alloc = 100;
    h.send(req, &[]);
    h.recv_op(op::RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[1u8; 1000]).unwrap();
    for _ in 0..10 {
        h.worker.turn(10);
    }
    let total: usize = h
        .recv()
        .iter()
        .filter(|(p, _)| p.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(total, 100);
    let mut upd = ghdr(op::CREDIT_UPDATE, 1000, 7100);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    h.send(upd, &[]);
    let more = h.pump_until(|h| {
        let n: usize = h
            .recv()
            .iter()
            .filter(|(p, _)| p.op == op::RW)
            .map(|(_, d)| d.len())
            .sum();
        (n > 0).then_some(n)
    });
    assert_eq!(more, 100);
}

#[test]
fn guest_shutdown_both_ways_resets_and_closes_the_host_stream() {
    let mut h = Harness::new("shut");
    let mut s = h.established(8000);
    let mut sd = ghdr(op::SHUTDOWN, 1000, 8000);
    sd.flags = shutdown::RCV | shutdown::SEND;
    h.send(sd, &[]);
    h.recv_op(op::RST);
    let mut buf = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn host_close_sends_the_guest_a_shutdown() {
    let mut h = Harness::new("hosteof");
    let s = h.established(8100);
    drop(s);
    let sd = h.recv_op(op::SHUTDOWN);
    assert_eq!(sd.flags, shutdown::RCV | shutdown::SEND);
}

#[test]
fn unknown_op_on_a_connection_resets_it() {
    let mut h = Harness::new("badop");
    let _s = h.established(8200);
    h.send(ghdr(99, 1000, 8200), &[]);
    h.recv_op(op::RST);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn data_for_an_unknown_connection_is_answered_with_rst() {
    let mut h = Harness::new("nosuch");
    h.post_rx(2, RX_BUF);
    h.send(ghdr(op::RW, 1000, 9999), b"hello?");
    h.recv_op(op::RST);
}

#[test]
fn packets_with_a_spoofed_source_cid_are_dropped_silently() {
    let mut h = Harness::new("spoof");
    let _l = h.host_listen(1234);
    h.post_rx(2, RX_BUF);
    let mut req = ghdr(op::REQUEST, 1000, 1234);
    req.src_cid = 42;
    h.send(req, &[]);
    for _ in 0..3 {
        h.worker.turn(10);
    }
    assert!(h.recv().is_empty());
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn huge_payload_length_resets_without_allocating() {
    let mut h = Harness::new("hugelen");
    let _s = h.established(8300);
    let mut rw = ghdr(op::RW, 1000, 8300);
    rw.len = 1 << 30;
    h.send_raw(rw, b"short");
    h.recv_op(op::RST);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn descriptor_loop_is_survived() {
    let mut h = Harness::new("loop");
    let a = 0x20_0000;
    h.mem
        .write_slice(&ghdr(op::REQUEST, 1000, 1).to_bytes(), GuestAddress(a))
        .unwrap();
    // Descriptor 0 points at itself.
    h.tx.write_desc(&h.mem, 0, a, 64, F_NEXT, 0);
    h.tx.publish(&h.mem, 0);
    h.worker.process_tx();
    assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    // The device still works.
    h.post_rx(2, RX_BUF);
    h.send(ghdr(op::REQUEST, 1001, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn descriptor_outside_guest_memory_is_dropped_and_the_device_keeps_working() {
    let mut h = Harness::new("wild");
    h.tx.add_chain(&h.mem, &[(0xdead_0000_0000, 44, false)]);
    h.worker.process_tx();
    assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    assert!(!h.interrupt.needs_reset());
    h.post_rx(2, RX_BUF);
    h.send(ghdr(op::REQUEST, 1001, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn lying_available_index_marks_the_device_for_reset() {
    let mut h = Harness::new("lie");
    h.tx.set_avail_idx(&h.mem, 1000);
    h.worker.process_tx();
    assert!(h.interrupt.needs_reset());
}

#[test]
fn rx_buffer_smaller_than_a_header_is_skipped() {
    let mut h = Harness::new("tinyrx");
    h.post_rx(1, 8);
    h.post_rx(1, RX_BUF);
    h.send(ghdr(op::REQUEST, 1000, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn host_connect_the_guest_never_answers_times_out() {
    let mut h = Harness::new_with("custom1", |m| m.set_timeout(Duration::from_millis(50)));
    h.post_rx(4, RX_BUF);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = h.recv_op(op::REQUEST);
    // The guest stays silent: the client is closed and the guest told to forget it.
    let rst = h.recv_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn close_the_guest_never_finishes_times_out() {
    let mut h = Harness::new_with("custom2", |m| m.set_timeout(Duration::from_millis(50)));
    let s = h.established(8400);
    drop(s);
    let mut ops = Vec::new();
    h.pump_until(|h| {
        ops.extend(h.recv().into_iter().map(|p| p.0.op));
        ops.contains(&op::RST).then_some(())
    });
    assert_eq!(ops, vec![op::SHUTDOWN, op::RST]);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn host_client_that_never_sends_its_line_is_dropped() {
    let mut h = Harness::new_with("custom3", |m| m.set_timeout(Duration::from_millis(50)));
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONN").unwrap();
    c.set_nonblocking(true).unwrap();
    h.pump_until(|_| {
        let mut buf = [0u8; 1];
        matches!(c.read(&mut buf), Ok(0)).then_some(())
    });
}

#[test]
fn connection_requests_beyond_the_limit_are_refused() {
    let mut h = Harness::new_with("custom4", |m| m.set_max_conns(4));
    let _l = h.host_listen(1);
    h.post_rx(16, RX_BUF);
    for port in 0..6 {
        h.send(ghdr(op::REQUEST, 10_000 + port, 1), &[]);
    }
    let ops: Vec<u16> = h.recv().iter().map(|(p, _)| p.op).collect();
    assert_eq!(ops.iter().filter(|o| **o == op::RESPONSE).count(), 4);
    assert_eq!(ops.iter().filter(|o| **o == op::RST).count(), 2);
    assert_eq!(h.worker.muxer().connection_count(), 4);
}

#[test]
fn many_connections_echo_every_byte_in_order() {
    const CONNS: u32 = 24;
    const BYTES: usize = 48 * 1024;
    const CHUNK: usize = 4096;
    let mut h = Harness::new("many");
    let listener = h.host_listen(9000);
    let echo = std::thread::spawn(move || {
        let mut threads = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = listener.accept().unwrap();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.write_all(&buf[..n]).unwrap(),
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    });
    let pattern = |conn: u32, i: usize| (i as u32).wrapping_mul(7).wrapping_add(conn * 13) as u8;
    h.post_rx(64, RX_BUF);
    for c in 0..CONNS {
        h.send(ghdr(op::REQUEST, 2000 + c, 9000), &[]);
    }
    // Re-post exactly as many RX buffers as the device used: at most 64 outstanding, as a
    // driver with a 64-entry ring would.
    let mut responses = 0;
    while responses < CONNS {
        let used = h.pump_until(|h| {
            let p = h.recv();
            (!p.is_empty()).then_some(p)
        });
        responses += used.iter().filter(|(p, _)| p.op == op::RESPONSE).count() as u32;
        h.post_rx(used.len(), RX_BUF);
    }
    let mut sent = vec![0usize; CONNS as usize];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); CONNS as usize];
    let mut fwd = vec![0u32; CONNS as usize];
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.iter().any(|g| g.len() < BYTES) {
        assert!(
            Instant::now() < deadline,
            "echo incomplete: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        // Interleave one chunk per connection per round.
        for c in 0..CONNS as usize {
            if sent[c] < BYTES {
                let data: Vec<u8> = (sent[c]..sent[c] + CHUNK)
                    .map(|i| pattern(c as u32, i))
                    .collect();
                let mut rw = ghdr(op::RW, 2000 + c as u32, 9000);
                rw.fwd_cnt = fwd[c];
                h.send(rw, &data);
                sent[c] += CHUNK;
            }
        }
        h.worker.turn(5);
        let packets = h.recv();
        let used = packets.len();
        let mut consumed = vec![0u32; CONNS as usize];
        for (p, data) in packets {
            if p.op == op::RW {
                let c = (p.dst_port - 2000) as usize;
                got[c].extend_from_slice(&data);
                consumed[c] += data.len() as u32;
            } else {
                assert_ne!(p.op, op::RST, "connection {} reset", p.dst_port);
            }
        }
        for c in 0..CONNS as usize {
            if consumed[c] > 0 {
                fwd[c] = fwd[c].wrapping_add(consumed[c]);
                let mut up = ghdr(op::CREDIT_UPDATE, 2000 + c as u32, 9000);
                up.fwd_cnt = fwd[c];
                h.send(up, &[]);
            }
        }
        h.post_rx(used, RX_BUF);
    }
    for (c, g) in got.iter().enumerate() {
        assert_eq!(g.len(), BYTES);
        assert!(
            g.iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(c as u32, i)),
            "conn {c} bytes differ"
        );
    }
    for c in 0..CONNS {
        let mut sd = ghdr(op::SHUTDOWN, 2000 + c, 9000);
        sd.flags = shutdown::RCV | shutdown::SEND;
        h.send(sd, &[]);
    }
    echo.join().unwrap();
}

/// The device behind the real MMIO transport and its own thread: driver handshake, traffic,
/// reset, and a second handshake on fresh rings (what a Linux driver does on rebind).
mod through_the_transport {
    use super::*;
    use crate::config::GuestCid;
    use crate::devices::bus::MmioDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::vsock::Vsock;

    const STATUS: u64 = 0x70;

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// Full handshake with rings at `base`; returns the driver's RX and TX queues.
    fn bring_up(t: &mut MmioTransport, base: u64) -> (DriverQueue, DriverQueue) {
        w(t, STATUS, 1);
        w(t, STATUS, 3);
        w(t, 0x24, 1); // DriverFeaturesSel
        w(t, 0x20, 1); // VERSION_1
        w(t, STATUS, 0xb);
        let mut qs = Vec::new();
        for q in 0..3u32 {
            let dq = DriverQueue::new(base + u64::from(q) * 0x1000, 16);
            let (d, a, u) = dq.addresses();
            w(t, 0x30, q);
            w(t, 0x38, 16);
            w(t, 0x80, d as u32);
            w(t, 0x90, a as u32);
            w(t, 0xa0, u as u32);
            w(t, 0x44, 1);
            qs.push(dq);
        }
        w(t, STATUS, 0xf);
        assert_eq!(r(t, STATUS), 0xf, "DRIVER_OK accepted");
        let tx = qs.remove(1);
        let rx = qs.remove(0);
        (rx, tx)
    }

    fn request_gets_rst(
        t: &mut MmioTransport,
        mem: &GuestMemoryMmap,
        rx: &mut DriverQueue,
        tx: &mut DriverQueue,
    ) {
        rx.add_chain(mem, &[(0x40_0000, RX_BUF, true)]);
        w(t, 0x50, 0); // notify RX
        mem.write_slice(
            &ghdr(op::REQUEST, 1000, 4444).to_bytes(),
            GuestAddress(0x50_0000),
        )
        .unwrap();
        tx.add_chain(mem, &[(0x50_0000, HDR_LEN as u32, false)]);
        w(t, 0x50, 1); // notify TX
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let used = rx.take_used(mem);
            if let Some((_, len)) = used.first() {
                assert_eq!(*len as usize, HDR_LEN);
                let mut raw = [0u8; HDR_LEN];
                mem.read_slice(&mut raw, GuestAddress(0x40_0000)).unwrap();
                assert_eq!(Header::from_bytes(&raw).op, op::RST);
                return;
            }
            assert!(Instant::now() < deadline, "no RST from the device thread");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn device_works_again_after_a_driver_reset() {
        let dir = std::env::temp_dir().join(format!("moat-vsock-reset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = memory(16);
        let dev = Vsock::new(
            GuestCid::try_from(GUEST_CID).unwrap(),
            &dir.join("v.sock"),
            false,
        )
        .unwrap();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq).unwrap();

        let (mut rx, mut tx) = bring_up(&mut t, 0x1_0000);
        request_gets_rst(&mut t, &mem, &mut rx, &mut tx);

        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);

        let (mut rx, mut tx) = bring_up(&mut t, 0x2_0000);
        request_gets_rst(&mut t, &mem, &mut rx, &mut tx);
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
