//! The interception rows: moat intercepting TLS and injecting a credential (an `intercept` rule
//! and a secret bound to the upstream, sent as `Authorization: Bearer`) beside mitmdump with
//! an addon setting the same header, both verifying the upstream against the bench CA; direct
//! as the reference. mitmproxy is far slower per request, so these runs are smaller.
//!
//! The response scan (egress intercept/reflect.rs) is measured beside them: the moat rows
//! above run with `--no-response-scan` (interception as it was before the scan), and a second
//! moat proxy, the same but scanning every response for the injected secret (the default),
//! downloads `/text` (JSON-like text: the sparse `/bulk` is only zeros, which a search skips)
//! and runs the kept-alive requests, each path in turn in the same rounds.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::env::{
    self, Env, Guard, InterceptEnv, Path3, moat_proxy, sign_profile, tls_trusting, wait_for,
};
use super::workloads::{Sample, bulk, bulk_of, keepalive, median, new_conns};
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

/// The response scan's cost: the same workload without and with it.
pub(super) struct ScanRow {
    name: &'static str,
    unit: &'static str,
    cpu_unit: &'static str,
    /// The most CPU per unit the two may add (the goal), as a fraction.
    goal: f64,
    plain: f64,
    scan: f64,
    plain_cpu: f64,
    scan_cpu: f64,
    /// CPU added per unit in each pair of runs measured back to back, sorted.
    added: Vec<f64>,
}

/// Pairs of runs (without, with) per workload and round for the HTTP rules + scan rows: the
/// CPU they add is the median over many short pairs run back to back, each pair in the
/// opposite order to the one before, so drift in the machine's load (other builds, the host
/// taking the CPU) cancels out where whole-run medians taken apart did not (2026-12-06: the
/// same code measured +4% and +41% per GB in two runs).
const SCAN_PAIRS: usize = 6;

/// Starts the intercepting moat proxy and mitmdump, measures every workload on direct, moat
/// intercept and mitmproxy in turn, [`REPS`] rounds, and stops both proxies.
pub(super) async fn rows(
    env: &mut Env,
    dir: &Path,
    sizes: &Sizes,
) -> Result<(Vec<InterceptRow>, Vec<ScanRow>)> {
    let mitmdump = if sizes.scan_only {
        std::path::PathBuf::new()
    } else {
        crate::setup::mitmdump()?
    };
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
    // The same rule with HTTP rules, as a profile that narrows an API would have them: the
    // bench's GETs are decided by the last of four.
    let ruled = dir.join("intercept-rules.toml");
    let text = std::fs::read_to_string(&profile)?;
    std::fs::write(
        &ruled,
        text.replacen(
            "\n[[secrets]]",
            "\n[rules.http]\ndefault = \"deny\"\n\n\
             [[rules.http.requests]]\nname = \"no-admin\"\npaths = [\"/admin/**\"]\naction = \"deny\"\n\n\
             [[rules.http.requests]]\nname = \"issues\"\nmethods = [\"GET\", \"POST\"]\n\
             paths = [\"/repos/*/*/issues\"]\naction = \"allow\"\n\n\
             [[rules.http.requests]]\nname = \"models\"\nmethods = [\"GET\"]\npaths = [\"/v1/models/**\"]\n\
             query = [\"page\"]\naction = \"allow\"\n\n\
             [[rules.http.requests]]\nname = \"bench\"\nmethods = [\"GET\"]\npaths = [\"/**\"]\n\
             action = \"allow\"\n\n[[secrets]]",
            1,
        ),
    )?;
    sign_profile(dir, &ruled)?;
    // One proxy as interception was before HTTP rules and the response scan, one with both
    // (the scan is on by default).
    let start = |name: &str, scan: bool| -> Result<Guard> {
        let mut cmd = moat_proxy(dir, name, if scan { &ruled } else { &profile });
        cmd.arg("--upstream-ca")
            .arg(dir.join("ca.pem"))
            .arg("--ca-out")
            .arg(dir.join(format!("{name}-ca.pem")))
            // As long as a real key, so the scan searches for forms of a real length.
            .env("MOAT_BENCH_SECRET", "bench-secret-value-0123456789abcdef");
        if !scan {
            cmd.arg("--no-response-scan");
        }
        Ok(Guard(cmd.spawn()?))
    };
    let moat_proxy = start("intercept", false)?;
    let scan_proxy = start("scan", true)?;
    let sock = |name: &str| {
        moat_egress::port_path(
            &dir.join(format!("{name}.sock")),
            moat_egress::EGRESS_VSOCK_PORT,
        )
    };
    let (moat_sock, scan_sock) = (sock("intercept"), sock("scan"));
    wait_for("moat intercepting proxies", || {
        moat_sock.exists()
            && scan_sock.exists()
            && dir.join("intercept-ca.pem").exists()
            && dir.join("scan-ca.pem").exists()
    })
    .await?;

    let mitm = if sizes.scan_only {
        None
    } else {
        Some(env::mitmdump(dir, &mitmdump).await?)
    };

    env.intercept = Some(InterceptEnv {
        moat_sock,
        moat_tls: tls_trusting(&dir.join("intercept-ca.pem"))?,
        moat_pid: moat_proxy.0.id(),
        scan_sock,
        scan_tls: tls_trusting(&dir.join("scan-ca.pem"))?,
        scan_pid: scan_proxy.0.id(),
        mitm: match &mitm {
            Some((m, ca)) => Some((m.addr, tls_trusting(ca)?, m.proxy.0.id())),
            None => None,
        },
    });
    let paths: &[Path3] = if sizes.scan_only {
        &[]
    } else {
        &[Path3::Direct, Path3::MoatIntercept, Path3::Mitm]
    };
    for p in paths
        .iter()
        .copied()
        .chain([Path3::MoatIntercept, Path3::MoatScan])
    {
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
    // Short runs, many pairs: the proxies' CPU is read to the nanosecond.
    let scan_requests = (sizes.keepalive_requests / 5).max(200);
    // [workload][pair] = (without, with both)
    let mut scan_samples: Vec<Vec<(Sample, Sample)>> = vec![Vec::new(), Vec::new()];
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
        for pair in 0..SCAN_PAIRS {
            let order = if (rep * SCAN_PAIRS + pair).is_multiple_of(2) {
                [Path3::MoatIntercept, Path3::MoatScan]
            } else {
                [Path3::MoatScan, Path3::MoatIntercept]
            };
            for (w, workload) in scan_samples.iter_mut().enumerate() {
                let mut got = Vec::new();
                for p in order {
                    let what = |w: &str| format!("{} path, {w}", p.name());
                    let sample = if w == 0 {
                        bulk_of(env, p, "/text")
                            .await
                            .with_context(|| what("text download"))?
                    } else {
                        keepalive(env, p, scan_requests)
                            .await
                            .with_context(|| what("kept-alive requests"))?
                    };
                    got.push((p, sample));
                }
                let (mut without, mut with) = (None, None);
                for (p, sample) in got {
                    if p == Path3::MoatScan {
                        with = Some(sample);
                    } else {
                        without = Some(sample);
                    }
                }
                if let (Some(without), Some(with)) = (without, with) {
                    workload.push((without, with));
                }
            }
        }
    }
    drop((moat_proxy, scan_proxy, mitm.map(|(m, _)| m.proxy)));
    env.intercept = None;
    let names = [
        ("bulk HTTPS download", "MB/s", "s/GB", 1000.0),
        ("small requests, 1 kept-alive conn", "req/s", "µs/req", 1e6),
        ("new TLS connection per request", "conn/s", "µs/conn", 1e6),
    ];
    let rate = |s: &[Sample]| median(s.iter().map(|x| x.units / x.secs).collect());
    let cpu =
        |s: &[Sample], scale: f64| median(s.iter().map(|x| x.cpu / x.units * scale).collect());
    // The goals: at most 25% more CPU per GB, 15% per kept-alive request.
    let scan_names = [
        ("JSON-like text download", "MB/s", "s/GB", 1000.0, 0.25),
        (
            "small requests, 1 kept-alive conn",
            "req/s",
            "µs/req",
            1e6,
            0.15,
        ),
    ];
    let scan_rows = scan_names
        .iter()
        .zip(scan_samples)
        .map(|((name, unit, cpu_unit, scale, goal), pairs)| {
            let (without, with): (Vec<Sample>, Vec<Sample>) = pairs.into_iter().unzip();
            let mut added: Vec<f64> = without
                .iter()
                .zip(&with)
                .map(|(a, b)| (b.cpu / b.units) / (a.cpu / a.units) - 1.0)
                .collect();
            added.sort_by(f64::total_cmp);
            ScanRow {
                name,
                unit,
                cpu_unit,
                goal: *goal,
                plain: rate(&without),
                scan: rate(&with),
                plain_cpu: cpu(&without, *scale),
                scan_cpu: cpu(&with, *scale),
                added,
            }
        })
        .collect();
    let rows = names
        .iter()
        .zip(samples)
        .filter(|_| !sizes.scan_only)
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
        .collect();
    Ok((rows, scan_rows))
}

