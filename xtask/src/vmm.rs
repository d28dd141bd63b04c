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
        Command::new(env!("CARGO"))
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
    run_cmd(Command::new(env!("CARGO")).current_dir(root()).args([
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
    run_cmd(Command::new(env!("CARGO")).current_dir(root()).args([
        "bench",
        "-p",
        "moat-vmm",
        "--features",
        "test-utils",
        "--bench",
        "vsock_throughput",
    ]))
}

/// Builds the test kernel (vmm/tests/linux/build-kernel.sh, about 8 minutes on 2 cores) and
/// runs the Linux boot test through real KVM with it.
pub(crate) fn linux_boot_test() -> Result<()> {
    let script = root().join("vmm/tests/linux/build-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run build-kernel.sh")?;
    if !out.status.success() {
        bail!("building the test kernel failed");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kernel = stdout
        .lines()
        .last()
        .context("build-kernel.sh printed no path")?;
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(root())
            .env("MOAT_LINUX_KERNEL", kernel)
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
