//! A real Linux kernel booted through moat-vmm up to `Run /init`, with Linux's own virtio-mmio,
//! virtio-blk, virtio-rng and vsock drivers probing our devices. On nested PVM guest user space
//! cannot run, so /init faults, the kernel panics and `panic=-1` resets the machine (exit 0).
//!
//! Needs the vmlinux `cargo xtask images kernel` builds, named by MOAT_LINUX_KERNEL; skipped
//! with a printed reason otherwise (or without /dev/kvm). About 20 s on the nested PVM host.
//! MOAT_LINUX_PCI_KERNEL (that kernel plus CONFIG_PCI and CONFIG_PCI_MSI) runs the PCI
//! enumeration test against the fake passthrough device.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::PathBuf;

/// A static x86-64 ELF whose entry calls exit(0): the smallest possible /init.
fn tiny_init() -> Vec<u8> {
    let code = [0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]; // mov eax,60; xor edi,edi; syscall
    let base = 0x40_0000u64;
    let entry = base + 120;
    let total = (120 + code.len()) as u64;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&entry.to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0u64, base, base, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

/// A newc cpio archive of `(name, mode, rdev major, rdev minor, data)` entries.
fn cpio(entries: &[(&str, u32, u32, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let pad = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    let mut all: Vec<(&str, u32, u32, u32, &[u8])> = entries.to_vec();
    all.push(("TRAILER!!!", 0, 0, 0, &[]));
    for (ino, (name, mode, maj, min, data)) in (1u32..).zip(all) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            maj,
            min,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(data);
        pad(&mut out);
    }
    out
}

fn initramfs(dir: &std::path::Path) -> PathBuf {
    let init = tiny_init();
    let initrd = dir.join("initrd.cpio");
    std::fs::write(
        &initrd,
        cpio(&[
            ("dev", 0o040_755, 0, 0, &[]),
            ("dev/console", 0o020_600, 5, 1, &[]),
            ("init", 0o100_755, 0, 0, &init),
        ]),
    )
    .unwrap();
    initrd
}

/// The Linux boots run one at a time: each keeps a host CPU busy emulating guest kernel code.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The same on every host: on nested PVM moat-vmm appends the workarounds that host needs.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

#[test]
fn smp_linux_brings_up_every_vcpu_from_our_mp_table() {
    require_kvm!();
    let Some(kernel) = std::env::var_os("MOAT_LINUX_SMP_KERNEL").map(PathBuf::from) else {
        common::skip(
            "set MOAT_LINUX_SMP_KERNEL to the vmlinux `cargo xtask images kernel-smp` builds \
             (`cargo xtask test` sets it for the VM tests in L1; under kvm_pvm this boot takes \
             about 100 s)",
        );
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let dir = common::scratch("linux-smp");
    let initrd = initramfs(&dir);
    let run = common::run_vmm_with_timeout(
        "linux-smp-run",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vcpus",
            "2",
            "--cmdline",
            CMDLINE,
        ],
        300,
    );
    let has = |s: &str| run.serial.contains(s);
    assert!(has("smp: Brought up 1 node, 2 CPUs"), "{}", run.serial);
    assert!(has("Run /init as init process"), "{}", run.serial);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn linux_finds_the_pci_host_bridge_and_keeps_the_bars_we_placed() {
    require_kvm!();
    let Some(kernel) = std::env::var_os("MOAT_LINUX_PCI_KERNEL").map(PathBuf::from) else {
        common::skip(
            "set MOAT_LINUX_PCI_KERNEL to the vmlinux `cargo xtask images kernel-gpu` \
             builds (`cargo xtask test` sets it)",
        );
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    // No initramfs: PCI is probed at subsys_initcall, long before the root mount fails and
    // panic=-1 resets the machine.
    let run = common::run_vmm_with_timeout(
        "linux-pci-run",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--test-fake-gpu",
            "--cmdline",
            CMDLINE,
        ],
        180,
    );
    for want in [
        "PCI: Using configuration type 1 for base access",
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        "pci 0000:00:01.0: [6d6f:6174] type 00 class 0x030200",
        "pci 0000:00:01.0: BAR 0 [mem 0x1000000000-0x11ffffffff 64bit pref]",
        "pci 0000:00:01.0: BAR 2 [mem 0xc0000000-0xc0003fff]",
    ] {
        assert!(
            run.serial.contains(want),
            "missing {want:?} in:\n{}",
            run.serial
        );
    }
    assert!(
        !run.serial.contains("BAR 0 [mem size") && !run.serial.contains("can't claim"),
        "Linux reassigned a BAR: {}",
        run.serial
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn linux_bzimage_boots_to_init_through_the_64_bit_boot_protocol() {
    require_kvm!();
    let Some(kernel) = std::env::var_os("MOAT_LINUX_BZIMAGE").map(PathBuf::from) else {
        common::skip(
            "set MOAT_LINUX_BZIMAGE to a bzImage from \
             `cargo xtask images kernel` (LZ4; this boot takes about 80 s here)",
        );
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let dir = common::scratch("linux-bzimage");
    let initrd = initramfs(&dir);
    let start = std::time::Instant::now();
    let run = common::run_vmm_with_timeout(
        "linux-bzimage-run",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "256",
            "--cmdline",
            CMDLINE,
        ],
        300,
    );
    eprintln!(
        "bzImage boot through moat-vmm: {:.1} s wall",
        start.elapsed().as_secs_f64()
    );
    let has = |s: &str| run.serial.contains(s);
    // Our zero page: the command line, the e820 table, the initramfs.
    assert!(has(&format!("Command line: {CMDLINE}")), "{}", run.serial);
    assert!(
        has("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{}",
        run.serial
    );
    assert!(has("Run /init as init process"), "{}", run.serial);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn linux_boots_to_init_with_our_virtio_devices() {
    require_kvm!();
    let Some(kernel) = std::env::var_os("MOAT_LINUX_KERNEL").map(PathBuf::from) else {
        common::skip("set MOAT_LINUX_KERNEL to the vmlinux `cargo xtask images kernel` builds");
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let dir = common::scratch("linux");
    let initrd = initramfs(&dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.join("v.sock");
    let start = std::time::Instant::now();
    let run = common::run_vmm_with_timeout(
        "linux-run",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "256",
            "--rng",
            "--block",
            disk.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--cmdline",
            CMDLINE,
            "--stats",
        ],
        180,
    );
    eprintln!(
        "Linux boot through moat-vmm: {:.1} s wall",
        start.elapsed().as_secs_f64()
    );
    let has = |s: &str| run.serial.contains(s);
    assert!(
        has("virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000"),
        "{}",
        run.serial
    );
    assert!(
        has("virtio_blk virtio1: [vda] 2048 512-byte logical blocks"),
        "{}",
        run.serial
    );
    assert!(
        has("NET: Registered PF_VSOCK protocol family"),
        "{}",
        run.serial
    );
    assert!(
        has("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"),
        "{}",
        run.serial
    );
    assert!(
        has("IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23"),
        "{}",
        run.serial
    );
    assert!(has("Run /init as init process"), "{}", run.serial);
    assert_eq!(
        run.code,
        Some(0),
        "panic=-1 resets through the i8042: {}",
        run.stderr
    );
    // Linux's drivers really used the devices: the partition scan read the disk, and the
    // hw_random virtio driver pulled entropy.
    let stats = run
        .stderr
        .lines()
        .find(|l| l.starts_with("moat-vmm stats: "))
        .unwrap_or_default();
    let counter = |dev: &str, name: &str| -> u64 {
        stats
            .split(&format!("\"{dev}\":{{"))
            .nth(1)
            .and_then(|r| r.split(&format!("\"{name}\":")).nth(1))
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(counter("block0", "reads") > 0, "{stats}");
    assert!(counter("rng", "requests") > 0, "{stats}");
    assert_eq!(counter("block0", "errors"), 0, "{stats}");
    eprintln!("{stats}");
}
