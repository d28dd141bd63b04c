//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target for a bounded time each;
//! `cargo xtask check` type-checks them all (`check`).
//!
//! The targets are the `[[bin]]`s of fuzz/Cargo.toml, the one list of them: the flow header,
//! the TLS ClientHello/SNI reader, the HTTP request-head reader, the policy profile parser, the
//! virtual DNS (guest datagrams) and the host's parser of guest-init's process events,
//! moat-vmm's virtio descriptor chains, vsock packets, block requests and PCI accesses, the
//! per-request rules of intercepted flows and their HTTP/1.1 request framing, the check of every
//! request head of plain-HTTP flows, the broker's ID token check and its SSH CA's public key
//! reader, and the vsock `CONNECT <port>` handshake. Seeds live in `fuzz/seeds/<target>`.
//! The pinned toolchain is stable; cargo-fuzz needs nightly flags, so this sets
//! RUSTC_BOOTSTRAP=1 for the fuzz builds only.

use std::process::Command;

use anyhow::{Context, Result};

use crate::setup;
use crate::{root, run_cmd};

/// The fuzz targets: the `[[bin]]` names of fuzz/Cargo.toml.
pub(crate) fn targets() -> Result<Vec<String>> {
    let path = root().join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    let bins = manifest
        .get("bin")
        .and_then(toml::Value::as_array)
        .with_context(|| format!("{} has no [[bin]] targets", path.display()))?;
    bins.iter()
        .map(|b| {
            b.get("name")
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("a [[bin]] of {} has no name", path.display()))
        })
        .collect()
}

fn cargo_fuzz() -> Result<Command> {
    let (krate, version, why) = setup::CARGO_TOOLS
        .iter()
        .find(|(k, _, _)| *k == "cargo-fuzz")
        .context("cargo-fuzz is not in setup::CARGO_TOOLS")?;
    setup::cargo_tool(krate, version, why)?;
    let mut cmd = setup::cargo();
    cmd.current_dir(root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    Ok(cmd)
}

/// Type-checks every fuzz target (no sanitizer: the check is that they compile). `check`,
/// not `build`: fourteen instrumented release binaries are gigabytes of disk for a check
/// that links nothing of ours; `cargo xtask fuzz` builds them when they run.
pub(crate) fn check() -> Result<()> {
    run_cmd(cargo_fuzz()?.args(["check", "--sanitizer", "none"]))
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let seconds: u64 = match args.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("{s:?} is not a number of seconds"))?,
        None => 60,
    };
    let fuzz_dir = root().join("fuzz");
    for target in targets()? {
        let corpus = fuzz_dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run_cmd(
            cargo_fuzz()?
                .args(["run", "--sanitizer", "none", &target])
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(&target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048"),
        )?;
    }
    eprintln!("xtask: every fuzz target ran {seconds} s without a finding");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_has_a_source_and_seeds() {
        let targets = targets().unwrap();
        assert!(targets.len() >= 14, "{targets:?}");
        for t in &targets {
            let src = root().join("fuzz/fuzz_targets").join(format!("{t}.rs"));
            assert!(src.is_file(), "{t}: no {}", src.display());
        }
    }
}
