//! VMM verbs for `cargo xtask`: building the probe guest and benchmarking the VMM.
//!
//! - `probe_guest()`: builds `tests/probe-guest` for x86_64-unknown-none and returns the ELF
//!   (tests pick it up through `MOAT_PROBE_GUEST`; they can also build it themselves).
//! - `bench()`: the VMM's cost against Firecracker's published budget (8 CPU ms from process
//!   start to the guest's first instruction, 5 MiB of VMM memory beyond guest RAM), from ten
//!   `moat-vmm --stats` boots of the probe through real KVM, then the vsock device-model
//!   throughput benchmark (goal 20 Gbit/s guest-to-host).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run_cmd};

/// Builds the probe guest; returns its path.
pub(crate) fn probe_guest() -> Result<PathBuf> {
    let dir = root().join("tests/probe-guest");
    run_cmd(
        crate::setup::cargo()
            .current_dir(&dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["build", "--release", "--target", "x86_64-unknown-none"]),
    )
    .context("building the probe guest needs `rustup target add x86_64-unknown-none`")?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| dir.join("target"), PathBuf::from);
    Ok(target_dir.join("x86_64-unknown-none/release/moat-probe-guest"))
}

fn field(line: &str, key: &str) -> Option<i64> {
    line.split(&format!("\"{key}\":"))
        .nth(1)?
        .split([',', '}'])
        .next()?
        .parse()
        .ok()
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(-1)
}

/// `cargo xtask bench` part for the VMM.
pub(crate) fn bench() -> Result<()> {
    let probe = probe_guest()?;
    run_cmd(crate::setup::cargo().current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "moat-vmm",
    ]))?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let vmm = target_dir.join("release/moat-vmm");
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("xtask: SKIPPED VMM boot cost: /dev/kvm is not usable here");
    } else {
        let (mut time, mut cpu, mut mem) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10 {
            let out = Command::new(&vmm)
                .arg("--kernel")
                .arg(&probe)
                .args([
                    "--mem",
                    "256",
                    "--stats",
                    "--timeout",
                    "30",
                    "--serial-out",
                    "/dev/null",
                ])
                .output()
                .context("cannot run moat-vmm")?;
            if !out.status.success() {
                bail!("moat-vmm failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .find(|l| l.starts_with("moat-vmm stats: "))
                .context("moat-vmm printed no stats line")?;
            time.push(field(line, "main_to_first_kvm_run_us").unwrap_or(-1));
            cpu.push(field(line, "cpu_us_at_first_kvm_run").unwrap_or(-1));
            mem.push(field(line, "overhead_kib").unwrap_or(-1));
        }
        let (t, c, m) = (median(time), median(cpu), median(mem));
        println!("| VMM metric (median of 10 probe boots) | value | Firecracker budget |");
        println!("| --- | --- | --- |");
        println!(
            "| main() to first KVM_RUN, wall | {:.2} ms | - |",
            t as f64 / 1000.0
        );
        println!(
            "| CPU until first KVM_RUN | {:.2} ms | 8 ms |",
            c as f64 / 1000.0
        );
        println!(
            "| memory beyond touched guest RAM | {:.2} MiB | 5 MiB |",
            m as f64 / 1024.0
        );
    }
    linux_boot_bench(&vmm)?;
    run_cmd(crate::setup::cargo().current_dir(root()).args([
        "bench",
        "-p",
        "moat-vmm",
        "--features",
        "test-utils",
        "--bench",
        "vsock_throughput",
    ]))
}

/// Time from starting moat-vmm to the kernel's `Run /init` line on the serial console: our
/// kernel and initramfs, 256 MiB, one vCPU, rng and a vsock device, as the vm backend boots
/// them (on nested PVM with the command-line workarounds it needs there).
fn linux_boot_bench(vmm: &std::path::Path) -> Result<()> {
    use std::io::BufRead;
    let kernel = crate::images::kernel()?;
    let initramfs = crate::images::initramfs()?;
    // On nested PVM moat-vmm adds the command-line workarounds that host needs.
    let cmdline = "console=ttyS0 reboot=k panic=-1";
    let pvm = moat_host_probe::kvm_flavour() == moat_host_probe::KvmFlavour::NestedPvm;
    let dir = std::env::temp_dir().join(format!("moat-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(&kernel.vmlinux)
        .arg("--initrd")
        .arg(&initramfs)
        .args([
            "--cmdline",
            cmdline,
            "--mem",
            "256",
            "--rng",
            "--timeout",
            "300",
        ])
        .arg("--vsock-uds")
        .arg(dir.join("vsock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot run moat-vmm")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut to_init = None;
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains("Run /init as init process") {
            to_init = Some((started.elapsed(), line));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let (wall, line) = to_init.context("the kernel never reached `Run /init`")?;
    println!();
    println!(
        "| Linux boot ({}) | value | goal on real KVM |",
        if pvm { "nested PVM" } else { "KVM" }
    );
    println!("| --- | --- | --- |");
    println!(
        "| moat-vmm start to `Run /init`, wall | {:.2} s (kernel: `{}`) | guest-init < 100 ms |",
        wall.as_secs_f64(),
        line.trim()
    );
    Ok(())
}

/// Builds (or finds cached) the guest kernel and initramfs (`cargo xtask images`) and boots
/// them through real KVM with moat-vmm's Linux boot test.
pub(crate) fn linux_boot_test() -> Result<()> {
    let kernel = crate::images::kernel()?;
    let initramfs = crate::images::initramfs()?;
    run_cmd(
        crate::setup::cargo()
            .current_dir(root())
            .env("MOAT_LINUX_KERNEL", &kernel.vmlinux)
            .env("MOAT_LINUX_BZIMAGE", &kernel.bzimage)
            .env("MOAT_LINUX_INITRAMFS", &initramfs)
            .args([
                "test",
                "-p",
                "moat-vmm",
                "--test",
                "linux_boot",
                "--",
                "--nocapture",
            ]),
    )
}
