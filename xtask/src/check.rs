//! `cargo xtask check`: the checks CI runs beside `cargo fmt --check` and clippy, each a
//! habit security reviewers look for:
//!
//! - `cargo deny check licenses bans sources` (deny.toml): every dependency's licence is one
//!   we accept, no crate is duplicated or banned, every crate comes from crates.io. These
//!   checks need no advisory database, so they work offline once the crates are fetched.
//! - `cargo machete --with-metadata`: no crate declares a dependency it does not use (with
//!   cargo's metadata, so that renamed crates and dev-dependencies are judged too).
//! - every fuzz target builds (`cargo fuzz build`; the targets are listed once, in
//!   fuzz/Cargo.toml).
//! - `cargo doc --no-deps` with warnings denied: broken intra-doc links fail.
//!
//! The cargo subcommands are installed from crates.io at pinned versions on first use.

use anyhow::Result;

use crate::setup::{self, Job};
use crate::{root, run_cmd};

pub(crate) fn run() -> Result<()> {
    setup::ensure(&[Job::Check])?;
    eprintln!("xtask check: [1/4] licences, bans and sources (cargo deny)");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["deny", "check", "licenses", "bans", "sources"]),
    )?;
    eprintln!("xtask check: [2/4] unused dependencies (cargo machete)");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["machete", "--with-metadata"]),
    )?;
    eprintln!("xtask check: [3/4] every fuzz target builds");
    crate::fuzz::build()?;
    eprintln!("xtask check: [4/4] documentation builds without warnings");
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    eprintln!("xtask check: all passed");
    Ok(())
}
