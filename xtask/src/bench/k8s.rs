//! `cargo xtask bench k8s`: moat pods through a real containerd (the shim's own test harness,
//! `bench_k8s_pods_start_and_idle` in shim/tests/containerd.rs, run `--ignored`): pods started
//! per second with N started at once, the time from `ctr run` to the agent's first output, and
//! the PSS of an idle pod's processes, on the namespace backend. Needs root and containerd.
//! JSON in bench-results/k8s-latest.json; MOAT_BENCH_K8S_PODS sets N (default 8).

use anyhow::{Context, Result};

use crate::{root, run_cmd, setup};

pub(crate) fn run() -> Result<()> {
    // The shim starts `moat` from beside itself: both built, as `cargo xtask test` does.
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["build", "--locked", "-p", "moat", "--bin", "moat"]),
    )?;
    let oci = crate::images::oci()?;
    let out_dir = root().join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("k8s-latest.json");
    let _ = std::fs::remove_file(&out);
    run_cmd(
        setup::cargo()
            .current_dir(root())
            .args([
                "test",
                "--locked",
                "-p",
                "moat-shim",
                "--test",
                "containerd",
            ])
            .args([
                "bench_k8s_pods_start_and_idle",
                "--",
                "--ignored",
                "--nocapture",
            ])
            .env("MOAT_OCI_IMAGE", oci)
            .env("MOAT_BENCH_K8S_OUT", &out),
    )?;
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&out).with_context(|| format!("the bench wrote no {}", out.display()))?,
    )?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    eprintln!("xtask bench: wrote bench-results/k8s-latest.json");
    Ok(())
}
