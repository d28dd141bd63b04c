//! A tiny polled virtio-vsock driver over virtio-mmio (split queues of 8 entries, interrupts
//! never enabled). Queues and buffers live at fixed physical addresses from 2 MiB, which the
//! probe owns (its image ends well below). Every wait is bounded; a timeout is a FAIL line.

use core::fmt::Write;

use crate::io::Serial;
use crate::virtio::{self, QSIZE, Vq, r8, r16, r32, reg, w8, w16, w32, w64};

const HDR: usize = 44;
const RX_BUF_LEN: u32 = 4096 + HDR as u32;
const RX_BUFS: u64 = 0x21_0000;
const TX_BUFS: u64 = 0x23_0000;
const BUF_STRIDE: u64 = 0x2000;
/// Poll iterations before a wait gives up (each is a few emulated instructions).
const SPIN_LIMIT: u32 = 20_000_000;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const HOST_CID: u64 = 2;
const GUEST_PORT: u32 = 5000;
/// Port the host connects to with `CONNECT 6000`.
pub const LISTEN_PORT: u32 = 6000;
/// Packet waits (each `SPIN_LIMIT` polls) for the host's `CONNECT 6000` before giving up.
const HOST_CONNECT_WAITS: u32 = 50;

#[derive(Clone, Copy)]
struct Pkt {
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    buf: u64,
}

struct Dev {
    base: u64,
    cid: u64,
    rx: Vq,
    tx: Vq,
    tx_slot: u16,
    fwd_cnt: u32,
}

impl Dev {
    fn init(slot: u64, base: u64) -> Result<Self, &'static str> {
        virtio::init(slot, base, 3)?;
        let cid =
            u64::from(r32(base + reg::CONFIG)) | (u64::from(r32(base + reg::CONFIG + 4)) << 32);
        let mut dev = Self {
            base,
            cid,
            rx: Vq::new(slot, 0),
            tx: Vq::new(slot, 1),
            tx_slot: 0,
            fwd_cnt: 0,
        };
        for i in 0..QSIZE {
            dev.rx
                .set_desc(i, RX_BUFS + u64::from(i) * BUF_STRIDE, RX_BUF_LEN, 2);
            dev.rx.publish(i);
        }
        w32(base + reg::QUEUE_NOTIFY, 0);
        Ok(dev)
    }

    fn send(
        &mut self,
        op: u16,
        src_port: u32,
        dst_port: u32,
        flags: u32,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let slot = self.tx_slot;
        self.tx_slot = (self.tx_slot + 1) % QSIZE;
        let b = TX_BUFS + u64::from(slot) * BUF_STRIDE;
        w64(b, self.cid);
        w64(b + 8, HOST_CID);
        w32(b + 16, src_port);
        w32(b + 20, dst_port);
        w32(b + 24, payload.len() as u32);
        w16(b + 28, 1);
        w16(b + 30, op);
        w32(b + 32, flags);
        w32(b + 36, 64 * 1024);
        w32(b + 40, self.fwd_cnt);
        for (i, byte) in payload.iter().enumerate() {
            w8(b + HDR as u64 + i as u64, *byte);
        }
        self.tx.set_desc(slot, b, (HDR + payload.len()) as u32, 0);
        self.tx.publish(slot);
        w32(self.base + reg::QUEUE_NOTIFY, 1);
        for _ in 0..SPIN_LIMIT {
            if self.tx.pop_used().is_some() {
                return Ok(());
            }
        }
        Err("timed out waiting for the device to take a TX packet")
    }

    /// Waits for the next packet; the caller must `recycle` it.
    fn recv(&mut self) -> Result<Pkt, &'static str> {
        for _ in 0..SPIN_LIMIT {
            if let Some((id, _len)) = self.rx.pop_used() {
                let b = RX_BUFS + u64::from(id) * BUF_STRIDE;
                return Ok(Pkt {
                    src_port: r32(b + 16),
                    dst_port: r32(b + 20),
                    len: r32(b + 24),
                    op: r16(b + 30),
                    buf: b,
                });
            }
        }
        Err("timed out waiting for a packet from the device")
    }

    fn recycle(&mut self, p: Pkt) {
        let id = ((p.buf - RX_BUFS) / BUF_STRIDE) as u16;
        self.rx.publish(id);
        w32(self.base + reg::QUEUE_NOTIFY, 0);
    }
}

