//! `cargo xtask bench [--quick] [--intercept-only]`: the egress proxy measured beside a direct
//! loopback connection and squid (CONNECT, with the equivalent allowlist), in one run,
//! interleaved, medians of 5.
//!
//! Setup (all on loopback, in a temporary directory, env.rs): nginx serves HTTPS with an ECDSA
//! P-256 certificate from an rcgen test CA (the method of docs/benchmarks.md). One client (this
//! program, built in release, workloads.rs) drives every path the same way: rustls over
//!   direct: TCP to nginx;
//!   moat:   the proxy's Unix socket `<uds>_1025` + a flow header (exactly what the guest's
//!           netstack does), the proxy then checks SNI, resolves and splices;
//!   squid:  TCP to squid, `CONNECT bench.test:<port>`, then TLS through the tunnel.
//! Workloads: bulk download (MB/s), small requests on one kept-alive connection (req/s), and
//! a new TLS connection per request, one at a time (conn/s). Beside every ratio: the proxy's
//! own CPU per GB, per request and per new connection (from `/proc/<pid>/stat`).
//!
//! The rows: egress.rs (direct, moat, squid), intercept.rs (moat intercepting and injecting
//! a credential beside mitmproxy, and the cost of its response scan), netstack.rs (the workspace's network path beside loopback).
//!
//! Needs `nginx` and `squid` (Debian: nginx-light, squid-openssl). Results: a table on stdout
//! and JSON in bench-results/egress-latest.json.

mod egress;
mod env;
mod intercept;
mod k8s;
mod netstack;
mod snapshot;
mod workloads;

use std::path::Path;

use anyhow::Result;

use crate::{root, run_cmd};

pub(crate) use k8s::run as k8s;
pub(crate) use snapshot::run as snapshot;

const HOST: &str = "bench.test";
const REPS: usize = 5;

struct Sizes {
    bulk_bytes: u64,
    /// Size of each of the 100 concurrent netstack downloads.
    chunk_bytes: u64,
    keepalive_requests: usize,
    new_conns: usize,
    /// Only the interception rows (`--intercept-only`): moat intercept, mitmproxy, direct.
    intercept_only: bool,
    /// Only the HTTP rules + response scan rows (`--scan-only`; implies `intercept_only`).
    scan_only: bool,
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    // The client must be optimised like the proxies it measures: re-run in release.
    if cfg!(debug_assertions) {
        return run_cmd(
            crate::setup::cargo()
                .current_dir(root())
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    // Only this part: the caller runs the VMM part itself.
                    "egress",
                ])
                .args(
                    args.iter()
                        .filter(|a| *a != "egress" && *a != "vmm" && *a != "broker"),
                ),
        );
    }
    let quick = args.iter().any(|a| a == "--quick");
    let scan_only = args.iter().any(|a| a == "--scan-only");
    let intercept_only = scan_only || args.iter().any(|a| a == "--intercept-only");
    let sizes = if quick {
        Sizes {
            bulk_bytes: 256 << 20,
            chunk_bytes: 4 << 20,
            keepalive_requests: 2000,
            new_conns: 100,
            intercept_only,
            scan_only,
        }
    } else {
        Sizes {
            bulk_bytes: 1 << 30,
            chunk_bytes: 20 << 20,
            keepalive_requests: 5000,
            new_conns: 300,
            intercept_only,
            scan_only,
        }
    };
    crate::setup::ensure(&[crate::setup::Job::Bench])?;
    run_cmd(crate::setup::cargo().current_dir(root()).args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "moat",
    ]))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(&sizes))
}

async fn bench(sizes: &Sizes) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("moat-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = bench_in(&dir, sizes).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench_in(dir: &Path, sizes: &Sizes) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;

    let ca = env::pki(dir)?;
    let nginx = env::nginx(dir, sizes).await?;
    let squid = env::squid(dir, nginx.tls.port()).await?;
    let moat = env::moat_passthrough(dir, nginx.tls.port()).await?;
    let env = env::Env {
        nginx: nginx.tls,
        squid: squid.addr,
        moat_sock: moat.addr,
        tls: env::client_tls(ca)?,
        moat_pid: moat.proxy.0.id(),
        squid_pid: squid.proxy.0.id(),
        intercept: None,
    };
    let rows = egress::rows(&env, sizes).await?;
    drop((moat.proxy, squid.proxy));
    let mut env = env;
    let (intercept_rows, scan_rows) = intercept::rows(&mut env, dir, sizes).await?;
    let ns_rows = if sizes.intercept_only {
        Vec::new()
    } else {
        netstack::rows(dir, nginx.plain_port, sizes)?
    };
    drop(nginx);

    let mut table = String::new();
    let mut json_rows = Vec::new();
    egress::report(&rows, sizes, &mut table, &mut json_rows);
    intercept::report(&intercept_rows, &mut table, &mut json_rows);
    intercept::report_scan(&scan_rows, &mut table, &mut json_rows);
    netstack::report(&ns_rows, &mut table, &mut json_rows);
    println!("{table}");
    let out_dir = root().join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let json = serde_json::json!({
        "bench": "egress",
        "reps": REPS,
        "bulk_bytes": sizes.bulk_bytes,
        "keepalive_requests": sizes.keepalive_requests,
        "new_conns": sizes.new_conns,
        "rows": json_rows,
    });
    // A partial run never overwrites the full run's results.
    let stem = if sizes.scan_only {
        "egress-scan-latest"
    } else if sizes.intercept_only {
        "egress-intercept-latest"
    } else {
        "egress-latest"
    };
    std::fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join(format!("{stem}.md")), &table)?;
    eprintln!("xtask bench: wrote bench-results/{stem}.json");
    Ok(())
}
