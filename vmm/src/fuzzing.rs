//! Fuzz entry points for the parsers that see guest bytes: descriptor-chain walking, the vsock
//! packet path (parse, muxer, RX fill), the block request path, and PCI configuration cycles
//! and BAR accesses to a passthrough function (the fake VFIO device). Each takes arbitrary bytes,
//! lays them out in a small guest memory as a hostile driver would, and runs the real device
//! code; the only property checked is that nothing panics, hangs or grows without bound.
//! cargo-fuzz targets call these (fuzz/fuzz_targets/vmm_*.rs); a deterministic smoke run of
//! each is part of `cargo test`.
// Fuzz entry points (feature `test-utils`) panic on what the harness sets up wrongly; they are
// built outside cfg(test), where clippy.toml's allow-unwrap-in-tests does not reach.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::virtio::Interrupt;
use crate::devices::virtio::block::{self, Disk};
use crate::devices::virtio::testing::{
    DriverQueue, GUEST_CID, RINGS_END, RigLayout, ScratchDir, VsockRig, memory,
};
use crate::devices::virtio::vsock::packet::{HDR_LEN, HOST_CID};

/// Guest memory, MiB.
const MEM_MIB: usize = 1;
const MEM: usize = MEM_MIB << 20;
const QSIZE: u16 = 16;
/// Where the input's buffers go: above the rings.
const DATA_AREA: u64 = RINGS_END;

/// Raw descriptor table and available ring from the input, then walk every chain.
pub fn descriptor_chain(data: &[u8]) {
    let mem = memory(MEM_MIB);
    let dq = DriverQueue::new(0x1000, QSIZE);
    let mut q = dq.device_queue(&mem);
    let (desc, avail, _) = dq.addresses();
    let table_len = 16 * usize::from(QSIZE);
    let (table, rest) = data.split_at(data.len().min(table_len));
    mem.write_slice(table, GuestAddress(desc)).unwrap();
    let (ring, rest) = rest.split_at(rest.len().min(4 + 2 * usize::from(QSIZE)));
    mem.write_slice(ring, GuestAddress(avail)).unwrap();
    let (bufs, _) = rest.split_at(rest.len().min(MEM - DATA_AREA as usize));
    mem.write_slice(bufs, GuestAddress(DATA_AREA)).unwrap();
    let mut scratch = vec![0u8; 4096];
    for _ in 0..2 * QSIZE {
        let Some(chain) = q.pop_descriptor_chain(mem.as_ref()) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(mut r) = Reader::<()>::new(mem.as_ref(), chain.clone()) {
            while let Ok(n) = r.read(&mut scratch) {
                if n == 0 {
                    break;
                }
            }
        }
        if let Ok(mut w) = Writer::<()>::new(mem.as_ref(), chain) {
            let n = w.available_bytes().min(scratch.len());
            let _ = w.write_all(&scratch[..n]);
        }
        let _ = q.add_used(mem.as_ref(), head, 0);
    }
}

/// Splits the input into chains: each starts with a length byte and a flags byte (bit 0: split
/// into header and payload descriptors, bit 1: the payload descriptor is device-writable).
fn chains(data: &[u8]) -> Vec<(Vec<u8>, u8)> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [len, flags, tail @ ..] = rest {
        let n = (usize::from(*len) * 4).min(tail.len());
        out.push((tail[..n].to_vec(), *flags));
        rest = &tail[n..];
        if out.len() >= usize::from(QSIZE) - 1 {
            break;
        }
    }
    out
}

fn add(mem: &GuestMemoryMmap, dq: &mut DriverQueue, at: &mut u64, bytes: &[u8], flags: u8) {
    let a = *at;
    mem.write_slice(bytes, GuestAddress(a)).unwrap();
    *at += (bytes.len() as u64 + 64) & !15;
    let len = bytes.len() as u32;
    if flags & 1 != 0 && bytes.len() > HDR_LEN {
        let h = HDR_LEN as u32;
        dq.add_chain(
            mem,
            &[(a, h, false), (a + u64::from(h), len - h, flags & 2 != 0)],
        );
    } else {
        dq.add_chain(mem, &[(a, len.max(1), flags & 2 != 0)]);
    }
}