/// Appends the interception table and its JSON rows.
pub(super) fn report(
    rows: &[InterceptRow],
    table: &mut String,
    json_rows: &mut Vec<serde_json::Value>,
) {
    if rows.is_empty() {
        return;
    }
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

/// Appends the response scan's table and its JSON rows: each workload without and with the
/// scan, and the CPU the scan adds per unit.
pub(super) fn report_scan(
    rows: &[ScanRow],
    table: &mut String,
    json_rows: &mut Vec<serde_json::Value>,
) {
    let _ = writeln!(
        table,
        "\n| HTTP rules + response scan (moat intercept + injection) | without | with both | without, CPU | with, CPU | CPU added: median of pairs (lowest, highest) | goal |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        let pct = |i: usize| r.added.get(i).map_or(f64::NAN, |a| a * 100.0);
        let median_added = median(r.added.clone());
        let _ = writeln!(
            table,
            "| {} ({}) | {:.0} (1.00) | {:.0} ({:.2}) | {:.3} {} | {:.3} {} | {:+.1}% ({:+.1}%, {:+.1}%; {} pairs) | {} {:.0}% |",
            r.name,
            r.unit,
            r.plain,
            r.scan,
            r.scan / r.plain,
            r.plain_cpu,
            r.cpu_unit,
            r.scan_cpu,
            r.cpu_unit,
            median_added * 100.0,
            pct(0),
            pct(r.added.len().saturating_sub(1)),
            r.added.len(),
            if median_added <= r.goal {
                "met, <="
            } else {
                "missed, <="
            },
            r.goal * 100.0
        );
        json_rows.push(serde_json::json!({
            "test": format!("HTTP rules + response scan: {}", r.name), "unit": r.unit,
            "without": r.plain, "with": r.scan,
            "without_cpu": r.plain_cpu, "with_cpu": r.scan_cpu, "cpu_unit": r.cpu_unit,
            "cpu_added_per_pair": r.added, "cpu_added_median": median_added, "goal": r.goal,
        }));
    }
}
