//! `cargo xtask <verb>`: the one entry point for developers and CI. One file per verb.

mod bench;
mod broker;
mod check;
mod fuzz;
mod images;
mod l1;
mod run;
mod run_vm;
mod setup;
mod test;
mod vmm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <verb>

Every verb first installs what it needs from the system and is missing (as root; otherwise it
stops and prints the command to run as root): xtask/src/setup.rs lists it all.

verbs:
  test              install what the tests need, build the guest images, run every test
  check             CI's checks beside fmt and clippy: cargo deny (licences, bans, sources),
                    cargo machete (unused dependencies), every fuzz target compiles, cargo doc,
                    the Kubernetes manifests against pinned schemas (`check manifests`: only that)
  bench [--quick] [--intercept-only|--scan-only] [egress|vmm|broker|k8s|snapshot]
                    egress proxy beside direct loopback and squid, interception beside
                    mitmproxy, the netstack beside loopback TCP, then moat-vmm
                    (start-up, memory, vsock throughput); tables + JSON in bench-results/;
                    --intercept-only: only the interception rows; --scan-only: only
                    the HTTP rules + response scan rows; broker: session setup
                    and throughput through broker and tunnel beside direct ssh, 1000
                    sessions on one tunnel;
                    k8s (only when named; root, containerd): moat pods started at once
                    through containerd, time to the agent's first output, idle memory;
                    snapshot (only when named; root; inside L1 where /dev/kvm is not
                    real KVM): cold boot against template restores and warm-pool
                    claims, template size, memory of pooled and running forks
  fuzz [SECONDS]    run every fuzz target for SECONDS each (default 60)
  images [kernel|kernel-gpu|kernel-smp|initramfs|rootfs|all]
                    build the VM images (cached in target/moat-images by a hash of their
                    recipes in images/; an interrupted build resumes)
  run [-- command]  build what a workspace needs here, then `moat run` (the best backend
                    this host supports, which it names): an interactive shell on the
                    Debian root image, or the command and its exit status
  run-vm [-- command]
                    build what is missing, then boot the workspace VM with the development
                    policy: an interactive shell, or the command and its exit status
  linux-boot        moat-vmm: boot our Linux kernel and initramfs to `Run /init`
  l1 [--timeout SECS] [--rw DIR]... -- CMD [ARGS...]
                    run CMD inside L1, a Linux in QEMU's emulator with a real /dev/kvm
                    (for hosts whose /dev/kvm is kvm_pvm): same directory and environment,
                    the host's root read-only (DIRs read-write), CMD's exit status back;
                    exit status 124 if L1 hangs past SECS (default 1800)
  l1 --vm-tests     build the VM tests and their images, run them inside L1";

/// Errors are one paragraph: what failed and why, never a backtrace (expected conditions,
/// such as a missing package, are errors too).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (verb, rest) = args
        .split_first()
        .map_or(("", &[][..]), |(v, r)| (v.as_str(), r));
    match verb {
        "test" => test::run(rest),
        "check" if rest.first().map(String::as_str) == Some("manifests") => check::manifests(),
        "check" => check::run(),
        "bench" => {
            setup::ensure(&[setup::Job::Bench, setup::Job::Kernel, setup::Job::Initramfs])?;
            let only = |what: &str| rest.iter().any(|a| a == what);
            let all = !only("egress")
                && !only("vmm")
                && !only("broker")
                && !only("k8s")
                && !only("snapshot");
            if all || only("egress") {
                bench::run(rest)?;
            }
            if all || only("vmm") {
                vmm::bench()?;
            }
            if all || only("broker") {
                broker::bench()?;
            }
            // Only when named: it needs root and containerd.
            if only("k8s") {
                bench::k8s()?;
            }
            // Only when named: minutes of VM boots, inside L1 on hosts without real KVM.
            if only("snapshot") {
                bench::snapshot()?;
            }
            Ok(())
        }
        "fuzz" => fuzz::run(rest),
        "images" => images::run(rest),
        "run" => run::run(rest),
        "run-vm" => run_vm::run(rest),
        "linux-boot" => vmm::linux_boot_test(),
        "l1" => l1::run(rest),
        "" | "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown verb {other:?}\n\n{USAGE}"),
    }
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs a command, echoing it, failing on a non-zero status.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