/// Connects to host `port`, sends `bytes` of a pattern, expects them echoed back, closes; then
/// accepts one host-initiated connection on [`LISTEN_PORT`] and echoes what it receives until
/// the host closes.
pub fn echo_test(
    out: &mut Serial,
    slot: u64,
    base: u64,
    port: u32,
    bytes: usize,
) -> Result<(), &'static str> {
    let mut dev = Dev::init(slot, base)?;
    let _ = writeln!(out, "probe: vsock ready cid {}", dev.cid);

    // Guest-initiated: connect, echo, close.
    dev.send(OP_REQUEST, GUEST_PORT, port, 0, &[])?;
    let mut pending_host_req: Option<u32> = None;
    loop {
        let p = dev.recv()?;
        dev.recycle(p);
        match p.op {
            OP_RESPONSE if p.dst_port == GUEST_PORT => break,
            OP_RST if p.dst_port == GUEST_PORT => return Err("host refused the connection (RST)"),
            OP_REQUEST if p.dst_port == LISTEN_PORT => pending_host_req = Some(p.src_port),
            _ => {}
        }
    }
    let _ = writeln!(out, "probe: vsock connected to host port {port}");
    let mut chunk = [0u8; 1024];
    let mut sent = 0usize;
    let mut got = 0usize;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        for (i, c) in chunk.iter_mut().enumerate().take(n) {
            *c = pattern(sent + i);
        }
        dev.send(OP_RW, GUEST_PORT, port, 0, &chunk[..n])?;
        sent += n;
    }
    while got < bytes {
        let p = dev.recv()?;
        match p.op {
            OP_RW if p.dst_port == GUEST_PORT => {
                for i in 0..p.len as usize {
                    if r8(p.buf + HDR as u64 + i as u64) != pattern(got + i) {
                        dev.recycle(p);
                        return Err("echoed bytes differ from what was sent");
                    }
                }
                got += p.len as usize;
                dev.fwd_cnt = dev.fwd_cnt.wrapping_add(p.len);
            }
            OP_RST if p.dst_port == GUEST_PORT => {
                dev.recycle(p);
                return Err("connection reset during echo");
            }
            OP_REQUEST if p.dst_port == LISTEN_PORT => pending_host_req = Some(p.src_port),
            _ => {}
        }
        dev.recycle(p);
    }
    dev.send(OP_CREDIT_UPDATE, GUEST_PORT, port, 0, &[])?;
    let _ = writeln!(out, "probe: vsock echo ok {got} bytes");
    dev.send(OP_SHUTDOWN, GUEST_PORT, port, 3, &[])?;

    // Host-initiated: wait for CONNECT 6000 to arrive as a REQUEST, accept, echo until closed.
    // A test may connect only once it has seen the echo line above, so this wait is patient.
    let host_port = match pending_host_req {
        Some(p) => p,
        None => {
            let mut timeouts = 0;
            loop {
                let p = match dev.recv() {
                    Ok(p) => p,
                    Err(_) if timeouts < HOST_CONNECT_WAITS => {
                        timeouts += 1;
                        continue;
                    }
                    Err(_) => return Err("no host connection to port 6000 came"),
                };
                dev.recycle(p);
                if p.op == OP_REQUEST && p.dst_port == LISTEN_PORT {
                    break p.src_port;
                }
            }
        }
    };
    dev.fwd_cnt = 0; // credit counters are per connection
    dev.send(OP_RESPONSE, LISTEN_PORT, host_port, 0, &[])?;
    let _ = writeln!(
        out,
        "probe: vsock accepted host connection from port {host_port}"
    );
    let mut echoed = 0usize;
    loop {
        let p = dev.recv()?;
        let mine = p.dst_port == LISTEN_PORT && p.src_port == host_port;
        match p.op {
            OP_RW if mine => {
                let n = (p.len as usize).min(chunk.len());
                for (i, c) in chunk.iter_mut().enumerate().take(n) {
                    *c = r8(p.buf + HDR as u64 + i as u64);
                }
                dev.fwd_cnt = dev.fwd_cnt.wrapping_add(p.len);
                dev.recycle(p);
                dev.send(OP_RW, LISTEN_PORT, host_port, 0, &chunk[..n])?;
                echoed += n;
            }
            OP_SHUTDOWN if mine => {
                dev.recycle(p);
                dev.send(OP_RST, LISTEN_PORT, host_port, 0, &[])?;
                break;
            }
            OP_RST if mine => {
                dev.recycle(p);
                break;
            }
            OP_CREDIT_REQUEST if mine => {
                dev.recycle(p);
                dev.send(OP_CREDIT_UPDATE, LISTEN_PORT, host_port, 0, &[])?;
            }
            _ => dev.recycle(p),
        }
    }
    let _ = writeln!(out, "probe: vsock host connection echoed {echoed} bytes");
    Ok(())
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}
