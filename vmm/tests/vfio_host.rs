//! The real VFIO path: a host PCI function bound to vfio-pci, passed through to the probe
//! guest, which must find it at 00:01.0 with the host's ids and BAR sizes.
//!
//! Runs wherever `/dev/vfio/vfio` exists and `MOAT_VFIO_DEVICE` names a function bound to
//! vfio-pci (its whole IOMMU group must be bound). Skipped, saying why, elsewhere: this
//! project's machines have no IOMMU and no `/dev/vfio` (both are nested-PVM KVM guests; the
//! GPU machine's H200 is driven by the nvidia driver inside its VM); see docs/gpu.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
    std::env::var("MOAT_VFIO_DEVICE").map_err(|_| {
        "/dev/vfio exists but MOAT_VFIO_DEVICE does not name a PCI function bound to vfio-pci"
            .to_owned()
    })
}

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
    let addr = match vfio_device() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
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
