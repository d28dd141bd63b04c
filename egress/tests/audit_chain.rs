//! The audit log's hash chain and signed checkpoints, on a real log written by the real proxy:
//! every kind of tampering is found and placed (docs/audit.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::*;
use moat_audit::chain;
use moat_audit::{AuditKey, Checkpoints, Finding, Report};
use moat_egress::Limits;
use moat_egress::audit::Audit;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

/// A real log: the proxy's run start (naming its policy), three allowed flows (Open, Close),
/// two refused, checkpoints every three records, the run's end. Returns its lines and the key
/// that signed it.
async fn real_log() -> (Vec<String>, AuditKey) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key_path = dir.path().join("audit.key");
    let mut audit = Audit::to_file(&path, "test-ws")
        .unwrap()
        .signed_by(AuditKey::load_or_create(&key_path).unwrap());
    audit.log_mut().set_checkpoints(Checkpoints {
        records: 3,
        interval: Duration::from_secs(3600),
    });
    let tp = TestProxy::start_with_audit(Limits::default(), audit).await;
    for _ in 0..3 {
        let mut s = tp.named("allowed.test", tp.plain.port()).await;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: allowed.test:{}\r\n\r\n",
            tp.plain.port()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0; req.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
    }
    for _ in 0..2 {
        let mut s = tp.named("nope.test", 443).await;
        read_all(&mut s, WAIT).await;
    }
    // Every flow's terminal record is in before the run ends.
    let flows_done = || {
        let text = std::fs::read_to_string(&path).unwrap();
        text.lines()
            .filter(|l| l.contains(r#""activity_id":2,"#) || l.contains(r#""activity_id":5,"#))
            .filter(|l| l.contains(r#""class_uid":4001"#))
            .count()
    };
    for _ in 0..200 {
        if flows_done() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(flows_done(), 5);
    tp.proxy.shutdown();
    assert!(tp.proxy.audit().finish());
    let text = std::fs::read_to_string(&path).unwrap();
    let key = AuditKey::load_or_create(&key_path).unwrap();
    (text.lines().map(str::to_owned).collect(), key)
}

fn verify(lines: &[String], key: &AuditKey) -> Report {
    moat_audit::verify(&(lines.join("\n") + "\n"), Some(&key.public()))
}

fn record(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// The index of the first Close record after the first checkpoint (a flow record well inside
/// the log, with signed records before and after it).
fn a_close_in_the_middle(lines: &[String]) -> usize {
    let first_checkpoint = lines
        .iter()
        .position(|l| record(l)["activity_name"] == "Checkpoint")
        .unwrap();
    (first_checkpoint..lines.len())
        .find(|&i| {
            let r = record(&lines[i]);
            r["class_uid"] == 4001 && r["activity_id"] == 2
        })
        .unwrap()
}

/// Recomputes `prev` and `hash` of every record from `from` on (what someone without the key
/// does to hide an edit), re-signing the signed ones with `key` if given.
fn rechain(lines: &mut [String], from: usize, key: Option<&AuditKey>) {
    let mut prev = record(&lines[from - 1])["unmapped"]["moat"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    for line in &mut lines[from..] {
        let mut r = record(line);
        r["unmapped"]["moat"]["prev"] = json!(prev);
        let h = chain::hash(&r);
        r["unmapped"]["moat"]["hash"] = json!(chain::hex(&h));
        if let (Some(key), true) = (key, r["unmapped"]["moat"]["signature"].is_string()) {
            r["unmapped"]["moat"]["signature"] = json!(key.sign(&h));
        }
        prev = chain::hex(&h);
        *line = serde_json::to_string(&r).unwrap();
    }
}

#[tokio::test]
async fn a_real_log_verifies_intact_and_complete_against_the_host_key_and_names_its_policy() {
    let (lines, key) = real_log().await;
    let report = verify(&lines, &key);
    assert!(report.complete(), "{report}");
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(run.end_line, Some(lines.len()));
    assert_eq!(run.key, Some(key.public().fingerprint()));
    assert_eq!(run.policy[0]["name"], "test", "{:?}", run.policy);
    assert!(run.policy[0]["profile_sha256"].is_string());
    // Checkpoints every three records, signed.
    let signed = lines
        .iter()
        .filter(|l| record(l)["unmapped"]["moat"]["signature"].is_string())
        .count();
    assert!(signed >= 4, "{signed} signed records");
    validate_ocsf_lines(&lines);
}

fn validate_ocsf_lines(lines: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    validate_ocsf(Path::new(&path));
}

#[tokio::test]
async fn an_edited_record_is_found_at_its_line() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    let mut r = record(&lines[i]);
    r["traffic"]["bytes_out"] = json!(1);
    lines[i] = serde_json::to_string(&r).unwrap();
    let report = verify(&lines, &key);
    assert_eq!(report.findings, vec![(i + 1, Finding::Edited)], "{report}");
}

#[tokio::test]
async fn a_deleted_record_is_found_where_the_chain_breaks() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    let seq = record(&lines[i])["unmapped"]["moat"]["seq"]
        .as_u64()
        .unwrap();
    lines.remove(i);
    let report = verify(&lines, &key);
    assert_eq!(
        report.findings[0],
        (
            i + 1,
            Finding::Missing {
                expected: seq,
                found: seq + 1
            }
        ),
        "{report}"
    );
}

#[tokio::test]
async fn an_inserted_record_is_found_at_its_line() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    // A replay: a genuine record, again, two lines later.
    let copy = lines[i].clone();
    lines.insert(i + 2, copy);
    let report = verify(&lines, &key);
    assert!(
        matches!(report.findings[0], (line, Finding::OutOfOrder { .. }) if line == i + 3),
        "{report}"
    );
}

#[tokio::test]
async fn reordered_records_are_found_at_the_first_one_moved() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    lines.swap(i, i + 1);
    let report = verify(&lines, &key);
    assert!(
        matches!(report.findings[0], (line, Finding::Missing { .. }) if line == i + 1),
        "{report}"
    );
    assert!(!report.intact());
}

#[tokio::test]
async fn a_log_cut_short_is_incomplete_and_says_its_last_checkpoint() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    let last_checkpoint_before = (0..=i)
        .rev()
        .find(|&j| record(&lines[j])["unmapped"]["moat"]["signature"].is_string())
        .unwrap();
    // Everything after the Close goes, the run's signed end record with it.
    lines.truncate(i + 1);
    let report = verify(&lines, &key);
    assert!(report.intact(), "{report}");
    assert!(!report.complete(), "{report}");
    assert_eq!(report.runs[0].end_line, None);
    assert_eq!(
        report.runs[0].last_checkpoint,
        Some(last_checkpoint_before + 1)
    );
    assert!(report.to_string().contains("INCOMPLETE"), "{report}");
}

#[tokio::test]
async fn an_edit_rehashed_down_the_chain_is_found_by_the_next_signed_checkpoint() {
    let (mut lines, key) = real_log().await;
    let i = a_close_in_the_middle(&lines);
    let mut r = record(&lines[i]);
    r["traffic"]["bytes_out"] = json!(1);
    lines[i] = serde_json::to_string(&r).unwrap();
    rechain(&mut lines, i, None);
    let next_signed = (i..lines.len())
        .find(|&j| record(&lines[j])["unmapped"]["moat"]["signature"].is_string())
        .unwrap();
    let report = verify(&lines, &key);
    assert_eq!(
        report.findings[0],
        (next_signed + 1, Finding::BadSignature),
        "{report}"
    );
}

/// What a verified chain does not prove: whoever holds a key can rewrite a log and sign it.
/// Checked against the host's key, such a log is refused; against the key it names, it is not.
#[tokio::test]
async fn a_log_rewritten_and_signed_with_another_key_passes_only_without_the_host_key() {
    let (mut lines, key) = real_log().await;
    let other = AuditKey::ephemeral().unwrap();
    let mut start = record(&lines[0]);
    start["unmapped"]["moat"]["audit_key"] = json!({
        "fingerprint": other.public().fingerprint(),
        "public_key": other.public().to_line(),
    });
    let h = chain::hash(&start);
    start["unmapped"]["moat"]["hash"] = json!(chain::hex(&h));
    start["unmapped"]["moat"]["signature"] = json!(other.sign(&h));
    lines[0] = serde_json::to_string(&start).unwrap();
    rechain(&mut lines, 1, Some(&other));
    let text = lines.join("\n") + "\n";
    assert!(moat_audit::verify(&text, None).complete());
    let report = verify(&lines, &key);
    assert!(
        matches!(&report.findings[0], (1, Finding::WrongKey { .. })),
        "{report}"
    );
}
