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

mod entry;
mod io;
mod pvh;
mod vsock;

use core::fmt::Write;
use io::Serial;

/// Called by the entry trampoline in long mode with the physical address of `hvm_start_info`.
#[unsafe(no_mangle)]
extern "C" fn probe_main(start_info: u32) -> ! {
    let mut out = Serial;
    let _ = writeln!(out, "probe: hello from the probe guest");
    let result = run(&mut out, u64::from(start_info));
    match result {
        Ok(()) => {
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
    if param(cmdline, "probe.crash=").is_some() {
        let _ = writeln!(out, "probe: crashing on purpose");
        io::triple_fault();
    }
    if param(cmdline, "probe.hang=").is_some() {
        let _ = writeln!(out, "probe: hanging on purpose");
        io::hang();
    }
    if let Some(port) = param(cmdline, "probe.vsock_echo=") {
        let base = vsock_base(cmdline).ok_or("no virtio_mmio.device on the command line")?;
        let port: u32 = port.parse().map_err(|_| "bad probe.vsock_echo port")?;
        let bytes = param(cmdline, "probe.vsock_bytes=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096usize);
        vsock::echo_test(out, base, port, bytes)?;
    }
    Ok(())
}

/// The value of `key` (which ends in `=`) on the command line.
fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split(' ').find_map(|word| word.strip_prefix(key))
}

/// Base address of the first `virtio_mmio.device=<size>@<base>:<irq>` on the command line.
fn vsock_base(cmdline: &str) -> Option<u64> {
    let spec = param(cmdline, "virtio_mmio.device=")?;
    let (_, rest) = spec.split_once('@')?;
    let (base, _) = rest.split_once(':')?;
    let hex = base.strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Serial, "probe: FAIL panic");
    io::i8042_reset()
}