/// Guest packets from the input through the vsock TX path, the muxer and the RX path.
pub fn vsock_packets(data: &[u8]) {
    let layout = RigLayout {
        memory_mib: MEM_MIB,
        queue_size: QSIZE,
    };
    let mut rig = VsockRig::build("fuzz", layout, |_| {});
    // Something to connect to, so REQUESTs can succeed and RW reaches a real socket.
    let _host = rig.host_listen(1);
    rig.post_rx(4, 0x1000 + HDR_LEN as u32);
    let mut at = DATA_AREA;
    for (mut bytes, flags) in chains(data) {
        // Flag bit 2: make the header plausible (right CIDs, stream type, host port 1, a real
        // op) so the input reaches the connection logic instead of the CID check.
        if flags & 4 != 0 && bytes.len() >= HDR_LEN {
            bytes[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
            bytes[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
            bytes[20..24].copy_from_slice(&1u32.to_le_bytes());
            bytes[28..30].copy_from_slice(&1u16.to_le_bytes());
            let op = u16::from(bytes[30] % 8);
            bytes[30..32].copy_from_slice(&op.to_le_bytes());
            let len = (bytes.len() - HDR_LEN) as u32;
            if flags & 8 != 0 {
                bytes[24..28].copy_from_slice(&len.to_le_bytes());
            }
        }
        add(&rig.mem, &mut rig.tx, &mut at, &bytes, flags);
        rig.worker.process_tx();
        rig.worker.process_rx();
    }
    let _ = rig.worker.turn(0);
    assert!(
        rig.worker.muxer().buffered_bytes() <= crate::devices::virtio::vsock::muxer::MAX_BUFFERED
    );
}

/// Block requests from the input against a 16-sector read-write disk.
pub fn block_requests(data: &[u8]) {
    let dir = ScratchDir::new("fuzz-block");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 16 * 512]).unwrap();
    let disk = Disk::open(&path, false).unwrap();
    let mem = memory(MEM_MIB);
    let mut dq = DriverQueue::new(0x1000, QSIZE);
    let mut q = dq.device_queue(&mem);
    let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut at = DATA_AREA;
    for (bytes, flags) in chains(data) {
        let a = at;
        mem.write_slice(&bytes, GuestAddress(a)).unwrap();
        at += (bytes.len() as u64 + 64) & !15;
        let len = (bytes.len() as u32).max(17);
        let data_len = len.saturating_sub(17);
        let mut bufs = vec![(a, 16u32, false)];
        if data_len > 0 {
            bufs.push((a + 16, data_len, flags & 2 != 0));
        }
        bufs.push((a + 16 + u64::from(data_len), 1, flags & 1 == 0));
        dq.add_chain(&mem, &bufs);
        let _ = block::process(&mem, &mut q, &disk, &irq);
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        16 * 512,
        "the disk never grows"
    );
}

