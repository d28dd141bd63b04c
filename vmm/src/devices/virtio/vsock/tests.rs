//! vsock device tests through the vsock rig (`testing::VsockRig`: the driver simulator and real
//! host Unix sockets).
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::muxer::CONN_BUF;
use super::packet::{HDR_LEN, HOST_CID, Header, op, shutdown};
use crate::devices::virtio::Interrupt;
use crate::devices::virtio::testing::{
    DriverQueue, F_NEXT, GUEST_CID, ScratchDir, VsockRig, guest_header, memory,
};

const RX_BUF: u32 = 4096 + HDR_LEN as u32;

#[test]
fn guest_connect_to_listening_port_gets_response() {
    let mut h = VsockRig::new("resp");
    let l = h.host_listen(1234);
    h.post_rx(4, RX_BUF);
    h.send(guest_header(op::REQUEST, 1000, 1234), &[]);
    let r = h.recv_op(op::RESPONSE);
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((r.src_port, r.dst_port), (1234, 1000));
    assert_eq!(r.buf_alloc, CONN_BUF);
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_ok());
}

#[test]
fn guest_connect_to_port_nobody_listens_on_gets_rst() {
    let mut h = VsockRig::new("rst");
    h.post_rx(4, RX_BUF);
    h.send(guest_header(op::REQUEST, 1000, 4321), &[]);
    let r = h.recv_op(op::RST);
    assert_eq!((r.src_port, r.dst_port), (4321, 1000));
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn guest_bytes_reach_the_host_and_host_bytes_reach_the_guest() {
    let mut h = VsockRig::new("echo");
    let mut s = h.established(5000);
    h.send(guest_header(op::RW, 1000, 5000), b"ping from guest");
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
    let mut h = VsockRig::new("hostconn");
    h.post_rx(4, RX_BUF);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = h.recv_op(op::REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= 1 << 30);
    h.send(guest_header(op::RESPONSE, 52, req.src_port), &[]);
    let mut line = [0u8; 14];
    c.read_exact(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line).unwrap(),
        format!("OK {}\n", req.src_port)
    );
}

#[test]
fn host_connect_refused_by_the_guest_closes_the_client() {
    let mut h = VsockRig::new("hostrst");
    h.post_rx(4, RX_BUF);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = h.recv_op(op::REQUEST);
    h.send(guest_header(op::RST, 52, req.src_port), &[]);
    let mut buf = [0u8; 8];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 0);
}

