//! OTLP export against a receiver that decodes with the official OpenTelemetry protobuf
//! definitions (audit/otlp/receiver.py, `opentelemetry-proto` from PyPI): every record arrives
//! with its fields; an unreachable, failing or slow endpoint never holds the writer up and
//! loses nothing from the local log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moat_audit::export::{ExportCounts, ExportLimits, Exporter};
use moat_audit::ocsf::{NETWORK_ACTIVITY, Product, Severity, Skeleton, Status};
use moat_audit::testing::OtlpReceiver;
use moat_audit::{AuditKey, Log};
use serde_json::{Value, json};

const PRODUCT: Product = Product {
    name: "moat egress proxy",
    log_name: "egress",
};

/// Waits (bounded) until `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..600 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never: {what}");
}

/// A flow's refusal, as the egress proxy writes it (the fields the export maps).
fn refusal(i: u64) -> Value {
    let mut rec = Skeleton {
        class: NETWORK_ACTIVITY,
        activity_id: 5,
        activity_name: "Refuse",
        severity: Severity::Medium,
        status: Some(Status::Failure),
        time: 1_700_000_000_000 + i,
        product: PRODUCT,
    }
    .record();
    rec["src_endpoint"] = json!({ "uid": "ws-otlp", "name": "workspace" });
    rec["firewall_rule"] = json!({ "name": "github", "uid": "github" });
    rec["unmapped"] = json!({ "moat": { "reason": "no_rule" } });
    rec
}

/// A log at `dir`/audit.jsonl exporting to `endpoint`: `n` refusals between its start and end.
fn write(dir: &Path, endpoint: &str, limits: ExportLimits, n: u64) -> (String, Arc<ExportCounts>) {
    let path = dir.join("audit.jsonl");
    let mut log = Log::append_to(&path, PRODUCT, AuditKey::ephemeral().ok()).unwrap();
    let exporter = Exporter::start(endpoint, "moat-test", limits).unwrap();
    let counts = exporter.counts();
    log.set_export(Box::new(exporter));
    log.begin(json!({ "name": "test" })).unwrap();
    for i in 0..n {
        log.append(refusal(i)).unwrap();
    }
    log.finish(json!({})).unwrap();
    (std::fs::read_to_string(&path).unwrap(), counts)
}

#[test]
fn every_record_arrives_as_an_otlp_log_record_with_its_body_and_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let rx = OtlpReceiver::start(dir.path(), &[]);
    let (log, _) = write(dir.path(), &rx.endpoint(), ExportLimits::default(), 20);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 22);
    wait_until("every record received", || {
        rx.received().len() == lines.len()
    });
    let got = rx.received();
    for (i, (line, r)) in lines.iter().zip(&got).enumerate() {
        assert!(r.get("error").is_none(), "{r}");
        // The body is the record exactly as the local log has it.
        assert_eq!(r["body"]["string_value"], *line, "record {i}");
        let rec: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            r["time_unix_nano"],
            rec["time"].as_u64().unwrap() * 1_000_000
        );
        assert_eq!(r["severity_text"], rec["severity"]);
        let attrs = &r["attributes"];
        assert_eq!(attrs["ocsf.class_uid"]["int_value"], rec["class_uid"]);
        assert_eq!(attrs["ocsf.class_name"]["string_value"], rec["class_name"]);
        assert_eq!(attrs["moat.seq"]["int_value"], i);
        assert_eq!(
            attrs["moat.hash"]["string_value"],
            rec["unmapped"]["moat"]["hash"]
        );
        assert_eq!(r["resource"]["service.name"]["string_value"], "moat-test");
        assert_eq!(r["scope"]["name"], "moat-audit");
    }
    // A refusal: its workspace, rule, reason, and WARN for OCSF's Medium.
    let refusal = &got[1];
    assert_eq!(refusal["severity_number"], 13);
    assert_eq!(
        refusal["attributes"]["moat.workspace"]["string_value"],
        "ws-otlp"
    );
    assert_eq!(refusal["attributes"]["moat.rule"]["string_value"], "github");
    assert_eq!(
        refusal["attributes"]["moat.reason"]["string_value"],
        "no_rule"
    );
    // The start and end (Event Log Activity, informational).
    assert_eq!(got[0]["severity_number"], 9);
    assert_eq!(got[21]["attributes"]["ocsf.class_uid"]["int_value"], 1008);
}

