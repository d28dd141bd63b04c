//! The probe guest booted through real KVM: the machine, boot parameters, serial console,
//! i8042 shutdown and the exit codes. Skipped with a printed reason where /dev/kvm is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

fn probe() -> String {
    common::probe_guest().to_string_lossy().into_owned()
}

#[test]
fn probe_guest_boots_prints_and_resets_cleanly() {
    require_kvm!();
    let run = common::run_vmm("boot", &["--kernel", &probe(), "--mem", "64"]);
    assert_eq!(
        run.code,
        Some(0),
        "stderr: {}\nserial: {}",
        run.stderr,
        run.serial
    );
    assert!(
        run.has_line("probe: hello from the probe guest"),
        "{}",
        run.serial
    );
    assert!(
        run.has_line("probe: start_info magic ok version 1"),
        "{}",
        run.serial
    );
    assert!(run.has_line("probe: done"), "{}", run.serial);
}

#[test]
fn probe_guest_sees_the_command_line() {
    require_kvm!();
    let run = common::run_vmm(
        "cmdline",
        &[
            "--kernel",
            &probe(),
            "--cmdline",
            "console=ttyS0 moat.test=yes",
        ],
    );
    assert!(
        run.has_line("probe: cmdline \"console=ttyS0 moat.test=yes\""),
        "{}",
        run.serial
    );
}

#[test]
fn probe_guest_sees_a_memory_map_of_its_size() {
    require_kvm!();
    let run = common::run_vmm("memmap", &["--kernel", &probe(), "--mem", "96"]);
    assert!(
        run.has_line("probe: memmap 0 addr 0x0 size 0x9fc00 type 1"),
        "{}",
        run.serial
    );
    assert!(
        run.has_line("probe: memmap 1 addr 0x9fc00 size 0x60400 type 2"),
        "{}",
        run.serial
    );
    assert!(
        run.has_line(&format!(
            "probe: memmap 2 addr 0x100000 size {:#x} type 1",
            (96u64 << 20) - 0x10_0000
        )),
        "{}",
        run.serial
    );
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn probe_guest_receives_the_initramfs_intact() {
    require_kvm!();
    let dir = common::scratch("initrd-data");
    let initrd = dir.join("initrd.img");
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let run = common::run_vmm(
        "initrd",
        &[
            "--kernel",
            &probe(),
            "--mem",
            "64",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    let want_addr = ((64u64 << 20) - data.len() as u64) & !0xfff;
    assert!(
        run.has_line(&format!(
            "probe: module 0 addr {want_addr:#x} size {} sum {:#010x}",
            data.len(),
            fnv1a(&data)
        )),
        "{}",
        run.serial
    );
}

#[test]
fn guest_triple_fault_exits_with_code_3() {
    require_kvm!();
    let run = common::run_vmm(
        "crash",
        &["--kernel", &probe(), "--cmdline", "probe.crash=1"],
    );
    assert!(run.has_line("probe: crashing on purpose"), "{}", run.serial);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
}

#[test]
fn hung_guest_is_stopped_by_the_timeout_with_code_4() {
    require_kvm!();
    let dir = common::scratch("hang-serial");
    let serial = dir.join("serial.log");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args([
            "--kernel",
            &probe(),
            "--cmdline",
            "probe.hang=1",
            "--timeout",
            "1",
        ])
        .arg("--serial-out")
        .arg(&serial)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn serial_output_is_capped() {
    require_kvm!();
    let run = common::run_vmm("cap", &["--kernel", &probe(), "--serial-cap", "20"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.serial.len(), 20, "{:?}", run.serial);
}
