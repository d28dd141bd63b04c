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
            "--pvm-workarounds",
            "off",
        ],
    );
    assert!(
        run.has_line("probe: cmdline \"console=ttyS0 moat.test=yes\""),
        "{}",
        run.serial
    );
}

#[test]
fn with_pvm_workarounds_the_vmm_adds_them_to_the_command_line() {
    require_kvm!();
    let run = common::run_vmm(
        "cmdline-pvm",
        &[
            "--kernel",
            &probe(),
            "--cmdline",
            "console=ttyS0",
            "--pvm-workarounds",
            "on",
        ],
    );
    assert!(
        run.has_line(
            "probe: cmdline \"console=ttyS0 noxsave clearcpuid=smap,smep,fsgsbase,pcid,invpcid,popcnt\""
        ),
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
fn an_exception_in_the_probe_is_reported_by_its_idt_not_a_triple_fault() {
    require_kvm!();
    let run = common::run_vmm(
        "fault",
        &["--kernel", &probe(), "--cmdline", "probe.fault=1"],
    );
    assert!(run.has_line("probe: faulting on purpose"), "{}", run.serial);
    assert!(
        run.serial
            .lines()
            .any(|l| l.starts_with("probe: FAIL exception 6 error 0x0 rip 0x")),
        "{}",
        run.serial
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
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

#[test]
fn stats_report_the_cost_of_a_boot() {
    require_kvm!();
    let run = common::run_vmm("stats", &["--kernel", &probe(), "--stats"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("moat-vmm stats: "))
        .expect("a stats line on stderr");
    for key in [
        "main_to_first_kvm_run_us",
        "cpu_us_at_first_kvm_run",
        "overhead_kib",
    ] {
        let v: i64 = line
            .split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1);
        assert!(v > 0, "{key} in {line}");
    }
}

#[test]
fn every_thread_of_a_running_vmm_is_confined_by_seccomp() {
    require_kvm!();
    let dir = common::scratch("confined");
    let uds = dir.join("v.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args([
            "--kernel",
            &probe(),
            "--cmdline",
            "probe.hang=1",
            "--timeout",
            "20",
            "--rng",
        ])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--serial-out")
        .arg(dir.join("serial.log"))
        .spawn()
        .unwrap();
    // Wait until the guest is running (its serial line is out), then look at every thread.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !std::fs::read_to_string(dir.join("serial.log"))
        .unwrap_or_default()
        .contains("hanging on purpose")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let tasks = format!("/proc/{}/task", child.id());
    let mut threads = Vec::new();
    for t in std::fs::read_dir(&tasks).unwrap() {
        let path = t.unwrap().path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned();
        threads.push((name.trim().to_owned(), mode));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(threads.len() >= 4, "{threads:?}");
    assert!(threads.iter().all(|(_, mode)| mode == "2"), "{threads:?}");
}

fn cpuid_line(run: &common::Run) -> String {
    run.serial
        .lines()
        .find(|l| l.starts_with("probe: cpuid "))
        .unwrap_or_default()
        .to_owned()
}

fn leaf1_ecx(line: &str) -> u32 {
    line.split("leaf1.ecx 0x")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

#[test]
fn pvm_workarounds_report_intel_and_hide_cx16_from_the_guest() {
    require_kvm!();
    let run = common::run_vmm(
        "cpuid-on",
        &[
            "--kernel",
            &probe(),
            "--cmdline",
            "probe.cpuid=1",
            "--pvm-workarounds",
            "on",
        ],
    );
    let line = cpuid_line(&run);
    assert!(line.contains("vendor GenuineIntel"), "{line}");
    assert_eq!(
        leaf1_ecx(&line) & (1 << 13),
        0,
        "CX16 must be hidden: {line}"
    );
}

#[test]
fn without_pvm_workarounds_the_guest_sees_cx16() {
    require_kvm!();
    let run = common::run_vmm(
        "cpuid-off",
        &[
            "--kernel",
            &probe(),
            "--cmdline",
            "probe.cpuid=1",
            "--pvm-workarounds",
            "off",
        ],
    );
    let line = cpuid_line(&run);
    assert_ne!(leaf1_ecx(&line) & (1 << 13), 0, "{line}");
}
