//! `cargo xtask run [-- command]`: the README's first command. Builds what a workspace needs
//! on this host and is missing, then `moat run`, which chooses the backend and says why: the
//! VM where /dev/kvm has hardware virtualization, the namespace backend otherwise. Both run
//! the workspace on the Debian root image (`cargo xtask images rootfs`).

use anyhow::{Context, Result};

use crate::setup::{self, Job};
use crate::{describe, root};

const HELP: &str = "usage: cargo xtask run [-- COMMAND [ARGS...]]

Builds what a workspace needs on this host and is missing (moat; the Debian root image the
workspace runs on, a few minutes the first time, cached after; where /dev/kvm has hardware
virtualization also moat-vmm, the guest kernel and the initramfs, about 10 minutes more),
then runs `moat run` with the development policy (policy/dev): an interactive shell in the
workspace on this terminal, or COMMAND, whose exit status becomes this command's. moat says
which backend it chose and why.";

/// Whether /dev/kvm here runs a guest's user space (kvm_intel or kvm_amd, not nested PVM).
fn hardware_kvm() -> bool {
    moat_host_probe::kvm_usable() && moat_host_probe::kvm_flavour().is_hardware()
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let vm = hardware_kvm();
    launch(args, HELP, vm, None)
}

/// Parses `[-- COMMAND...]`, builds what the workspace needs (`vm`: the VM's pieces too), then
/// runs `moat run` (with `--backend backend` when given) and exits with the workspace's status.
/// Shared by `run` and `run-vm`.
pub(crate) fn launch(args: &[String], help: &str, vm: bool, backend: Option<&str>) -> Result<()> {
    let (options, command): (&[String], &[String]) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&[], args),
    };
    if options
        .iter()
        .chain(command.first())
        .any(|a| a == "--help" || a == "-h")
    {
        println!("{help}");
        return Ok(());
    }
    if let Some(unknown) = options.first() {
        anyhow::bail!("unknown option {unknown:?}\n\n{help}");
    }
    if vm {
        setup::ensure(&[
            Job::Kernel,
            Job::Initramfs,
            Job::RootImage,
            Job::VmWorkspace,
        ])?;
    } else {
        setup::ensure(&[Job::RootImage])?;
    }
    let mut build = setup::cargo();
    build
        .current_dir(root())
        .args(["build", "--locked", "-p", "moat"]);
    if vm {
        build.args(["-p", "moat-vmm"]);
    }
    crate::run_cmd(&mut build)?;
    crate::images::run(&[if vm { "all" } else { "rootfs" }.to_owned()])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), std::path::PathBuf::from);
    let mut moat = std::process::Command::new(target.join("debug/moat"));
    moat.arg("run")
        .env("MOAT_IMAGES", crate::images::cache_dir());
    if let Some(backend) = backend {
        moat.args(["--backend", backend]);
    }
    if !command.is_empty() {
        moat.arg("--").args(command);
    }
    eprintln!("xtask: {}", describe(&moat));
    let status = moat.status().context("cannot start moat")?;
    // The workspace's exit status is ours.
    std::process::exit(status.code().unwrap_or(1));
}
