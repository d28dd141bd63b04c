//! A tiny polled virtio-vsock driver over virtio-mmio (split queues of 8 entries, interrupts
//! never enabled). Queues and buffers live at fixed physical addresses from 2 MiB, which the
//! probe owns (its image ends well below). Every wait is bounded; a timeout is a FAIL line.

use core::fmt::Write;
use core::sync::atomic::{Ordering, fence};

use crate::io::Serial;

const QSIZE: u16 = 8;
const HDR: usize = 44;
const RX_BUF_LEN: u32 = 4096 + HDR as u32;
const QUEUE_BASE: u64 = 0x20_0000;
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

fn r32(a: u64) -> u32 {
    // SAFETY: MMIO register or identity-mapped RAM owned by this driver.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
fn w32(a: u64, v: u32) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
fn r16(a: u64) -> u16 {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
fn w16(a: u64, v: u16) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
fn w64(a: u64, v: u64) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}
fn w8(a: u64, v: u8) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
fn r8(a: u64) -> u8 {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

struct Vq {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    fn new(index: u64) -> Self {
        let base = QUEUE_BASE + index * 0x1000;
        Self {
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let d = self.desc + 16 * u64::from(i);
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, 0);
    }

    fn publish(&mut self, head: u16) {
        w16(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE), head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    fn pop_used(&mut self) -> Option<(u16, u32)> {
        let idx = r16(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        let id = r32(e) as u16;
        Some((id, r32(e + 4)))
    }
}

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

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
}

impl Dev {
    fn init(base: u64) -> Result<Self, &'static str> {
        if r32(base + reg::MAGIC) != 0x7472_6976 || r32(base + reg::VERSION) != 2 {
            return Err("no virtio-mmio v2 device at the declared address");
        }
        if r32(base + reg::DEVICE_ID) != 19 {
            return Err("virtio device is not vsock");
        }
        w32(base + reg::STATUS, 0);
        w32(base + reg::STATUS, 1);
        w32(base + reg::STATUS, 1 | 2);
        w32(base + reg::DEVICE_FEATURES_SEL, 1);
        if r32(base + reg::DEVICE_FEATURES) & 1 == 0 {
            return Err("device does not offer VERSION_1");
        }
        w32(base + reg::DRIVER_FEATURES_SEL, 0);
        w32(base + reg::DRIVER_FEATURES, 0);
        w32(base + reg::DRIVER_FEATURES_SEL, 1);
        w32(base + reg::DRIVER_FEATURES, 1);
        w32(base + reg::STATUS, 1 | 2 | 8);
        if r32(base + reg::STATUS) & 8 == 0 {
            return Err("device refused FEATURES_OK");
        }
        for q in 0..3u64 {
            let vq = Vq::new(q);
            w32(base + reg::QUEUE_SEL, q as u32);
            if r32(base + reg::QUEUE_NUM_MAX) < u32::from(QSIZE) {
                return Err("queue too small");
            }
            w32(base + reg::QUEUE_NUM, u32::from(QSIZE));
            for (lo, hi, a) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, vq.desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, vq.avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, vq.used),
            ] {
                w32(base + lo, a as u32);
                w32(base + hi, (a >> 32) as u32);
            }
            w32(base + reg::QUEUE_READY, 1);
        }
        w32(base + reg::STATUS, 1 | 2 | 8 | 4);
        if r32(base + reg::STATUS) & 0x40 != 0 {
            return Err("device needs reset after DRIVER_OK");
        }
        let cid =
            u64::from(r32(base + reg::CONFIG)) | (u64::from(r32(base + reg::CONFIG + 4)) << 32);
        let mut dev = Self {
            base,
            cid,
            rx: Vq::new(0),
            tx: Vq::new(1),
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
pub fn echo_test(out: &mut Serial, base: u64, port: u32, bytes: usize) -> Result<(), &'static str> {
    let mut dev = Dev::init(base)?;
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
    let host_port = match pending_host_req {
        Some(p) => p,
        None => loop {
            let p = dev.recv()?;
            dev.recycle(p);
            if p.op == OP_REQUEST && p.dst_port == LISTEN_PORT {
                break p.src_port;
            }
        },
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
