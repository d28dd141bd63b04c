//! `moat audit pubkey`, `verify` and `bundle` as an auditor runs them, over a log written by
//! the egress proxy's audit writer naming the (development) policy in force.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moat_audit::AuditKey;
use moat_egress::audit::{Activity, Audit, Event, FlowInfo};
use moat_egress::policy_store::PolicySource;

fn moat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dev(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/dev")
        .join(file)
}

/// A log of one run: its start naming the development policy, ten refused flows, the end;
/// signed with the key at `key`.
fn write_log(dir: &Path, key: &Path) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let audit = Audit::to_file(&path, "ws")
        .unwrap()
        .signed_by(AuditKey::load_or_create(key).unwrap());
    let (_, policy) = PolicySource::new(&dev("profile.toml"), &dev("dev.pub"))
        .unwrap()
        .load_attested()
        .unwrap();
    audit.log().begin(policy).unwrap();
    let flow = FlowInfo {
        uid: "ws-1".into(),
        ..FlowInfo::default()
    };
    for _ in 0..10 {
        assert!(audit.emit(&Event {
            activity: Activity::Refuse,
            flow: &flow,
            rule: None,
            action: None,
            service: None,
            upstream: None,
            reason: Some(moat_egress::outcome::Reason::NoRule),
            detail: None,
            bytes: None,
            allowed: false,
            requests: None,
        }));
    }
    assert!(audit.finish());
    path
}

/// `moat audit pubkey`'s line, in a file for `--pubkey`.
fn pubkey_file(dir: &Path, key: &Path) -> PathBuf {
    let out = moat(&["audit", "pubkey", "--key", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let path = dir.join("audit.pub");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

#[test]
fn verify_passes_an_untouched_log_and_names_the_line_of_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let log = write_log(dir.path(), &key);
    let pubkey = pubkey_file(dir.path(), &key);
    let (log_s, pub_s) = (log.to_str().unwrap(), pubkey.to_str().unwrap());
    let out = moat(&["audit", "verify", log_s, "--pubkey", pub_s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("intact and complete"), "{}", text(&out));

    let original = std::fs::read_to_string(&log).unwrap();
    let edited = original.replacen("\"no_rule\"", "\"finished\"", 1);
    std::fs::write(&log, edited).unwrap();
    let out = moat(&["audit", "verify", log_s, "--pubkey", pub_s]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("line 2: record changed"),
        "{}",
        text(&out)
    );
}

#[test]
fn verify_calls_a_log_cut_short_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let log = write_log(dir.path(), &key);
    let pubkey = pubkey_file(dir.path(), &key);
    let original = std::fs::read_to_string(&log).unwrap();
    let cut: Vec<&str> = original.lines().take(6).collect();
    std::fs::write(&log, cut.join("\n") + "\n").unwrap();
    let out = moat(&[
        "audit",
        "verify",
        log.to_str().unwrap(),
        "--pubkey",
        pubkey.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("INCOMPLETE"), "{}", text(&out));
}

#[test]
fn a_bundle_verifies_with_the_host_key_and_a_changed_member_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let log = write_log(dir.path(), &key);
    let pubkey = pubkey_file(dir.path(), &key);
    let bundle = dir.path().join("evidence.tar");
    let out = moat(&[
        "audit",
        "bundle",
        "--out",
        bundle.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--profile",
        dev("profile.toml").to_str().unwrap(),
        "--policy-pubkey",
        dev("dev.pub").to_str().unwrap(),
        "--audit-key",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let verify = || {
        moat(&[
            "audit",
            "verify",
            bundle.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ])
    };
    let out = verify();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("every file as the manifest says"),
        "{}",
        text(&out)
    );

    // One byte of the bundled log changed (same length: the tar stays readable).
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.windows(9).position(|w| w == b"\"no_rule\"").unwrap();
    bytes[at + 1] = b'N';
    std::fs::write(&bundle, bytes).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("changed"), "{}", text(&out));
}
