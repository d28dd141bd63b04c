//! PCI through configuration mechanism #1 (ports 0xCF8/0xCFC), and MSI-X delivery from the
//! VMM's fake VFIO device (vendor 0x6d6f, device 0x6174).
//!
//! The probe finds the device on bus 0, sizes its BARs, walks its capabilities, programs
//! MSI-X vector 0 with `address 0xfee0_0000 | apic_id << 12, data = vector`, rings the
//! device's doorbell and checks that the interrupt reached the local APIC. It does not take
//! the interrupt through an IDT: interrupts stay disabled (IF = 0, as the PVH entry leaves
//! them), so a delivered MSI sits in the LAPIC's interrupt request register (IRR), which the
//! probe reads. That shows the message reached this vCPU's LAPIC with the programmed vector,
//! which is what the VMM is responsible for; taking it through a gate is the CPU's business.

use core::arch::asm;
use core::fmt::Write;

use crate::io::Serial;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const FAKE_ID: u32 = 0x6174_6d6f;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = LAPIC + 0x20;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_IRR: u64 = LAPIC + 0x200;
/// Doorbell of the fake device: BAR 2 offset 0.
const DOORBELL: u64 = 0;
const VECTOR: u32 = 0x40;
const VECTOR2: u32 = 0x41;
const MSI_VECTOR: u32 = 0x42;

fn outl(port: u16, value: u32) {
    // SAFETY: port I/O in a guest we own; the VMM decides what the port does.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outl`.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack)) };
    value
}

fn cfg_read(dev: u32, reg: u32) -> u32 {
    outl(CONFIG_ADDRESS, 1 << 31 | dev << 11 | (reg & 0xfc));
    inl(CONFIG_DATA)
}

