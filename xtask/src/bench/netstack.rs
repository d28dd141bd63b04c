//! The netstack rows: bulk throughput through the workspace's own network path (a namespace
//! workspace: TUN, netstack, flow header, egress proxy) beside plain loopback TCP, both driven
//! by curl over plain HTTP.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::env::{moat_bin, sign_profile};
use super::workloads::median;
use super::{HOST, Sizes};

/// Bulk throughput through the workspace's own network path (TUN, netstack, flow header,
/// egress proxy) beside plain loopback TCP, measured by curl over plain HTTP in both cases:
/// one flow, and 100 concurrent flows. Returns (test, direct Gbit/s, moat Gbit/s).
pub(super) fn rows(dir: &Path, port: u16, sizes: &Sizes) -> Result<Vec<(&'static str, f64, f64)>> {
    let moat = moat_bin();
    let profile = dir.join("ns.toml");
    std::fs::write(
        &profile,
        format!(
            "version = 1\nname = \"bench-ns\"\n\n[[rules]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
             ports = [{port}]\naction = \"passthrough\"\nprotocols = [\"http\"]\ncidrs = [\"127.0.0.0/8\"]\n"
        ),
    )?;
    sign_profile(dir, &profile)?;
    // Prints the elapsed nanoseconds of the downloads.
    let one = |host: &str| {
        format!(
            "s=$(date +%s%N); curl -sf -o /dev/null http://{host}:{port}/bulk || exit 9; e=$(date +%s%N); echo $((e-s))"
        )
    };
    let many = |host: &str| {
        format!(
            "s=$(date +%s%N); seq 100 | xargs -P 100 -I{{}} curl -sf -o /dev/null http://{host}:{port}/chunk || exit 9; e=$(date +%s%N); echo $((e-s))"
        )
    };
    let run = |script: String, inside: bool| -> Result<f64> {
        let mut cmd = if inside {
            let mut c = Command::new(&moat);
            c.args(["run", "--backend", "namespace", "--profile"])
                .arg(&profile)
                .arg("--pubkey")
                .arg(dir.join("bench.pub"))
                .arg("--audit")
                .arg(dir.join("ns-audit.jsonl"))
                .args([
                    "--resolve",
                    &format!("{HOST}=127.0.0.1"),
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .env("MOAT_LOG", "error");
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let out = cmd.stderr(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("netstack bench run failed ({}): {script}", out.status);
        }
        let nanos: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("elapsed")?;
        Ok(nanos / 1e9)
    };
    let gbit = |bytes: u64, secs: f64| bytes as f64 * 8.0 / secs / 1e9;
    let (mut d1, mut m1, mut d100, mut m100) = (vec![], vec![], vec![], vec![]);
    for rep in 0..3 {
        eprintln!("xtask bench: netstack round {}/3", rep + 1);
        d1.push(gbit(sizes.bulk_bytes, run(one("127.0.0.1"), false)?));
        m1.push(gbit(sizes.bulk_bytes, run(one(HOST), true)?));
        d100.push(gbit(
            100 * sizes.chunk_bytes,
            run(many("127.0.0.1"), false)?,
        ));
        m100.push(gbit(100 * sizes.chunk_bytes, run(many(HOST), true)?));
    }
    Ok(vec![
        ("netstack: 1 flow, bulk HTTP", median(d1), median(m1)),
        (
            "netstack: 100 concurrent flows, bulk HTTP",
            median(d100),
            median(m100),
        ),
    ])
}

/// Appends the netstack table and its JSON rows.
pub(super) fn report(
    rows: &[(&'static str, f64, f64)],
    table: &mut String,
    json_rows: &mut Vec<serde_json::Value>,
) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        table,
        "\n| netstack test | plain loopback TCP | moat namespace (TUN, netstack, proxy) |\n| --- | --- | --- |"
    );
    for (name, d, m) in rows {
        let _ = writeln!(
            table,
            "| {name} (Gbit/s) | {d:.2} (1.00) | {m:.2} ({:.2}) |",
            m / d
        );
        json_rows.push(serde_json::json!({
            "test": name, "unit": "Gbit/s", "direct": d, "moat": m, "moat_ratio": m / d,
        }));
    }
}
