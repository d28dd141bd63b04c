//! The egress proxy rows: direct, moat (passthrough) and squid, each workload on every path in
//! turn, [`REPS`] rounds, reported as medians with the ratio to direct and each proxy's CPU.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use super::env::{Env, Path3};
use super::workloads::{Sample, bulk, keepalive, median, new_conns};
use super::{REPS, Sizes};

/// One workload's samples, per path of [`Path3::ALL`].
pub(super) struct Row {
    name: &'static str,
    unit: &'static str,
    cpu_unit: &'static str,
    cpu_scale: f64,
    samples: Vec<Vec<Sample>>,
}

/// Measures every workload on every path of [`Path3::ALL`] (none with `--intercept-only`),
/// after one warm-up that proves each path works.
pub(super) async fn rows(env: &Env, sizes: &Sizes) -> Result<Vec<Row>> {
    // Warm up every path once (and prove each works) before measuring.
    let passthrough_paths: &[Path3] = if sizes.intercept_only {
        &[]
    } else {
        &Path3::ALL
    };
    for &p in passthrough_paths {
        new_conns(env, p, 3)
            .await
            .with_context(|| format!("{} path does not work", p.name()))?;
    }

    let mut rows = vec![
        Row {
            name: "bulk HTTPS download",
            unit: "MB/s",
            cpu_unit: "s/GB",
            cpu_scale: 1000.0,
            samples: vec![],
        },
        Row {
            name: "small requests, 1 kept-alive conn",
            unit: "req/s",
            cpu_unit: "µs/req",
            cpu_scale: 1e6,
            samples: vec![],
        },
        Row {
            name: "new TLS connection per request",
            unit: "conn/s",
            cpu_unit: "µs/conn",
            cpu_scale: 1e6,
            samples: vec![],
        },
    ];
    for row in &mut rows {
        row.samples = Path3::ALL.iter().map(|_| Vec::new()).collect();
    }
    for rep in (0..REPS).filter(|_| !sizes.intercept_only) {
        eprintln!("xtask bench: round {}/{REPS}", rep + 1);
        for (i, p) in Path3::ALL.iter().enumerate() {
            let what = |w: &str| format!("{} path, {w}", p.name());
            rows[0].samples[i].push(bulk(env, *p).await.with_context(|| what("bulk"))?);
            rows[1].samples[i].push(
                keepalive(env, *p, sizes.keepalive_requests)
                    .await
                    .with_context(|| what("kept-alive requests"))?,
            );
            rows[2].samples[i].push(
                new_conns(env, *p, sizes.new_conns)
                    .await
                    .with_context(|| what("new connections"))?,
            );
        }
    }
    Ok(rows)
}

/// Appends the rows to the table (its header always) and to the JSON rows.
pub(super) fn report(
    rows: &[Row],
    sizes: &Sizes,
    table: &mut String,
    json_rows: &mut Vec<serde_json::Value>,
) {
    if sizes.intercept_only {
        return;
    }
    let _ = writeln!(
        table,
        "| test | direct | moat | squid | moat CPU | squid CPU |\n| --- | --- | --- | --- | --- | --- |"
    );
    for row in rows {
        let rate = |i: usize| median(row.samples[i].iter().map(|s| s.units / s.secs).collect());
        let cpu = |i: usize| {
            median(
                row.samples[i]
                    .iter()
                    .map(|s| s.cpu / s.units * row.cpu_scale)
                    .collect(),
            )
        };
        let (d, m, s) = (rate(0), rate(1), rate(2));
        let _ = writeln!(
            table,
            "| {} ({}) | {d:.0} (1.00) | {m:.0} ({:.2}) | {s:.0} ({:.2}) | {:.3} {} | {:.3} {} |",
            row.name,
            row.unit,
            m / d,
            s / d,
            cpu(1),
            row.cpu_unit,
            cpu(2),
            row.cpu_unit
        );
        json_rows.push(serde_json::json!({
            "test": row.name, "unit": row.unit,
            "direct": d, "moat": m, "squid": s,
            "moat_ratio": m / d, "squid_ratio": s / d,
            "moat_cpu": cpu(1), "squid_cpu": cpu(2), "cpu_unit": row.cpu_unit,
        }));
    }
}