fn cfg_write(dev: u32, reg: u32, value: u32) {
    outl(CONFIG_ADDRESS, 1 << 31 | dev << 11 | (reg & 0xfc));
    outl(CONFIG_DATA, value);
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: identity-mapped MMIO (a BAR the VMM placed below 4 GiB, or the LAPIC page).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn mmio_write(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Sizes BAR `n` by the protocol (all ones in, size mask out, original restored; memory
/// decoding is off meanwhile): (address, size, flags). I/O BARs and absent BARs give size 0.
fn size_bar(dev: u32, n: u32) -> (u64, u64, u32) {
    let reg = 0x10 + 4 * n;
    let low = cfg_read(dev, reg);
    if low & 1 != 0 {
        return (0, 0, low & 3);
    }
    let is64 = low & 0b110 == 0b100;
    let high = if is64 { cfg_read(dev, reg + 4) } else { 0 };
    cfg_write(dev, reg, u32::MAX);
    let mut mask = u64::from(cfg_read(dev, reg) & !0xf);
    cfg_write(dev, reg, low);
    if is64 {
        cfg_write(dev, reg + 4, u32::MAX);
        mask |= u64::from(cfg_read(dev, reg + 4)) << 32;
        cfg_write(dev, reg + 4, high);
    } else if mask != 0 {
        mask |= 0xffff_ffff_0000_0000;
    }
    let size = if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    (
        u64::from(high) << 32 | u64::from(low & !0xf),
        size,
        low & 0xf,
    )
}

fn irr(vector: u32) -> bool {
    let reg = LAPIC_IRR + u64::from(vector / 32) * 0x10;
    mmio_read(reg) & (1 << (vector % 32)) != 0
}

fn wait_irr(vector: u32) -> bool {
    (0..20_000).any(|_| irr(vector))
}

/// Lists every function on bus 0 (`probe: pci 00:DD.0 id VVVV:DDDD class CCCCCC`) and, for
/// each one but the host bridge, its BARs, ROM, interrupt pin and capabilities.
pub fn list(out: &mut Serial) {
    for dev in 0..32 {
        let id = cfg_read(dev, 0);
        if id == u32::MAX {
            continue;
        }
        let class = cfg_read(dev, 8) >> 8;
        let _ = writeln!(
            out,
            "probe: pci 00:{dev:02x}.0 id {:04x}:{:04x} class {class:06x}",
            id & 0xffff,
            id >> 16
        );
        if dev != 0 {
            describe(out, dev);
        }
    }
}

/// BARs (sized), ROM, pin and capability ids of function `dev`.
fn describe(out: &mut Serial, dev: u32) {
    let command = cfg_read(dev, 0x04) & 0xffff;
    cfg_write(dev, 0x04, 0);
    let mut n = 0;
    while n < 6 {
        let (addr, size, flags) = size_bar(dev, n);
        let kind = if flags & 0b110 == 0b100 { 64 } else { 32 };
        n += kind / 32;
        if size == 0 {
            continue;
        }
        let n = n - kind / 32;
        let _ = writeln!(
            out,
            "probe: pci 00:{dev:02x}.0 bar{n} {kind}-bit prefetchable {} size {size:#x} addr {addr:#x}",
            flags & 8 != 0
        );
    }
    cfg_write(dev, 0x04, command);
    cfg_write(dev, 0x30, u32::MAX);
    let _ = writeln!(
        out,
        "probe: pci 00:{dev:02x}.0 rom {:#x}",
        cfg_read(dev, 0x30)
    );
    let pin = (cfg_read(dev, 0x3c) >> 8) & 0xff;
    let _ = writeln!(out, "probe: pci 00:{dev:02x}.0 interrupt pin {pin}");
    let mut ptr = cfg_read(dev, 0x34) & 0xfc;
    let _ = write!(out, "probe: pci 00:{dev:02x}.0 caps");
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let head = cfg_read(dev, ptr);
        let _ = write!(out, " {:#04x}", head & 0xff);
        ptr = (head >> 8) & 0xfc;
    }
    let _ = writeln!(out);
}

/// Finds the fake device and takes an MSI-X interrupt from it.
pub fn test(out: &mut Serial) -> Result<(), &'static str> {
    list(out);
    let dev = (0..32)
        .find(|d| cfg_read(*d, 0) == FAKE_ID)
        .ok_or("fake PCI device not found")?;
    let bar2 = u64::from(cfg_read(dev, 0x18) & !0xf);
    let msix = find_cap(dev, 0x11).ok_or("no MSI-X capability")?;
    let control = cfg_read(dev, msix) >> 16;
    let table = cfg_read(dev, msix + 4);
    let pba = cfg_read(dev, msix + 8);
    let _ = writeln!(
        out,
        "probe: pci msix vectors {} table bar{} {:#x} pba bar{} {:#x}",
        (control & 0x7ff) + 1,
        table & 7,
        table & !7,
        pba & 7,
        pba & !7
    );
    if table & 7 != 2 || pba & 7 != 2 {
        return Err("MSI-X table or PBA not in BAR 2");
    }
    let entry = bar2 + u64::from(table & !7);
    let pba = bar2 + u64::from(pba & !7);

    // Local APIC on (software enable), and this vCPU's APIC id as the MSI destination.
    mmio_write(LAPIC_SVR, mmio_read(LAPIC_SVR) | 0x1ff);
    let apic_id = mmio_read(LAPIC_ID) >> 24;

    // Memory decoding and bus mastering; MSI-X on; vector 0 programmed and masked.
    cfg_write(dev, 0x04, 0x6);
    cfg_write(dev, msix, (cfg_read(dev, msix) & 0xffff) | 1 << 31);
    mmio_write(entry, 0xfee0_0000 | apic_id << 12);
    mmio_write(entry + 4, 0);
    mmio_write(entry + 8, VECTOR);
    mmio_write(entry + 12, 1);

    mmio_write(bar2 + DOORBELL, 0);
    let pending = mmio_read(pba) & 1;
    let _ = writeln!(
        out,
        "probe: pci msix masked doorbell pba {pending} irr {}",
        u32::from(wait_irr(VECTOR))
    );

    mmio_write(entry + 12, 0);
    let delivered = wait_irr(VECTOR);
    let _ = writeln!(
        out,
        "probe: pci msix unmasked vector {VECTOR:#x} irr {} pba {}",
        u32::from(delivered),
        mmio_read(pba) & 1
    );

    // Reprogram the vector (masked, as drivers do) and fire it again: the new data must win.
    mmio_write(entry + 12, 1);
    mmio_write(entry + 8, VECTOR2);
    mmio_write(entry + 12, 0);
    mmio_write(bar2 + DOORBELL, 0);
    let _ = writeln!(
        out,
        "probe: pci msix rewritten vector {VECTOR2:#x} irr {}",
        u32::from(wait_irr(VECTOR2))
    );

    // MSI-X off, MSI on (64-bit: address low 4, high 8, data 12); the doorbell's vector 0 is
    // MSI's only vector.
    cfg_write(dev, msix, cfg_read(dev, msix) & 0xffff);
    let msi = find_cap(dev, 0x05).ok_or("no MSI capability")?;
    cfg_write(dev, msi + 4, 0xfee0_0000 | apic_id << 12);
    cfg_write(dev, msi + 8, 0);
    cfg_write(dev, msi + 12, MSI_VECTOR);
    cfg_write(dev, msi, cfg_read(dev, msi) | 1 << 16);
    mmio_write(bar2 + DOORBELL, 0);
    let _ = writeln!(
        out,
        "probe: pci msi vector {MSI_VECTOR:#x} irr {}",
        u32::from(wait_irr(MSI_VECTOR))
    );
    Ok(())
}

/// Offset of the first capability with `id` of function `dev`.
fn find_cap(dev: u32, id: u32) -> Option<u32> {
    let mut ptr = cfg_read(dev, 0x34) & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let head = cfg_read(dev, ptr);
        if head & 0xff == id {
            return Some(ptr);
        }
        ptr = (head >> 8) & 0xfc;
    }
    None
}

