//! A virtio driver simulator for device tests: split queues laid out in guest memory by hand,
//! so tests can build honest chains and malicious ones (loops, wild addresses, huge lengths,
//! an available index that lies).
// A test fixture that benches and fuzz targets also build (feature `test-utils`), so outside
// cfg(test), where clippy.toml's allow-unwrap-in-tests does not reach.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const F_WRITE: u16 = 2;

/// Guest memory for tests: `mib` MiB at address 0.
pub fn memory(mib: usize) -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap())
}

/// One split queue as a driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let s = u64::from(size);
        let desc = base;
        let avail = desc + 16 * s;
        let used = (avail + 6 + 2 * s + 3) & !3;
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device-side queue, configured as a transport would.
    pub fn device_queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(lo(self.desc)), Some(hi(self.desc)));
        q.set_avail_ring_address(Some(lo(self.avail)), Some(hi(self.avail)));
        q.set_used_ring_address(Some(lo(self.used)), Some(hi(self.used)));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Ring addresses (desc, avail, used) for a transport test.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Writes descriptor `index` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes chain `head` available and bumps the index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets the available index to any value (a lying driver).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a chain of `(addr, len, device_writes)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Used entries (id, len) the device added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn lo(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}
