//! `moat policy explain` and `moat policy test` as an approver runs them: a profile with HTTP
//! rules, signed with a fresh key, checked through the binary (exit status and report).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const PROFILE: &str = r#"
version = 1
name = "approved"
serial = 3

[[rules]]
name = "github"
hosts = ["api.github.com"]
ports = [443]
action = "intercept"

[rules.http]
default = "deny"

[[rules.http.requests]]
name = "read-repos"
methods = ["GET", "HEAD"]
paths = ["/repos/**"]
action = "allow"

[[rules]]
name = "pypi"
hosts = ["pypi.org"]
ports = [443]
action = "passthrough"
programs = ["/usr/bin/python3.11"]

[[secrets]]
name = "github"
source = { env = "GH_TOKEN" }
placeholder = "ghp-moat-placeholder-1"
hosts = ["api.github.com"]
presentation = "authorization_bearer"
"#;

fn moat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .env_remove("MOAT_POLICY_KEY_PASSWORD")
        .output()
        .unwrap()
}

/// Writes the profile and signs it with a fresh key; returns (profile, pubkey) paths.
fn signed(dir: &Path) -> (String, String) {
    let key = dir.join("team");
    assert!(
        moat(&["policy", "keygen", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let profile = dir.join("p.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let out = moat(&[
        "policy",
        "sign",
        "--key",
        dir.join("team.key").to_str().unwrap(),
        profile.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    (
        profile.to_str().unwrap().to_owned(),
        dir.join("team.pub").to_str().unwrap().to_owned(),
    )
}

fn test_cases(dir: &Path, cases: &str) -> (Option<i32>, String) {
    let (profile, pubkey) = signed(dir);
    let file = dir.join("cases.toml");
    std::fs::write(&file, cases).unwrap();
    let out = moat(&[
        "policy",
        "test",
        "--profile",
        &profile,
        "--pubkey",
        &pubkey,
        file.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn policy_test_passes_with_exit_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = test_cases(
        dir.path(),
        r#"
[[cases]]
name = "read"
destination = "api.github.com:443"
path = "/repos/o/r"
expect = "allow"
inject = ["github"]

[[cases]]
name = "no push"
destination = "api.github.com:443"
method = "POST"
path = "/repos/o/r/git/refs"
expect = "deny"
"#,
    );
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("profile \"approved\" (serial 3)"),
        "{report}"
    );
    assert!(report.contains("2 passed, 0 failed"), "{report}");
}

#[test]
fn policy_test_fails_with_exit_status_1_and_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = test_cases(
        dir.path(),
        "[[cases]]\nname = \"push\"\ndestination = \"api.github.com:443\"\nmethod = \"POST\"\n\
         path = \"/repos/o/r/git/refs\"\nexpect = \"allow\"\n",
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("FAIL push\n  - allow\n  + deny: "),
        "{report}"
    );
    assert!(report.contains("0 passed, 1 failed"), "{report}");
}

#[test]
fn policy_test_refuses_an_unsigned_profile_or_a_bad_case_file_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = test_cases(dir.path(), "[[cases]]\nexpect = \"allow\"\n");
    assert_eq!(code, Some(2), "{report}");
    std::fs::write(
        dir.path().join("p.toml"),
        PROFILE.replace("serial = 3", "serial = 4"),
    )
    .unwrap();
    let out = moat(&[
        "policy",
        "test",
        "--profile",
        dir.path().join("p.toml").to_str().unwrap(),
        "--pubkey",
        dir.path().join("team.pub").to_str().unwrap(),
        dir.path().join("cases.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn policy_explain_lists_the_http_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (profile, pubkey) = signed(dir.path());
    let out = moat(&[
        "policy",
        "explain",
        "--profile",
        &profile,
        "--pubkey",
        &pubkey,
        "api.github.com:443",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("HTTP rules (first match decides"), "{text}");
    assert!(text.contains("unmatched: deny"), "{text}");
    assert!(
        text.contains("read-repos") && text.contains("GET,HEAD [/repos/**]"),
        "{text}"
    );
}

#[test]
fn policy_explain_shows_a_rules_programs_and_decides_the_program_given() {
    let dir = tempfile::tempdir().unwrap();
    let (profile, pubkey) = signed(dir.path());
    let explain = |program: Option<&str>| {
        let mut args = vec![
            "policy",
            "explain",
            "--profile",
            &profile,
            "--pubkey",
            &pubkey,
        ];
        if let Some(p) = program {
            args.extend(["--program", p]);
        }
        args.push("pypi.org:443");
        let out = moat(&args);
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let (code, text) = explain(Some("/usr/bin/python3.11"));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("allow: rule \"pypi\""), "{text}");
    assert!(
        text.contains("programs: only flows these programs open"),
        "{text}"
    );
    assert!(text.contains("[/usr/bin/python3.11]"), "{text}");
    let (code, text) = explain(Some("/usr/bin/curl"));
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("matches, but does not allow program /usr/bin/curl"),
        "{text}"
    );
    let (code, text) = explain(None);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("does not allow a flow that names no program"),
        "{text}"
    );
}