/// QEMU's educational device (`-device edu`): vendor 0x1234, device 0x11e8.
const EDU_ID: u32 = 0x11e8_1234;
/// Its BAR 0 registers.
const EDU_IDENT: u64 = 0x00;
const EDU_LIVENESS: u64 = 0x04;
const EDU_IRQ_STATUS: u64 = 0x24;
const EDU_IRQ_RAISE: u64 = 0x60;
const EDU_IRQ_ACK: u64 = 0x64;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
/// DMA command bits: start (cleared by the device when done), device to RAM, interrupt when
/// done.
const EDU_DMA_RUN: u32 = 1;
const EDU_DMA_TO_RAM: u32 = 2;
const EDU_DMA_IRQ: u32 = 4;
/// The device's DMA buffer, in its own address space.
const EDU_BUFFER: u64 = 0x4_0000;
/// Bytes moved each way: fewer than the buffer's 4096 (QEMU 7.2's edu crashes on a transfer
/// that fills it).
const EDU_DMA_BYTES: usize = 2048;
const EDU_VECTOR: u32 = 0x43;
const EDU_VECTOR2: u32 = 0x44;
const EDU_DMA_VECTOR: u32 = 0x45;
/// How long a wait on the device lasts, in TSC cycles (30 s at 1 GHz): the device behind a
/// nested IOMMU in an emulator answers in milliseconds to seconds, so this is bounded by time,
/// not by a count of polls.
const EDU_WAIT_CYCLES: u64 = 30_000_000_000;

fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let start = crate::io::rdtsc();
    loop {
        if done() {
            return true;
        }
        if crate::io::rdtsc().wrapping_sub(start) > EDU_WAIT_CYCLES {
            return false;
        }
    }
}

/// The DMA buffers in guest RAM (identity-mapped, and below the device's 28-bit DMA mask: the
/// probe is loaded at 1 MiB).
#[repr(C, align(4096))]
struct DmaPages([u8; 2 * 4096]);
static mut DMA_PAGES: DmaPages = DmaPages([0; 2 * 4096]);

