//! PCI and MSI-X through real KVM: the probe guest enumerates bus 0 through configuration
//! mechanism #1, finds the fake VFIO device (offered by the test-only `--test-fake-gpu`),
//! sizes its BARs, walks its capabilities and takes MSI-X and MSI interrupts from its doorbell
//! into the local APIC. Skipped with a printed reason where /dev/kvm is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// One boot serves every test here (each checks its own lines of the same log).
fn run_fake_gpu() -> &'static common::Run {
    static RUN: std::sync::OnceLock<common::Run> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let probe = common::probe_guest();
        common::run_vmm(
            "pci",
            &[
                "--kernel",
                probe.to_str().unwrap(),
                "--test-fake-gpu",
                "--cmdline",
                "probe.pci=1",
            ],
        )
    })
}

#[test]
fn the_probe_finds_the_host_bridge_and_the_passthrough_device_on_bus_0() {
    require_kvm!();
    let run = run_fake_gpu();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, run.serial);
    for want in [
        "probe: pci 00:00.0 id 1b36:0008 class 060000",
        "probe: pci 00:01.0 id 6d6f:6174 class 030200",
    ] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
}

#[test]
fn the_probe_sizes_a_64_bit_bar_above_ram_and_a_32_bit_bar_below_4_gib() {
    require_kvm!();
    let run = run_fake_gpu();
    for want in [
        "probe: pci 00:01.0 bar0 64-bit prefetchable true size 0x200000000 addr 0x1000000000",
        "probe: pci 00:01.0 bar2 32-bit prefetchable false size 0x4000 addr 0xc0000000",
        "probe: pci 00:01.0 rom 0x0",
        "probe: pci 00:01.0 interrupt pin 0",
    ] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
    assert!(!run.serial.contains("bar4"), "I/O BAR hidden");
    assert!(!run.serial.contains("bar1"), "BAR 1 is BAR 0's upper half");
}

#[test]
fn the_probe_sees_msi_msi_x_and_power_management() {
    require_kvm!();
    let run = run_fake_gpu();
    for want in [
        "probe: pci 00:01.0 caps 0x05 0x11 0x01",
        "probe: pci msix vectors 4 table bar2 0x2000 pba bar2 0x3000",
    ] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
}

#[test]
fn an_msi_x_interrupt_reaches_the_lapic_only_once_unmasked_and_follows_a_rewrite() {
    require_kvm!();
    let run = run_fake_gpu();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, run.serial);
    for want in [
        "probe: pci msix masked doorbell pba 1 irr 0",
        "probe: pci msix unmasked vector 0x40 irr 1 pba 0",
        "probe: pci msix rewritten vector 0x41 irr 1",
        "probe: done",
    ] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
}

#[test]
fn an_msi_interrupt_reaches_the_lapic_once_msi_x_is_off() {
    require_kvm!();
    let run = run_fake_gpu();
    for want in ["probe: pci msi vector 0x42 irr 1", "probe: done"] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
}
