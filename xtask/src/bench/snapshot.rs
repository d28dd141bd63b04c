//! `cargo xtask bench snapshot`: issue 20's figures, all in one environment where KVM is real
//! (inside one L1 on hosts whose /dev/kvm is kvm_pvm): a cold boot, a template, restores, the
//! warm pool's claims, moat-vmm's own start, and the memory of pooled and running forks against
//! a booted VM. The measuring is docs/bench/snapshot-bench.sh (shell: it runs inside L1 with
//! only the host's tools); here its `sample NAME VALUE` lines become medians and the ratios
//! against the cold boot of the same run. Only the ratios mean anything: L1 is an emulator.
//! JSON in bench-results/snapshot-latest.json.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{root, run_cmd, setup};

/// Samples per row (cold boots, restores, claims, forks).
const RUNS: u32 = 3;

pub(crate) fn run() -> Result<()> {
    run_cmd(setup::cargo().current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "moat",
        "-p",
        "moat-vmm",
        "--bins",
    ]))?;
    crate::images::run(&["all".to_owned()])?;
    let images = crate::images::cache_dir();
    let out_dir = root().join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let raw = out_dir.join("snapshot-latest.txt");
    let _ = std::fs::remove_file(&raw);
    let script = root().join("docs/bench/snapshot-bench.sh");
    // Release builds, as a host runs them (the guest's init is always built for release).
    let moat = root().join("target/release/moat");
    let command = format!(
        "MOAT={} MOAT_IMAGES={} RUNS={RUNS} sh {} > {} 2>&1",
        moat.display(),
        images.display(),
        script.display(),
        raw.display()
    );
    if crate::l1::kvm_is_real() {
        run_cmd(std::process::Command::new("sh").args(["-c", &command]))?;
    } else {
        eprintln!("xtask bench snapshot: /dev/kvm here is not real KVM: measuring inside L1");
        let job = crate::l1::Job {
            argv: vec!["sh".into(), "-c".into(), command.into()],
            cwd: root(),
            env: std::env::vars_os().collect(),
            rw: vec![out_dir.clone()],
            timeout: Duration::from_secs(1800),
            silence: Some(Duration::from_secs(600)),
        };
        match crate::l1::boot(&job)? {
            crate::l1::Outcome::Exited(0) => {}
            crate::l1::Outcome::Exited(code) => bail!("the bench script exited {code} in L1"),
            crate::l1::Outcome::Hung => bail!("L1 hung during the bench (rerun)"),
            crate::l1::Outcome::NoStatus => bail!("L1 stopped without the bench's status (rerun)"),
        }
    }
    let text = std::fs::read_to_string(&raw)
        .with_context(|| format!("the bench wrote no {}", raw.display()))?;
    let report = report(&text)?;
    let json = out_dir.join("snapshot-latest.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    for line in text.lines().filter_map(|l| l.strip_prefix("trace ")) {
        println!("claim trace: {line}");
    }
    for line in text.lines().filter_map(|l| l.strip_prefix("step ")) {
        println!("guest steps: {line}");
    }
    eprintln!(
        "xtask bench snapshot: raw samples in {}, figures in {}",
        rel(&raw),
        rel(&json)
    );
    Ok(())
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// Every sample by name, in the order they came.
fn samples(text: &str) -> BTreeMap<String, Vec<f64>> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("sample") {
            continue;
        }
        if let (Some(name), Some(Ok(v))) = (words.next(), words.next().map(str::parse::<f64>)) {
            all.entry(name.to_owned()).or_default().push(v);
        }
    }
    all
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

/// Medians of every sample, and the ratios the issue asks for.
fn report(text: &str) -> Result<serde_json::Value> {
    let failures: Vec<&str> = text.lines().filter(|l| l.starts_with("failed ")).collect();
    let all = samples(text);
    let m = |name: &str| all.get(name).and_then(|v| median(v));
    let cold = m("cold_boot_first_line_ms")
        .context("no cold boot measured (see bench-results/snapshot-latest.txt for what failed)")?;
    let ratio = |name: &str| m(name).map(|v| cold / v);
    // 512 MiB guests: a fork's private memory as a share of the guest's.
    let guest_kib = 512.0 * 1024.0;
    let medians: BTreeMap<&String, Option<f64>> = all.iter().map(|(k, v)| (k, median(v))).collect();
    Ok(serde_json::json!({
        "bench": "snapshot",
        "runs": RUNS,
        "medians": medians,
        "samples": all,
        "cold_boot_over_restore": ratio("restore_first_line_ms"),
        "cold_boot_over_claim": ratio("claim_first_line_ms"),
        "cold_boot_over_claim_from_main": m("cold_boot_from_main_ms")
            .zip(m("claim_from_main_ms"))
            .map(|(c, v)| c / v),
        "goal_cold_boot_over_claim": 20.0,
        "pooled_private_share_of_guest": m("pooled_private_dirty_kib").map(|v| v / guest_kib),
        "fork_private_share_of_guest": m("fork_private_dirty_kib").map(|v| v / guest_kib),
        "goal_private_share_of_guest": 0.10,
        "failed": failures,
    }))
}