#[test]
fn a_failing_endpoint_is_retried_until_it_takes_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let rx = OtlpReceiver::start(dir.path(), &["--fail", "2"]);
    let limits = ExportLimits {
        backoff: Duration::from_millis(10),
        ..ExportLimits::default()
    };
    let (log, counts) = write(dir.path(), &rx.endpoint(), limits, 5);
    let n = log.lines().count();
    wait_until("the batch taken on the third attempt", || {
        rx.received().len() == n
    });
    assert_eq!(counts.failed_requests.load(Ordering::Relaxed), 2);
    assert_eq!(counts.not_sent.load(Ordering::Relaxed), 0);
}

#[test]
fn an_unreachable_endpoint_loses_nothing_locally_and_counts_what_it_could_not_send() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let limits = ExportLimits {
        attempts: 2,
        backoff: Duration::from_millis(10),
        ..ExportLimits::default()
    };
    let (log, counts) = write(dir.path(), &format!("http://127.0.0.1:{port}"), limits, 50);
    let report = moat_audit::verify(&log, None);
    assert!(report.complete(), "{report}");
    assert_eq!(report.records, 52);
    wait_until("every record counted as not sent", || {
        counts.not_sent.load(Ordering::Relaxed) == 52
    });
    assert_eq!(counts.sent.load(Ordering::Relaxed), 0);
}

/// The writer never waits for the endpoint: with an answer taking 2 s and room for 8 records in
/// the queue, 200 records are written at once (waiting would take minutes); what did not fit
/// is counted, and the local log has every record.
#[test]
fn a_slow_endpoint_never_holds_the_writer_and_loses_nothing_locally() {
    let dir = tempfile::tempdir().unwrap();
    let rx = OtlpReceiver::start(dir.path(), &["--delay", "2"]);
    let limits = ExportLimits {
        queue: 8,
        batch: 4,
        linger: Duration::from_millis(1),
        ..ExportLimits::default()
    };
    let (log, counts) = write(dir.path(), &rx.endpoint(), limits, 200);
    let report = moat_audit::verify(&log, None);
    assert!(report.complete(), "{report}");
    assert_eq!(report.records, 202);
    assert!(counts.not_sent.load(Ordering::Relaxed) > 0);
    wait_until("every record sent or counted", || {
        counts.sent.load(Ordering::Relaxed) + counts.not_sent.load(Ordering::Relaxed) == 202
    });
    assert_eq!(
        rx.received().len() as u64,
        counts.sent.load(Ordering::Relaxed)
    );
}

/// The end of a run sends what is still queued before `finish` returns (bounded): a process
/// that exits right after would otherwise lose its last batch, the end record among it.
#[test]
fn the_end_of_a_run_sends_what_is_still_queued() {
    let dir = tempfile::tempdir().unwrap();
    let rx = OtlpReceiver::start(dir.path(), &[]);
    let limits = ExportLimits {
        // A batch that would wait a minute to fill.
        linger: Duration::from_secs(60),
        ..ExportLimits::default()
    };
    let (log, counts) = write(dir.path(), &rx.endpoint(), limits, 20);
    // No waiting here: `finish` (in `write`) has sent them, and the endpoint took them.
    assert_eq!(counts.sent.load(Ordering::Relaxed), 22);
    // (The receiver answers, then writes down what it took.)
    wait_until("the receiver wrote down every record", || {
        rx.received().len() == log.lines().count()
    });
}