/// Drives a passed-through edu device: its identification register through the BAR, its MSI
/// (programmed, then rewritten), and DMA both ways through the IOMMU mapping of guest RAM,
/// ending with an MSI for the transfer.
pub fn edu(out: &mut Serial) -> Result<(), &'static str> {
    list(out);
    let dev = (0..32)
        .find(|d| cfg_read(*d, 0) == EDU_ID)
        .ok_or("edu device not found")?;
    let bar0 = u64::from(cfg_read(dev, 0x10) & !0xf);
    cfg_write(dev, 0x04, 0x6);
    let _ = writeln!(
        out,
        "probe: edu id {:#010x}",
        mmio_read(bar0 + EDU_IDENT)
    );
    mmio_write(bar0 + EDU_LIVENESS, 0x1234_5678);
    let _ = writeln!(
        out,
        "probe: edu liveness {:#010x}",
        mmio_read(bar0 + EDU_LIVENESS)
    );

    // MSI to this vCPU's LAPIC (read from the IRR: interrupts stay disabled).
    mmio_write(LAPIC_SVR, mmio_read(LAPIC_SVR) | 0x1ff);
    let apic_id = mmio_read(LAPIC_ID) >> 24;
    let msi = find_cap(dev, 0x05).ok_or("no MSI capability")?;
    let is64 = cfg_read(dev, msi) >> 16 & 0x80 != 0;
    let data = if is64 { msi + 12 } else { msi + 8 };
    cfg_write(dev, msi + 4, 0xfee0_0000 | apic_id << 12);
    if is64 {
        cfg_write(dev, msi + 8, 0);
    }
    cfg_write(dev, data, EDU_VECTOR);
    cfg_write(dev, msi, cfg_read(dev, msi) | 1 << 16);
    for vector in [EDU_VECTOR, EDU_VECTOR2] {
        if vector != EDU_VECTOR {
            cfg_write(dev, data, vector);
        }
        mmio_write(bar0 + EDU_IRQ_RAISE, 1);
        let delivered = wait_until(|| irr(vector));
        let status = mmio_read(bar0 + EDU_IRQ_STATUS);
        mmio_write(bar0 + EDU_IRQ_ACK, status);
        let _ = writeln!(
            out,
            "probe: edu msi vector {vector:#x} irr {} status {status:#x}",
            u32::from(delivered)
        );
    }

    // DMA: RAM -> device buffer, then device buffer -> another page of RAM.
    let pages = (&raw mut DMA_PAGES).cast::<u8>();
    let (from, to) = (pages as u64, pages as u64 + 4096);
    for i in 0..EDU_DMA_BYTES {
        // SAFETY: within DMA_PAGES, which only this function uses.
        unsafe {
            pages.add(i).write_volatile((i * 7 + 3) as u8);
            pages.add(4096 + i).write_volatile(0);
        }
    }
    let dma = |src: u64, dst: u64, cmd: u32| {
        mmio_write(bar0 + EDU_DMA_SRC, src as u32);
        mmio_write(bar0 + EDU_DMA_SRC + 4, (src >> 32) as u32);
        mmio_write(bar0 + EDU_DMA_DST, dst as u32);
        mmio_write(bar0 + EDU_DMA_DST + 4, (dst >> 32) as u32);
        mmio_write(bar0 + EDU_DMA_COUNT, EDU_DMA_BYTES as u32);
        mmio_write(bar0 + EDU_DMA_COUNT + 4, 0);
        mmio_write(bar0 + EDU_DMA_CMD, cmd | EDU_DMA_RUN);
        wait_until(|| mmio_read(bar0 + EDU_DMA_CMD) & EDU_DMA_RUN == 0)
    };
    if !dma(from, EDU_BUFFER, 0) {
        return Err("edu DMA from RAM never finished");
    }
    cfg_write(dev, data, EDU_DMA_VECTOR);
    if !dma(EDU_BUFFER, to, EDU_DMA_TO_RAM | EDU_DMA_IRQ) {
        return Err("edu DMA to RAM never finished");
    }
    let delivered = wait_until(|| irr(EDU_DMA_VECTOR));
    let status = mmio_read(bar0 + EDU_IRQ_STATUS);
    mmio_write(bar0 + EDU_IRQ_ACK, status);
    let same = (0..EDU_DMA_BYTES).all(|i| {
        // SAFETY: as above; volatile, since the device wrote it behind the compiler's back.
        unsafe { pages.add(4096 + i).read_volatile() == (i * 7 + 3) as u8 }
    });
    let _ = writeln!(
        out,
        "probe: edu dma {EDU_DMA_BYTES} bytes {from:#x} -> device -> {to:#x} {}",
        if same { "match" } else { "DIFFER" }
    );
    let _ = writeln!(
        out,
        "probe: edu dma interrupt vector {EDU_DMA_VECTOR:#x} irr {} status {status:#x}",
        u32::from(delivered)
    );
    // Bus mastering and MSI off again.
    cfg_write(dev, msi, cfg_read(dev, msi) & !(1 << 16));
    cfg_write(dev, 0x04, 0x2);
    Ok(())
}
