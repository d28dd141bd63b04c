//! Shared virtio-mmio driver pieces for the probe: register access, split queues of
//! [`QSIZE`] entries at fixed physical addresses, device discovery from the command line and
//! the status handshake.

use core::sync::atomic::{Ordering, fence};

/// Entries per queue.
pub const QSIZE: u16 = 8;
/// Physical memory the probe's drivers own (queues from here, buffers above).
pub const DRIVER_AREA: u64 = 0x20_0000;

pub fn r32(a: u64) -> u32 {
    // SAFETY: MMIO register or identity-mapped RAM owned by this driver.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
pub fn w32(a: u64, v: u32) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
pub fn r16(a: u64) -> u16 {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
pub fn w16(a: u64, v: u16) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
pub fn w64(a: u64, v: u64) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}
pub fn w8(a: u64, v: u8) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
pub fn r8(a: u64) -> u8 {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

/// A split virtqueue as the driver sees it.
pub struct Vq {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    /// Queue `q` of the device in slot `slot`.
    pub fn new(slot: u64, q: u64) -> Self {
        let base = DRIVER_AREA + slot * 0x4000 + q * 0x1000;
        Self {
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let d = self.desc + 16 * u64::from(i);
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, 0);
    }

    pub fn publish(&mut self, head: u16) {
        w16(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE), head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
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

pub mod reg {
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

/// The `slot`-th `virtio_mmio.device=<size>@<base>:<irq>` on the command line.
pub fn device_base(cmdline: &str, slot: usize) -> Option<u64> {
    let spec = cmdline
        .split(' ')
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .nth(slot)?;
    let (_, rest) = spec.split_once('@')?;
    let (base, _) = rest.split_once(':')?;
    u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()
}

/// The slot and base of the `nth` device with virtio id `id`.
pub fn find(cmdline: &str, id: u32, nth: usize) -> Option<(u64, u64)> {
    (0..16usize)
        .filter_map(|slot| device_base(cmdline, slot).map(|b| (slot as u64, b)))
        .filter(|(_, b)| r32(b + reg::MAGIC) == 0x7472_6976 && r32(b + reg::DEVICE_ID) == id)
        .nth(nth)
}

/// Resets the device, negotiates VERSION_1 only, sets up `nq` queues, sets DRIVER_OK.
pub fn init(slot: u64, base: u64, nq: u64) -> Result<(), &'static str> {
    if r32(base + reg::VERSION) != 2 {
        return Err("virtio-mmio device is not version 2");
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
    for q in 0..nq {
        let vq = Vq::new(slot, q);
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
    Ok(())
}

/// How long [`kick_and_wait`] waits, in TSC cycles: 30 s at 1 GHz, 6 s at 5 GHz.
const DEVICE_WAIT_CYCLES: u64 = 30_000_000_000;

/// Notifies queue `q` and waits for one used entry; returns its length. The wait is bounded by
/// time (the TSC), not by a count of polls: emulated or nested, a poll can take a thousand
/// times longer than on bare KVM while the device thread runs at host speed.
pub fn kick_and_wait(base: u64, vq: &mut Vq, q: u32) -> Result<u32, &'static str> {
    w32(base + reg::QUEUE_NOTIFY, q);
    let start = crate::io::rdtsc();
    while crate::io::rdtsc().wrapping_sub(start) < DEVICE_WAIT_CYCLES {
        if let Some((_, len)) = vq.pop_used() {
            return Ok(len);
        }
        core::hint::spin_loop();
    }
    Err("timed out waiting for the device")
}
