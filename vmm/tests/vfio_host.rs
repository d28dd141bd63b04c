//! The real VFIO path: a host PCI function bound to vfio-pci, passed through to the probe
//! guest (and to Linux), which must find it at 00:01.0 with the host's ids and BAR sizes. With
//! QEMU's educational device (`-device edu`, 1234:11e8, as every L1 of `cargo xtask l1` has),
//! the probe also reads its registers through the mapped BAR, takes its MSIs and moves data
//! both ways by DMA through the IOMMU mapping of guest RAM; the VMM must then exit cleanly,
//! jailed or not (VFIO teardown under the seccomp filters).
//!
//! Runs wherever `/dev/vfio/vfio` exists and `MOAT_VFIO_DEVICE` names a function bound to
//! vfio-pci (its whole IOMMU group must be bound), with `ulimit -l unlimited` (VFIO pins guest
//! RAM); inside L1 `cargo xtask l1` binds the edu
//! device and sets it. Skipped, saying why, elsewhere (this project's machines have no IOMMU
//! and no `/dev/vfio`; see docs/gpu.md), except where `MOAT_EXPECT_VFIO` says a device is
//! there (the VM tests in L1): then a missing device fails the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

/// Why the real VFIO path cannot run here, or the device to pass through.
fn vfio_device() -> Result<String, String> {
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        return Err(
            "/dev/vfio/vfio does not exist: this host has no VFIO (no IOMMU, or vfio-pci not \
             loaded; this project's machines are nested-PVM KVM guests without an IOMMU, see \
             docs/gpu.md)"
                .to_owned(),
        );
    }
    let addr = std::env::var("MOAT_VFIO_DEVICE").map_err(|_| {
        "/dev/vfio exists but MOAT_VFIO_DEVICE does not name a PCI function bound to vfio-pci"
            .to_owned()
    })?;
    let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{addr}/driver"))
        .map_err(|e| format!("MOAT_VFIO_DEVICE={addr}: no driver bound ({e})"))?;
    if !driver.ends_with("vfio-pci") {
        return Err(format!(
            "MOAT_VFIO_DEVICE={addr} is bound to {}, not vfio-pci",
            driver.display()
        ));
    }
    Ok(addr)
}

/// The device to pass through, or `None` after saying why the test is skipped; fails the test
/// instead where `MOAT_EXPECT_VFIO` says there must be one.
fn device_or_skip() -> Option<String> {
    match vfio_device() {
        Ok(addr) => Some(addr),
        Err(why) => {
            assert!(
                std::env::var_os("MOAT_EXPECT_VFIO").is_none(),
                "MOAT_EXPECT_VFIO is set, so a VFIO device must be here, but: {why}"
            );
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// The edu device, or `None` after saying why the test is skipped (fails where
/// `MOAT_EXPECT_VFIO` is set: L1's device is an edu).
fn edu_or_skip() -> Option<String> {
    let addr = device_or_skip()?;
    let id = (sysfs_hex(&addr, "vendor"), sysfs_hex(&addr, "device"));
    if id == (0x1234, 0x11e8) {
        return Some(addr);
    }
    let why = format!(
        "MOAT_VFIO_DEVICE={addr} is {:04x}:{:04x}, not QEMU's edu device (1234:11e8)",
        id.0, id.1
    );
    assert!(
        std::env::var_os("MOAT_EXPECT_VFIO").is_none(),
        "MOAT_EXPECT_VFIO is set, but {why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// One edu run at a time: the device has one owner.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sysfs_hex(addr: &str, file: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{addr}/{file}")).unwrap();
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
}

/// The host's memory BAR sizes, by index (the `resource` file: start, end, flags per line).
fn host_bar_sizes(addr: &str) -> Vec<(usize, u64)> {
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{addr}/resource")).unwrap();
    text.lines()
        .take(6)
        .enumerate()
        .filter_map(|(i, line)| {
            let v: Vec<u64> = line
                .split_whitespace()
                .map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap())
                .collect();
            let (start, end, flags) = (v[0], v[1], v[2]);
            // IORESOURCE_MEM (0x200); I/O BARs are hidden from the guest.
            (end > start && flags & 0x200 != 0).then_some((i, end - start + 1))
        })
        .collect()
}

#[test]
fn a_host_function_reaches_the_guest_with_its_ids_and_bars() {
    require_kvm!();
    let Some(addr) = device_or_skip() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let probe = common::probe_guest();
    let run = common::run_vmm(
        "vfio-host",
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--mem",
            "512",
            "--gpu",
            &addr,
            "--cmdline",
            "probe.pci=list",
        ],
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, run.serial);
    let (vendor, device) = (sysfs_hex(&addr, "vendor"), sysfs_hex(&addr, "device"));
    let want = format!("probe: pci 00:01.0 id {vendor:04x}:{device:04x}");
    assert!(
        run.serial.lines().any(|l| l.starts_with(&want)),
        "missing {want:?} in:\n{}",
        run.serial
    );
    for (bar, size) in host_bar_sizes(&addr) {
        let want = format!("bar{bar} ");
        let line = run
            .serial
            .lines()
            .find(|l| l.starts_with("probe: pci 00:01.0 ") && l.contains(&want));
        assert!(
            line.is_some_and(|l| l.contains(&format!("size {size:#x} "))),
            "BAR {bar} of {size:#x} bytes not seen in:\n{}",
            run.serial
        );
    }
    assert!(run.has_line("probe: pci 00:01.0 rom 0x0"), "{}", run.serial);
}

