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
        text(&out.stderr).contains("--from-snapshot and --pool need the vm backend"),
        "{}",
        text(&out.stderr)
    );
}

/// A pool on `socket` keeping `size` machines restored from `template` (stderr to `log`).
fn start_pool(
    images: &Path,
    template: &Path,
    size: u16,
    socket: &Path,
    log: &Path,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("pool")
        .arg("--template")
        .arg(template)
        .args(["--size", &size.to_string()])
        .arg("--socket")
        .arg(socket)
        .env("MOAT_IMAGES", images)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn a_warm_pool_hands_each_concurrent_claim_a_workspace_of_its_own() {
    const NAME: &str = "a_warm_pool_hands_each_concurrent_claim_a_workspace_of_its_own";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    // Three claimants, each a workspace of its own (policy, proxy, audit log, upstream).
    let claimants: Vec<Workspace> = (0..3)
        .map(|_| Workspace::with_backend("vm", Some(images.clone())))
        .collect();
    let template = claimants[0].dir.path().join("template");
    let made = claimants[0]
        .moat_run()
        .arg("--snapshot-to")
        .arg(&template)
        .output()
        .unwrap();
    assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
    let socket = claimants[0].dir.path().join("pool.sock");
    let pool_log = claimants[0].dir.path().join("pool.log");
    // Two machines for three claims at once: the third waits for the pool to refill.
    let mut pool = start_pool(&images, &template, 2, &socket, &pool_log);
    // Claims go to the socket once the pool has bound it (a hang guard, not a timing).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never bound its socket: {}",
            std::fs::read_to_string(&pool_log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let runs: Vec<std::process::Child> = claimants
        .iter()
        .enumerate()
        .map(|(i, ws)| {
            let script = format!(
                "{}; curl -sS -o /dev/null -w 'allowed=%{{http_code}}\\n' {}; \
                 curl -sS -o /dev/null {} ; echo denied=$?; exit {}",
                fork_script(&format!("claim-{i}")),
                ws.url("allowed.test", "/hello"),
                ws.url("denied.test", "/hello"),
                10 + i
            );
            ws.moat_run()
                .arg("--pool")
                .arg(&socket)
                .args(["--", "sh", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<std::process::Output> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let pool_said = std::fs::read_to_string(&pool_log).unwrap_or_default();
    for (i, out) in outs.iter().enumerate() {
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let context = format!("claim {i}:\n{stdout}\n{stderr}\npool:\n{pool_said}");
        // The command's own status comes back through the claim.
        assert_eq!(
            out.status.code(),
            Some(10 + i32::try_from(i).unwrap()),
            "{context}"
        );
        assert!(stderr.contains("claimed a"), "{context}");
        assert_eq!(field(&stdout, "command"), format!("claim-{i}"), "{context}");
        // The claimant's own proxy and policy: the allowed host answers, the denied one not.
        assert_eq!(field(&stdout, "allowed"), "200", "{context}");
        assert_ne!(field(&stdout, "denied"), "0", "{context}");
        assert_ne!(field(&stdout, "generation"), "0", "{context}");
        // Its own audit log saw its flows.
        let audit = claimants[i].audit();
        assert!(
            audit.iter().any(|r| r.to_string().contains("allowed.test")),
            "claim {i}'s audit log: {audit:?}"
        );
    }
    // No two claims share an RNG stream, a CA, a placeholder or a generation.
    for a in 0..outs.len() {
        for b in a + 1..outs.len() {
            let (x, y) = (text(&outs[a].stdout), text(&outs[b].stdout));
            for key in ["urandom", "ca", "placeholder", "generation"] {
                assert_ne!(field(&x, key), field(&y, key), "{key}: claims {a} and {b}");
            }
        }
    }
    // Stopped, the pool takes its machines with it and its socket is gone: a claim says how
    // to start one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.id().cast_signed()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = pool.wait().unwrap();
    let pool_said = std::fs::read_to_string(&pool_log).unwrap_or_default();
    assert!(status.success(), "{pool_said}");
    assert!(!socket.exists(), "{pool_said}");
    // Their parent-death signal stops them as the pool exits (a hang guard, not a timing).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = std::process::Command::new("pgrep")
            .args(["-f", &template.display().to_string()])
            .output()
            .unwrap();
        if text(&left.stdout).trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "machines outlived the pool: {}",
            text(&left.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = claimants[0]
        .moat_run()
        .arg("--pool")
        .arg(&socket)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("moat pool --template"),
        "{}",
        text(&out.stderr)
    );
}