#[test]
fn malformed_connect_line_closes_the_client() {
    let mut h = VsockRig::new("badline");
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
    let mut h = VsockRig::new("credit");
    let _s = h.established(6000); // the host never reads
    let chunk = vec![0x5au8; 64 * 1024];
    let mut reset = false;
    for _ in 0..32 {
        h.send(guest_header(op::RW, 1000, 6000), &chunk);
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
    let mut h = VsockRig::new("window");
    let l = h.host_listen(7000);
    h.post_rx(1, RX_BUF);
    let mut req = guest_header(op::REQUEST, 1000, 7000);
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
    let mut h = VsockRig::new("peercredit");
    let l = h.host_listen(7100);
    h.post_rx(8, RX_BUF);
    let mut req = guest_header(op::REQUEST, 1000, 7100);
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
    let mut upd = guest_header(op::CREDIT_UPDATE, 1000, 7100);
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
    let mut h = VsockRig::new("shut");
    let mut s = h.established(8000);
    let mut sd = guest_header(op::SHUTDOWN, 1000, 8000);
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
    let mut h = VsockRig::new("hosteof");
    let s = h.established(8100);
    drop(s);
    let sd = h.recv_op(op::SHUTDOWN);
    assert_eq!(sd.flags, shutdown::RCV | shutdown::SEND);
}

#[test]
fn unknown_op_on_a_connection_resets_it() {
    let mut h = VsockRig::new("badop");
    let _s = h.established(8200);
    h.send(guest_header(99, 1000, 8200), &[]);
    h.recv_op(op::RST);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn data_for_an_unknown_connection_is_answered_with_rst() {
    let mut h = VsockRig::new("nosuch");
    h.post_rx(2, RX_BUF);
    h.send(guest_header(op::RW, 1000, 9999), b"hello?");
    h.recv_op(op::RST);
}

#[test]
fn packets_with_a_spoofed_source_cid_are_dropped_silently() {
    let mut h = VsockRig::new("spoof");
    let _l = h.host_listen(1234);
    h.post_rx(2, RX_BUF);
    let mut req = guest_header(op::REQUEST, 1000, 1234);
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
    let mut h = VsockRig::new("hugelen");
    let _s = h.established(8300);
    let mut rw = guest_header(op::RW, 1000, 8300);
    rw.len = 1 << 30;
    h.send_raw(rw, b"short");
    h.recv_op(op::RST);
    assert_eq!(h.worker.muxer().connection_count(), 0);
}

#[test]
fn descriptor_loop_is_survived() {
    let mut h = VsockRig::new("loop");
    let a = 0x20_0000;
    h.mem
        .write_slice(
            &guest_header(op::REQUEST, 1000, 1).to_bytes(),
            GuestAddress(a),
        )
        .unwrap();
    // Descriptor 0 points at itself.
    h.tx.write_desc(&h.mem, 0, a, 64, F_NEXT, 0);
    h.tx.publish(&h.mem, 0);
    h.worker.process_tx();
    assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    // The device still works.
    h.post_rx(2, RX_BUF);
    h.send(guest_header(op::REQUEST, 1001, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn descriptor_outside_guest_memory_is_dropped_and_the_device_keeps_working() {
    let mut h = VsockRig::new("wild");
    h.tx.add_chain(&h.mem, &[(0xdead_0000_0000, 44, false)]);
    h.worker.process_tx();
    assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    assert!(!h.interrupt.needs_reset());
    h.post_rx(2, RX_BUF);
    h.send(guest_header(op::REQUEST, 1001, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn lying_available_index_marks_the_device_for_reset() {
    let mut h = VsockRig::new("lie");
    h.tx.set_avail_idx(&h.mem, 1000);
    h.worker.process_tx();
    assert!(h.interrupt.needs_reset());
}

#[test]
fn rx_buffer_smaller_than_a_header_is_skipped() {
    let mut h = VsockRig::new("tinyrx");
    h.post_rx(1, 8);
    h.post_rx(1, RX_BUF);
    h.send(guest_header(op::REQUEST, 1000, 4444), &[]);
    h.recv_op(op::RST);
}

#[test]
fn host_connect_the_guest_never_answers_times_out() {
    let mut h = VsockRig::with_muxer("custom1", |m| m.set_timeout(Duration::from_millis(50)));
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
    let mut h = VsockRig::with_muxer("custom2", |m| m.set_timeout(Duration::from_millis(50)));
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
    let mut h = VsockRig::with_muxer("custom3", |m| m.set_timeout(Duration::from_millis(50)));
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
    let mut h = VsockRig::with_muxer("custom4", |m| m.set_max_conns(4));
    let _l = h.host_listen(1);
    h.post_rx(16, RX_BUF);
    for port in 0..6 {
        h.send(guest_header(op::REQUEST, 10_000 + port, 1), &[]);
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
    let mut h = VsockRig::new("many");
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
        h.send(guest_header(op::REQUEST, 2000 + c, 9000), &[]);
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
                let mut rw = guest_header(op::RW, 2000 + c as u32, 9000);
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
                let mut up = guest_header(op::CREDIT_UPDATE, 2000 + c as u32, 9000);
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
        let mut sd = guest_header(op::SHUTDOWN, 2000 + c, 9000);
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
            &guest_header(op::REQUEST, 1000, 4444).to_bytes(),
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
        let dir = ScratchDir::new("vsock-reset");
        let mem = memory(16);
        let dev = Vsock::new(
            GuestCid::try_from(GUEST_CID).unwrap(),
            &dir.path().join("v.sock"),
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
    }
}
