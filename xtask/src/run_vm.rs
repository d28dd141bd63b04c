//! `cargo xtask run-vm [-- command]`: build whatever is missing (moat, moat-vmm, the kernel,
//! the initramfs, the root image), then `moat run --backend vm` with the development policy:
//! an interactive shell in the workspace VM on this terminal, or `command` with its exit
//! status.

use anyhow::{Context, Result};

use crate::setup::{self, Job};
use crate::{describe, root};

const HELP: &str = "usage: cargo xtask run-vm [-- COMMAND [ARGS...]]

Builds what the workspace VM needs and is missing (moat, moat-vmm, the guest kernel, the
initramfs, the Debian root image: about 10 minutes the first time, cached after), then runs
`moat run --backend vm` with the development policy (policy/dev): an interactive shell in
the VM on this terminal, or COMMAND, whose exit status becomes this command's.

Needs /dev/kvm with hardware virtualization (kvm_intel or kvm_amd). Where /dev/kvm is nested
PVM, run it inside an L1 with real KVM: cargo xtask l1 -- cargo xtask run-vm -- COMMAND";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (options, command): (&[String], &[String]) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&[], args),
    };
    if options
        .iter()
        .chain(command.first())
        .any(|a| a == "--help" || a == "-h")
    {
        println!("{HELP}");
        return Ok(());
    }
    if let Some(unknown) = options.first() {
        anyhow::bail!("unknown option {unknown:?}\n\n{HELP}");
    }
    setup::ensure(&[
        Job::Kernel,
        Job::Initramfs,
        Job::RootImage,
        Job::VmWorkspace,
    ])?;
    crate::run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["build", "--locked", "-p", "moat", "-p", "moat-vmm"]),
    )?;
    crate::images::run(&["all".to_owned()])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), std::path::PathBuf::from);
    let mut moat = std::process::Command::new(target.join("debug/moat"));
    moat.args(["run", "--backend", "vm"])
        .env("MOAT_IMAGES", crate::images::cache_dir());
    if !command.is_empty() {
        moat.arg("--").args(command);
    }
    eprintln!("xtask: {}", describe(&moat));
    let status = moat.status().context("cannot start moat")?;
    // The workspace's exit status is ours.
    std::process::exit(status.code().unwrap_or(1));
}
