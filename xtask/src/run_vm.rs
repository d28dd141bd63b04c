//! `cargo xtask run-vm [-- command]`: build whatever is missing (moat, moat-vmm, the kernel,
//! the initramfs, the root image), then `moat run --backend vm` with the development policy:
//! an interactive shell in the workspace VM on this terminal, or `command` with its exit
//! status.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{describe, root};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let command: Vec<&String> = match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].iter().collect(),
        None => args.iter().collect(),
    };
    crate::run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(root())
            .args(["build", "--locked", "-p", "moat", "-p", "moat-vmm"]),
    )?;
    crate::images::run(&["all".to_owned()])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), std::path::PathBuf::from);
    let mut moat = Command::new(target.join("debug/moat"));
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