/// What the probe must print after driving the edu device.
const EDU_LINES: &[&str] = &[
    "probe: pci 00:01.0 id 1234:11e8 class 00ff00",
    "probe: edu id 0x010000ed",
    "probe: edu liveness 0xedcba987",
    "probe: edu msi vector 0x43 irr 1 status 0x1",
    "probe: edu msi vector 0x44 irr 1 status 0x1",
    "probe: edu dma interrupt vector 0x45 irr 1 status 0x100",
    "probe: done",
];

fn assert_edu_driven(serial: &str) {
    for want in EDU_LINES {
        assert!(
            serial.lines().any(|l| l == *want),
            "missing {want:?} in:\n{serial}"
        );
    }
    assert!(
        serial
            .lines()
            .any(|l| l.starts_with("probe: edu dma 2048 bytes ") && l.ends_with(" match")),
        "DMA through the IOMMU did not round-trip:\n{serial}"
    );
}

#[test]
fn the_edu_device_answers_through_its_bar_with_msis_and_dma_and_the_vmm_exits_cleanly() {
    require_kvm!();
    let Some(addr) = edu_or_skip() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let probe = common::probe_guest();
    let started = std::time::Instant::now();
    let run = common::run_vmm(
        "vfio-edu",
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--mem",
            "256",
            "--gpu",
            &addr,
            "--cmdline",
            "probe.pci=edu",
        ],
    );
    eprintln!("edu run: {:.1} s", started.elapsed().as_secs_f64());
    assert_edu_driven(&run.serial);
    // Exit 0, not 159: VFIO teardown must not run on a thread whose seccomp filter forbids it.
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, run.serial);
}

/// A private copy of the probe: cargo hard-links its outputs, and the jail refuses hard links.
fn probe_copy(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("probe.elf");
    std::fs::copy(common::probe_guest(), &p).unwrap();
    p
}

#[test]
fn a_jailed_vmm_drives_the_edu_device_and_exits_cleanly() {
    require_kvm!();
    let Some(addr) = edu_or_skip() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock();
    let dir = common::scratch("vfio-edu-jail");
    let serial = dir.join("serial.log");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(probe_copy(&dir))
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args([
            "--mem",
            "256",
            "--gpu",
            &addr,
            "--cmdline",
            "probe.pci=edu",
            "--timeout",
            "60",
        ])
        .arg("--serial-out")
        .arg(&serial)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_edu_driven(&log);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn linux_enumerates_the_passed_through_edu_device() {
    require_kvm!();
    let Some(addr) = edu_or_skip() else {
        return;
    };
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
        "vfio-edu-linux",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "256",
            "--gpu",
            &addr,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1",
        ],
        180,
    );
    for want in [
        "pci 0000:00:01.0: [1234:11e8] type 00 class 0x00ff00",
        "pci 0000:00:01.0: BAR 0 [mem 0xc0000000-0xc00fffff]",
    ] {
        assert!(
            run.serial.contains(want),
            "missing {want:?} in:\n{}",
            run.serial
        );
    }
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, run.serial);
}
