//! `cargo xtask bench broker`: the trusted access broker, measured by its own benchmark tests in
//! release builds: session setup and throughput through broker and tunnel beside the same sshd
//! reached directly (`moat/tests/broker_e2e.rs`), and 1000 concurrent sessions on one tunnel
//! with their memory (`broker/tests/tunnel.rs`). Tables on standard error, JSON in
//! bench-results/broker-session-latest.json and broker-tunnel-latest.json.

use anyhow::Result;

use crate::{root, run_cmd};

pub(crate) fn bench() -> Result<()> {
    crate::setup::ensure(&[crate::setup::Job::Tests])?;
    crate::setup::oidc_provider()?;
    let out = root().join("bench-results");
    std::fs::create_dir_all(&out)?;
    run_cmd(
        crate::setup::cargo()
            .current_dir(root())
            .args([
                "test",
                "--release",
                "--locked",
                "-p",
                "moat",
                "--test",
                "broker_e2e",
            ])
            .args(["bench", "--", "--ignored", "--nocapture"])
            .env("MOAT_BENCH_DIR", &out),
    )?;
    run_cmd(
        crate::setup::cargo()
            .current_dir(root())
            .args([
                "test",
                "--release",
                "--locked",
                "-p",
                "moat-broker",
                "--test",
                "tunnel",
            ])
            .args(["--", "--nocapture"])
            .env("MOAT_BENCH_DIR", &out),
    )?;
    eprintln!(
        "xtask bench: wrote bench-results/broker-session-latest.json and broker-tunnel-latest.json"
    );
    Ok(())
}
