//! Templates and forks of VM workspaces: `moat run --backend vm --snapshot-to DIR` boots a VM
//! and snapshots it while guest-init stands by (before anything of a workspace exists in it);
//! `moat run --from-snapshot DIR` starts workspaces from it. Each fork is a new workspace: the
//! guest reseeds its RNG from the host before anything runs, and gets its own CA, placeholders
//! and audit log from its own `moat run`. Runs where KVM is real (inside L1 on our machines).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::Path;

use common::vm::vm_images;
use common::{E2E_AUTO_ENV, Workspace, text};

/// What a fork reports about itself: the command it ran, 32 bytes of /dev/urandom, a digest
/// of the trust store it sees (the workspace CA included), its per-start placeholder and its
/// generation.
fn fork_script(name: &str) -> String {
    format!(
        "echo command={name}; echo urandom=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
         echo ca=$(sha256sum < /etc/ssl/certs/ca-certificates.crt | cut -c1-64); \
         echo placeholder=${E2E_AUTO_ENV}; echo generation=$(cat /run/moat/generation)"
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

fn fork(ws: &Workspace, template: &Path, name: &str) -> String {
    let out = ws
        .moat_run()
        .arg("--from-snapshot")
        .arg(template)
        .args(["--", "sh", "-c", &fork_script(name)])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fork {name}: {stdout}\n{}",
        text(&out.stderr)
    );
    stdout
}

#[test]
fn two_forks_of_one_template_share_no_rng_stream_ca_or_placeholder() {
    const NAME: &str = "two_forks_of_one_template_share_no_rng_stream_ca_or_placeholder";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    let ws = Workspace::with_backend("vm", Some(images));
    let template = ws.dir.path().join("template");
    let made = ws
        .moat_run()
        .arg("--snapshot-to")
        .arg(&template)
        .output()
        .unwrap();
    assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
    for f in ["state", "memory", "moat-template.toml"] {
        assert!(template.join(f).is_file(), "the template has no {f}");
    }

    let a = fork(&ws, &template, "fork-a");
    let b = fork(&ws, &template, "fork-b");
    // Different commands ran in each.
    assert_eq!(field(&a, "command"), "fork-a");
    assert_eq!(field(&b, "command"), "fork-b");
    // Never the same random stream (both start from one RNG state in the snapshot).
    assert_eq!(field(&a, "urandom").len(), 64, "{a}");
    assert_ne!(field(&a, "urandom"), field(&b, "urandom"), "{a}\n{b}");
    // Never the same workspace CA (each `moat run` draws its own).
    assert_ne!(field(&a, "ca"), field(&b, "ca"), "{a}\n{b}");
    // Never the same per-start placeholder.
    assert!(!field(&a, "placeholder").is_empty(), "{a}");
    assert_ne!(field(&a, "placeholder"), field(&b, "placeholder"));
    // Each knows it is a restore, and which.
    assert_ne!(field(&a, "generation"), "0");
    assert_ne!(field(&a, "generation"), field(&b, "generation"));
}

#[test]
fn a_template_is_refused_by_a_run_that_is_not_a_vm() {
    let ws = Workspace::with_backend("namespace", None);
    let out = ws
        .moat_run()
        .arg("--from-snapshot")
        .arg(ws.dir.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("--from-snapshot need the vm backend"),
        "{}",
        text(&out.stderr)
    );
}
