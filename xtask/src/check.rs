//! `cargo xtask check`: the checks CI runs beside `cargo fmt --check` and clippy, each a
//! habit security reviewers look for:
//!
//! - `cargo deny check licenses bans sources` (deny.toml): every dependency's licence is one
//!   we accept, no crate is duplicated or banned, every crate comes from crates.io. These
//!   checks need no advisory database, so they work offline once the crates are fetched.
//! - `cargo machete --with-metadata`: no crate declares a dependency it does not use (with
//!   cargo's metadata, so that renamed crates and dev-dependencies are judged too).
//! - every fuzz target compiles (`cargo fuzz check`; the targets are listed once, in
//!   fuzz/Cargo.toml).
//! - `cargo doc --no-deps` with warnings denied: broken intra-doc links fail.
//! - the Kubernetes manifests (deploy/kubernetes/*.yaml) validate against pinned schemas:
//!   Kubernetes' own (kubernetes-validate, strict) and agent-sandbox's CRDs
//!   (deploy/kubernetes/check/), so a typo in a field fails here rather than at `kubectl apply`.
//!
//! The cargo subcommands are installed from crates.io at pinned versions on first use.

use anyhow::Result;

use crate::setup::{self, Job};
use crate::{root, run_cmd};

pub(crate) fn run() -> Result<()> {
    setup::ensure(&[Job::Check])?;
    eprintln!("xtask check: [1/5] licences, bans and sources (cargo deny)");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["deny", "check", "licenses", "bans", "sources"]),
    )?;
    eprintln!("xtask check: [2/5] unused dependencies (cargo machete)");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["machete", "--with-metadata"]),
    )?;
    eprintln!("xtask check: [3/5] every fuzz target compiles");
    crate::fuzz::check()?;
    eprintln!("xtask check: [4/5] documentation builds without warnings");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    eprintln!("xtask check: [5/5] Kubernetes manifests against their pinned schemas");
    manifests()?;
    eprintln!("xtask check: all passed");
    Ok(())
}

/// Validates every manifest in deploy/kubernetes (deploy/kubernetes/check/validate.py).
pub(crate) fn manifests() -> Result<()> {
    let python = setup::manifests_venv()?;
    let dir = root().join("deploy/kubernetes");
    let mut manifests: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    anyhow::ensure!(!manifests.is_empty(), "no manifests in {}", dir.display());
    run_cmd(
        std::process::Command::new(python)
            .arg(dir.join("check/validate.py"))
            .args(&manifests),
    )
}