/// Configuration cycles (ports 0xCF8/0xCFC) and BAR loads and stores from the input, against a
/// root bus holding the fake VFIO device: BAR sizing and moves, capability rewrites, MSI and
/// MSI-X programming, table and PBA accesses, doorbells. Each step is an opcode byte followed
/// by its operands; a short input simply ends.
pub fn pci_accesses(data: &[u8]) {
    use std::sync::Mutex;

    use crate::devices::pci::PciDevice;
    use crate::devices::pci::bus::{CONFIG_ADDRESS, CONFIG_DATA, PciRoot};
    use crate::devices::pci::msix::testing::RecordingRouter;
    use crate::devices::pci::window::BarWindows;
    use crate::vfio::device::VfioPciDevice;
    use crate::vfio::fake::FakeGpu;

    let router = Arc::new(RecordingRouter::default());
    let mut windows = BarWindows::new(1 << 30, 46).unwrap();
    let dev = VfioPciDevice::new(Box::new(FakeGpu::new().0), &mut windows, router, None).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut root = PciRoot::new();
    root.add(dev.clone()).unwrap();
    let mut rest = data;
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head.to_vec())
    };
    let widths = [1usize, 2, 4, 8];
    while let Some(op) = take(1).and_then(|o| o.first().copied()) {
        let width = widths[usize::from(op >> 2) & 3];
        match op & 3 {
            0 => {
                let Some(addr) = take(4) else { break };
                root.pio_write(CONFIG_ADDRESS, &addr);
            }
            1 => {
                let port = CONFIG_DATA + u16::from(op >> 4 & 3);
                let Some(value) = take(width.min(4)) else {
                    break;
                };
                if op & 0x40 == 0 {
                    root.pio_write(port, &value);
                } else {
                    let mut out = value;
                    root.pio_read(port, &mut out);
                }
            }
            _ => {
                let Some(at) = take(4) else { break };
                let bars = dev.lock().map(|d| d.decoded_bars()).unwrap_or_default();
                let Some(bar) = bars.get(usize::from(at[0]) % bars.len().max(1)) else {
                    continue;
                };
                let offset = u64::from(u32::from_le_bytes([at[1], at[2], at[3], 0])) % bar.size;
                let Some(value) = take(width) else { break };
                let mut d = dev.lock().unwrap();
                if op & 1 == 0 {
                    d.bar_write(bar.index, offset, &value);
                } else {
                    let mut out = value;
                    d.bar_read(bar.index, offset, &mut out);
                }
            }
        }
    }
    // Whatever the guest did, the host bridge is still there and no ROM was offered.
    let mut id = [0u8; 4];
    root.pio_write(CONFIG_ADDRESS, &(1u32 << 31).to_le_bytes());
    root.pio_read(CONFIG_DATA, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
    let mut rom = [0u8; 4];
    dev.lock().unwrap().config_read(0x30, &mut rom);
    assert_eq!(rom, [0; 4]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random inputs (xorshift), so a failure reproduces.
    fn inputs(seed: u64, count: usize, max_len: usize) -> Vec<Vec<u8>> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..count)
            .map(|_| {
                let len = (next() as usize) % max_len;
                (0..len).map(|_| next() as u8).collect()
            })
            .collect()
    }

    #[test]
    fn descriptor_chain_survives_random_tables() {
        for input in inputs(0x9e37_79b9_7f4a_7c15, 3000, 1024) {
            descriptor_chain(&input);
        }
    }

    #[test]
    fn vsock_survives_random_packets() {
        for input in inputs(0xd1b5_4a32_d192_ed03, 200, 2048) {
            vsock_packets(&input);
        }
    }

    #[test]
    fn pci_survives_random_accesses() {
        for input in inputs(0x6a09_e667_f3bc_c909, 500, 512) {
            pci_accesses(&input);
        }
    }

    /// Random bytes rarely hit the device: also run inputs that select it and enable memory
    /// decoding and MSI-X first.
    #[test]
    fn pci_survives_random_accesses_to_a_decoding_device() {
        let mut prefix = Vec::new();
        for (reg, value) in [(0x04u32, 0x6u32), (0x60, 0x8000_0000), (0x40, 0x0001_0000)] {
            prefix.push(0);
            prefix.extend((1u32 << 31 | 1 << 11 | reg).to_le_bytes());
            prefix.push(1 | 2 << 2);
            prefix.extend(value.to_le_bytes());
        }
        for input in inputs(0xbb67_ae85_84ca_a73b, 500, 512) {
            let mut all = prefix.clone();
            all.extend(input);
            pci_accesses(&all);
        }
    }

    #[test]
    fn block_survives_random_requests() {
        for input in inputs(0x2545_f491_4f6c_dd1d, 500, 2048) {
            block_requests(&input);
        }
    }
}
