//! virtio-blk and virtio-rng driven by the probe guest through real KVM. Skipped with a printed
//! reason where /dev/kvm is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn probe_guest_reads_entropy_from_virtio_rng() {
    require_kvm!();
    let probe = common::probe_guest();
    let run = common::run_vmm(
        "rng",
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--rng",
            "--cmdline",
            "probe.rng=1",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.has_line("probe: rng got 64 bytes nonzero true"),
        "{}",
        run.serial
    );
}

#[test]
fn probe_guest_reads_and_writes_disks_and_read_only_is_enforced() {
    require_kvm!();
    let dir = common::scratch("blk-data");
    let ro = dir.join("ro.img");
    let rw = dir.join("rw.img");
    std::fs::write(&ro, vec![0u8; 8 * 512]).unwrap();
    std::fs::write(&rw, vec![0u8; 16 * 512]).unwrap();
    let probe = common::probe_guest();
    let run = common::run_vmm(
        "blk",
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--block-ro",
            ro.to_str().unwrap(),
            "--block",
            rw.to_str().unwrap(),
            "--cmdline",
            "probe.block=1",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for want in [
        "probe: block0 sectors 8 read0 status 0 sum 0x00000000",
        "probe: block0 write1 status 1",
        "probe: block0 read1 status 0 has_mark false",
        "probe: block0 read past end status 1",
        "probe: block1 sectors 16 read0 status 0 sum 0x00000000",
        "probe: block1 write1 status 0",
        "probe: block1 read1 status 0 has_mark true",
        "probe: block1 read past end status 1",
    ] {
        assert!(run.has_line(want), "missing {want:?} in:\n{}", run.serial);
    }
    let rw_img = std::fs::read(&rw).unwrap();
    assert!(rw_img[512..].starts_with(b"written by the moat probe"));
    assert!(std::fs::read(&ro).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn stats_count_what_the_devices_did() {
    require_kvm!();
    let dir = common::scratch("metrics-data");
    let rw = dir.join("rw.img");
    std::fs::write(&rw, vec![0u8; 8 * 512]).unwrap();
    let probe = common::probe_guest();
    let run = common::run_vmm(
        "metrics",
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--rng",
            "--block",
            rw.to_str().unwrap(),
            "--stats",
            "--cmdline",
            "probe.rng=1 probe.block=1",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("moat-vmm stats: "))
        .unwrap_or_default();
    // The probe: one 64-byte entropy request; reads of sectors 0 and 1, a write of sector 1,
    // and one read past the end.
    assert!(
        line.contains("\"rng\":{\"requests\":1,\"bytes\":64}"),
        "{line}"
    );
    assert!(
        line.contains(
            "\"block0\":{\"reads\":2,\"writes\":1,\"flushes\":0,\"read_bytes\":1024,\
             \"write_bytes\":512,\"errors\":1}"
        ),
        "{line}"
    );
}
