//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target for a bounded time each.
//!
//! Targets (fuzz/fuzz_targets): the flow header, the TLS ClientHello/SNI reader, the HTTP
//! request-head reader, the policy profile parser, the virtual DNS (guest datagrams) and the
//! host's parser of guest-init's process events, moat-vmm's virtio descriptor chains, vsock
//! packets and block requests, the per-request rules of intercepted flows and their HTTP/1.1
//! request framing, the broker's ID token check and its SSH CA's public key reader. Seeds live in
//! fuzz/seeds/<target>.
//! The machine has only the stable toolchain; cargo-fuzz needs nightly flags, so this sets
//! RUSTC_BOOTSTRAP=1 for the fuzz build only.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run_cmd};

const TARGETS: &[&str] = &[
    "flow_header",
    "client_hello",
    "http_head",
    "policy_profile",
    "dns_query",
    "guest_event",
    "intercept_request",
    "request_framing",
    "vmm_descriptor_chain",
    "vmm_vsock_packet",
    "vmm_block_request",
    "vmm_pci_access",
    "broker_id_token",
    "broker_ssh_public_key",
];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let seconds: u64 = match args.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("{s:?} is not a number of seconds"))?,
        None => 60,
    };
    let have = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        bail!("cargo-fuzz is not installed: run `cargo install cargo-fuzz --locked`");
    }
    let fuzz_dir = root().join("fuzz");
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run_cmd(
            Command::new(env!("CARGO"))
                .current_dir(&fuzz_dir)
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", "--sanitizer", "none", target])
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048"),
        )?;
    }
    eprintln!("xtask: every fuzz target ran {seconds} s without a finding");
    Ok(())
}
