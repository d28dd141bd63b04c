//! The interception rows: moat intercepting TLS and injecting a credential (an `intercept` rule
//! and a secret bound to the upstream, sent as `Authorization: Bearer`) beside mitmdump with
//! an addon setting the same header, both verifying the upstream against the bench CA; direct
//! as the reference. mitmproxy is far slower per request, so these runs are smaller.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::env::{
    self, Env, Guard, InterceptEnv, Path3, moat_proxy, sign_profile, tls_trusting, wait_for,
};
use super::workloads::{Sample, bulk, keepalive, median, new_conns};
use super::{HOST, REPS, Sizes};

/// One interception row: medians of rate and proxy CPU per unit.
pub(super) struct InterceptRow {
    name: &'static str,
    unit: &'static str,
    cpu_unit: &'static str,
    direct: f64,
    moat: f64,
    mitm: f64,
    moat_cpu: f64,
    mitm_cpu: f64,
}

/// Starts the intercepting moat proxy and mitmdump, measures every workload on direct, moat
/// intercept and mitmproxy in turn, [`REPS`] rounds, and stops both proxies.
pub(super) async fn rows(env: &mut Env, dir: &Path, sizes: &Sizes) -> Result<Vec<InterceptRow>> {
    let mitmdump = crate::setup::mitmdump()?;
    let port = env.nginx.port();
    let profile = dir.join("intercept.toml");
    std::fs::write(
        &profile,
        format!(
            "version = 1\nname = \"bench-intercept\"\n\n[[rules]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
             ports = [{port}]\naction = \"intercept\"\ncidrs = [\"127.0.0.0/8\"]\n\n\
             [[secrets]]\nname = \"bench\"\nsource = {{ env = \"MOAT_BENCH_SECRET\" }}\n\
             placeholder = \"sk-moat-placeholder-bench\"\nhosts = [\"{HOST}\"]\nports = [{port}]\n\
             presentation = \"authorization_bearer\"\n"
        ),
    )?;
    sign_profile(dir, &profile)?;
    let uds = dir.join("intercept.sock");
    let moat_proxy = Guard(
        moat_proxy(dir, "intercept", &profile)
            .arg("--upstream-ca")
            .arg(dir.join("ca.pem"))
            .arg("--ca-out")
            .arg(dir.join("moat-ca.pem"))
            .env("MOAT_BENCH_SECRET", "bench-secret-value")
            .spawn()?,
    );
    let moat_sock = moat_egress::port_path(&uds, moat_egress::EGRESS_VSOCK_PORT);
    wait_for("moat intercepting proxy", || {
        moat_sock.exists() && dir.join("moat-ca.pem").exists()
    })
    .await?;

    let (mitm, mitm_ca) = env::mitmdump(dir, &mitmdump).await?;

    env.intercept = Some(InterceptEnv {
        moat_sock,
        moat_tls: tls_trusting(&dir.join("moat-ca.pem"))?,
        moat_pid: moat_proxy.0.id(),
        mitm: mitm.addr,
        mitm_tls: tls_trusting(&mitm_ca)?,
        mitm_pid: mitm.proxy.0.id(),
    });
    let paths = [Path3::Direct, Path3::MoatIntercept, Path3::Mitm];
    for p in paths {
        new_conns(env, p, 3)
            .await
            .with_context(|| format!("{} path does not work", p.name()))?;
    }
    // mitmproxy is two orders of magnitude slower per request: smaller runs keep it in minutes.
    let requests = (sizes.keepalive_requests / 5).max(200);
    let conns = (sizes.new_conns / 2).max(50);
    let mut samples: Vec<Vec<Vec<Sample>>> = (0..3)
        .map(|_| paths.iter().map(|_| Vec::new()).collect())
        .collect();
    for rep in 0..REPS {
        eprintln!("xtask bench: interception round {}/{REPS}", rep + 1);
        for (i, p) in paths.iter().enumerate() {
            let what = |w: &str| format!("{} path, {w}", p.name());
            samples[0][i].push(bulk(env, *p).await.with_context(|| what("bulk"))?);
            match keepalive(env, *p, requests).await {
                Ok(sample) => samples[1][i].push(sample),
                // mitmproxy 11 resets our kept-alive connections after the first response
                // (a Python client keeps them; see docs/benchmarks.md): the row says so.
                Err(e) if *p == Path3::Mitm => {
                    eprintln!("xtask bench: mitmproxy kept-alive run failed: {e:#}");
                }
                Err(e) => return Err(e.context(what("kept-alive requests"))),
            }
            samples[2][i].push(
                new_conns(env, *p, conns)
                    .await
                    .with_context(|| what("new connections"))?,
            );
        }
    }
    drop((moat_proxy, mitm.proxy));
    env.intercept = None;
    let names = [
        ("bulk HTTPS download", "MB/s", "s/GB", 1000.0),
        ("small requests, 1 kept-alive conn", "req/s", "µs/req", 1e6),
        ("new TLS connection per request", "conn/s", "µs/conn", 1e6),
    ];
    Ok(names
        .iter()
        .zip(samples)
        .map(|((name, unit, cpu_unit, scale), s)| {
            // NaN marks a path that could not be measured (printed as NaN in the table).
            let rate = |i: usize| {
                if s[i].is_empty() {
                    return f64::NAN;
                }
                median(s[i].iter().map(|x| x.units / x.secs).collect())
            };
            let cpu = |i: usize| {
                if s[i].is_empty() {
                    return f64::NAN;
                }
                median(s[i].iter().map(|x| x.cpu / x.units * scale).collect())
            };
            InterceptRow {
                name,
                unit,
                cpu_unit,
                direct: rate(0),
                moat: rate(1),
                mitm: rate(2),
                moat_cpu: cpu(1),
                mitm_cpu: cpu(2),
            }
        })
        .collect())
}

/// Appends the interception table and its JSON rows.
pub(super) fn report(
    rows: &[InterceptRow],
    table: &mut String,
    json_rows: &mut Vec<serde_json::Value>,
) {
    let _ = writeln!(
        table,
        "\n| interception + injection | direct | moat intercept | mitmproxy | moat CPU | mitmproxy CPU | CPU per unit, mitmproxy / moat |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        let _ = writeln!(
            table,
            "| {} ({}) | {:.0} (1.00) | {:.0} ({:.2}) | {:.0} ({:.3}) | {:.3} {} | {:.3} {} | {:.1}x |",
            r.name,
            r.unit,
            r.direct,
            r.moat,
            r.moat / r.direct,
            r.mitm,
            r.mitm / r.direct,
            r.moat_cpu,
            r.cpu_unit,
            r.mitm_cpu,
            r.cpu_unit,
            r.mitm_cpu / r.moat_cpu
        );
        json_rows.push(serde_json::json!({
            "test": format!("intercept: {}", r.name), "unit": r.unit,
            "direct": r.direct, "moat": r.moat, "mitmproxy": r.mitm,
            "moat_cpu": r.moat_cpu, "mitmproxy_cpu": r.mitm_cpu, "cpu_unit": r.cpu_unit,
        }));
    }
}
