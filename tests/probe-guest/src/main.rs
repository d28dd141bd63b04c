//! moat probe guest: a tiny `no_std` PVH guest that proves moat-vmm through real KVM.
//!
//! It checks the boot parameters it was handed (the `hvm_start_info`, memory map, command line
//! and initramfs module), reports them on the serial port in a line format the host test
//! parses, drives the virtio-mmio vsock device when the command line declares one, and shuts
//! the machine down through the i8042 reset line. Everything runs in guest kernel mode, so it
//! is kept short: on a nested PVM host kernel-mode guest code is emulated at about a million
//! instructions a second.
//!
//! Output lines all start with `probe: `; the last one before the reset is `probe: done` (or
//! `probe: FAIL <why>`).

#![no_std]
#![no_main]

mod blk;
mod entry;
mod idt;
mod io;
mod pci;
mod pvh;
mod rng;
mod ticks;
mod virtio;
mod vsock;

use core::fmt::Write;
use io::Serial;

/// Called by the entry trampoline in long mode with the physical address of `hvm_start_info`.
#[unsafe(no_mangle)]
extern "C" fn probe_main(start_info: u32) -> ! {
    idt::load();
    let mut out = Serial;
    let _ = writeln!(out, "probe: hello from the probe guest");
    let result = run(&mut out, u64::from(start_info));
    match result {
        Ok(()) => {
            let nmis = idt::nmis();
            if nmis != 0 {
                let _ = writeln!(out, "probe: nmis {nmis}");
            }
            let _ = writeln!(out, "probe: done");
        }
        Err(why) => {
            let _ = writeln!(out, "probe: FAIL {why}");
        }
    }
    io::i8042_reset()
}

fn run(out: &mut Serial, start_info: u64) -> Result<(), &'static str> {
    let info = pvh::StartInfo::read(start_info)?;
    let _ = writeln!(out, "probe: start_info magic ok version {}", info.version);
    let cmdline = info.cmdline();
    let _ = writeln!(out, "probe: cmdline \"{cmdline}\"");
    for (i, e) in info.memmap().enumerate() {
        let _ = writeln!(
            out,
            "probe: memmap {i} addr {:#x} size {:#x} type {}",
            e.addr, e.size, e.kind
        );
    }
    for (i, m) in info.modules().enumerate() {
        let sum = pvh::checksum(m.paddr, m.size);
        let _ = writeln!(
            out,
            "probe: module {i} addr {:#x} size {} sum {:#010x}",
            m.paddr, m.size, sum
        );
    }
    if param(cmdline, "probe.cpuid=").is_some() {
        let (_, _, ecx1, _) = io::cpuid(1, 0);
        let (_, ebx7, ecx7, _) = io::cpuid(7, 0);
        let (_, b0, c0, d0) = io::cpuid(0, 0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&b0.to_le_bytes());
        vendor[4..8].copy_from_slice(&d0.to_le_bytes());
        vendor[8..].copy_from_slice(&c0.to_le_bytes());
        let _ = writeln!(
            out,
            "probe: cpuid vendor {} leaf1.ecx {ecx1:#010x} leaf7.ebx {ebx7:#010x} leaf7.ecx {ecx7:#010x}",
            core::str::from_utf8(&vendor).unwrap_or("?")
        );
    }
    if param(cmdline, "probe.crash=").is_some() {
        let _ = writeln!(out, "probe: crashing on purpose");
        io::triple_fault();
    }
    if param(cmdline, "probe.fault=").is_some() {
        let _ = writeln!(out, "probe: faulting on purpose");
        // SAFETY: raises #UD, which the IDT's gate reports; it never returns.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) };
    }
    if param(cmdline, "probe.hang=").is_some() {
        let _ = writeln!(out, "probe: hanging on purpose");
        io::hang();
    }
    if param(cmdline, "probe.serial_echo=").is_some() {
        serial_echo(out)?;
    }
    if param(cmdline, "probe.rng=").is_some() {
        let (slot, base) = virtio::find(cmdline, 4, 0).ok_or("no rng device found")?;
        rng::test(out, slot, base)?;
    }
    if param(cmdline, "probe.block=").is_some() {
        for nth in 0..2 {
            if let Some((slot, base)) = virtio::find(cmdline, 2, nth) {
                blk::test(out, nth, slot, base)?;
            }
        }
    }
    match param(cmdline, "probe.pci=") {
        Some("list") => pci::list(out),
        Some("edu") => pci::edu(out)?,
        Some(_) => pci::test(out)?,
        None => {}
    }
    if let Some(n) = param(cmdline, "probe.ticks=") {
        let n: u64 = n.parse().map_err(|_| "bad probe.ticks count")?;
        ticks::run(out, n, virtio::find(cmdline, 4, 0))?;
    }
    if let Some(port) = param(cmdline, "probe.vsock_echo=") {
        let (slot, base) = virtio::find(cmdline, 19, 0).ok_or("no vsock device found")?;
        let port: u32 = port.parse().map_err(|_| "bad probe.vsock_echo port")?;
        let bytes = param(cmdline, "probe.vsock_bytes=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096usize);
        vsock::echo_test(out, slot, base, port, bytes)?;
    }
    Ok(())
}

/// Reads one line from COM1 and echoes it upper-cased: `probe: serial echo <LINE>`.
fn serial_echo(out: &mut Serial) -> Result<(), &'static str> {
    let _ = writeln!(out, "probe: serial echo ready");
    let mut line = [0u8; 64];
    let mut len = 0;
    loop {
        let b = io::read_byte(50_000_000).ok_or("no serial input")?;
        if b == b'\n' || b == b'\r' {
            break;
        }
        if let Some(slot) = line.get_mut(len) {
            *slot = b.to_ascii_uppercase();
            len += 1;
        }
    }
    let text = core::str::from_utf8(&line[..len]).unwrap_or("?");
    let _ = writeln!(out, "probe: serial echo {text}");
    Ok(())
}

/// The value of `key` (which ends in `=`) on the command line.
fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split(' ').find_map(|word| word.strip_prefix(key))
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Serial, "probe: FAIL panic");
    io::i8042_reset()
}