fn print_table(r: &serde_json::Value) {
    let med = |k: &str| r["medians"][k].as_f64();
    let show = |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.0} {unit}"));
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}x"));
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    println!("| what (median of {RUNS}, one environment) | value | cold boot / this |");
    println!("| --- | --- | --- |");
    println!(
        "| cold boot: start to the agent's first line | {} | 1.0x |",
        show(med("cold_boot_first_line_ms"), "ms")
    );
    println!(
        "| restore from the template (`--from-snapshot`) | {} | {} |",
        show(med("restore_first_line_ms"), "ms"),
        x(r["cold_boot_over_restore"].as_f64())
    );
    println!(
        "| claim from the warm pool (`--pool`), goal 20x | {} | {} |",
        show(med("claim_first_line_ms"), "ms"),
        x(r["cold_boot_over_claim"].as_f64())
    );
    println!(
        "| the same from moat's main() (without starting the binary): cold boot / claim | {} / {} | {} |",
        show(med("cold_boot_from_main_ms"), "ms"),
        show(med("claim_from_main_ms"), "ms"),
        x(r["cold_boot_over_claim_from_main"].as_f64())
    );
    println!(
        "| of which: starting the moat binary (`moat --version`) | {} | |",
        show(med("moat_exec_ms"), "ms")
    );
    println!(
        "| a claim with `--boot-log`: guest-init says the workspace came / first line | {} / {} | |",
        show(med("claim_steps_guest_received_ms"), "ms"),
        show(med("claim_steps_first_line_ms"), "ms")
    );
    println!(
        "| making the template | {} | |",
        show(med("template_ms"), "ms")
    );
    println!(
        "| the pool's {RUNS} machines ready | {} | |",
        show(med("pool_ready_ms"), "ms")
    );
    println!(
        "| moat-vmm main() to first KVM_RUN: boot / restore | {} / {} | |",
        show(med("vmm_boot_to_kvm_run_us"), "µs"),
        show(med("vmm_restore_to_kvm_run_us"), "µs")
    );
    println!(
        "| template memory file: apparent / allocated | {} / {} | |",
        show(med("template_memory_apparent_kib"), "KiB"),
        show(med("template_memory_allocated_kib"), "KiB")
    );
    println!(
        "| private memory (Private_Dirty) of a pooled machine / a running fork / a booted VM, goal < 10% of 512 MiB | {} ({}) / {} ({}) / {} | |",
        show(med("pooled_private_dirty_kib"), "KiB"),
        pct(r["pooled_private_share_of_guest"].as_f64()),
        show(med("fork_private_dirty_kib"), "KiB"),
        pct(r["fork_private_share_of_guest"].as_f64()),
        show(med("cold_private_dirty_kib"), "KiB"),
    );
    println!(
        "| PSS of a pooled machine / a running fork / a booted VM | {} / {} / {} | |",
        show(med("pooled_pss_kib"), "KiB"),
        show(med("fork_pss_kib"), "KiB"),
        show(med("cold_pss_kib"), "KiB"),
    );
    if let Some(f) = r["failed"].as_array().filter(|f| !f.is_empty()) {
        println!("failed: {f:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_become_medians_and_ratios_against_the_cold_boot() {
        let text = "sample cold_boot_first_line_ms 9000\nnoise\nsample cold_boot_first_line_ms 8000\n\
                    sample cold_boot_first_line_ms 10000\nsample claim_first_line_ms 400\n\
                    sample claim_first_line_ms 500\nsample fork_private_dirty_kib 52428.8\n\
                    failed restore rc=1\n";
        let r = report(text).unwrap();
        assert_eq!(r["medians"]["cold_boot_first_line_ms"], 9000.0);
        assert_eq!(r["medians"]["claim_first_line_ms"], 450.0);
        assert_eq!(r["cold_boot_over_claim"], 20.0);
        assert!(r["cold_boot_over_restore"].is_null());
        assert!((r["fork_private_share_of_guest"].as_f64().unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(r["failed"][0], "failed restore rc=1");
        assert!(report("nothing\n").is_err());
    }
}
