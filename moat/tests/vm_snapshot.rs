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
/// of the trust store it sees (the workspace CA included), its per-start placeholder, its
/// generation and its wall clock.
fn fork_script(name: &str) -> String {
    format!(
        "echo command={name}; echo urandom=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
         echo ca=$(sha256sum < /etc/ssl/certs/ca-certificates.crt | cut -c1-64); \
         echo placeholder=${E2E_AUTO_ENV}; echo generation=$(cat /run/moat/generation); \
         echo clock=$(date +%s)"
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

fn fork(ws: &Workspace, template: &Path, name: &str) -> String {
    let out = ws.output(
        ws.moat_run().arg("--from-snapshot").arg(template).args([
            "--",
            "sh",
            "-c",
            &fork_script(name),
        ]),
        &format!("moat run --from-snapshot ({name})"),
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fork {name}: {stdout}\n{}",
        text(&out.stderr)
    );
    stdout
}

/// `moat run --snapshot-to` into the workspace's directory: the template's path.
fn make_template(ws: &Workspace) -> std::path::PathBuf {
    let template = ws.dir.path().join("template");
    let made = ws.output(
        ws.moat_run().arg("--snapshot-to").arg(&template),
        "moat run --snapshot-to",
    );
    assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
    for f in ["state", "memory", "moat-template.toml"] {
        assert!(template.join(f).is_file(), "the template has no {f}");
    }
    template
}

#[test]
fn two_forks_of_one_template_share_no_rng_stream_ca_or_placeholder() {
    const NAME: &str = "two_forks_of_one_template_share_no_rng_stream_ca_or_placeholder";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    let ws = Workspace::with_backend("vm", Some(images));
    let template = make_template(&ws);
    // The template's clock stopped at its snapshot: let it fall well behind the host's.
    std::thread::sleep(std::time::Duration::from_secs(CLOCK_BEHIND_SECS));

    let before = unix_now();
    let a = fork(&ws, &template, "fork-a");
    let after = unix_now();
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
    // Its wall clock is the host's, not the snapshot's (TLS checks certificates against it).
    let clock: u64 = field(&a, "clock").parse().unwrap();
    assert!(
        (before - 2..=after + 2).contains(&clock),
        "fork-a's clock says {clock}, the host's was {before}..{after}"
    );
}

/// How long the fork test waits after making its template: a restore whose clock were the
/// snapshot's would be this far behind.
const CLOCK_BEHIND_SECS: u64 = 15;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
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
    let template = make_template(&claimants[0]);
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
    let pool_said = || {
        format!(
            "--- the pool's log ---\n{}",
            std::fs::read_to_string(&pool_log).unwrap_or_default()
        )
    };
    // Each claim within the tests' deadline, or a report of where it hung.
    let outs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = claimants
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
                let (socket, pool_said) = (&socket, &pool_said);
                scope.spawn(move || {
                    common::deadline::output_within(
                        ws.moat_run()
                            .arg("--pool")
                            .arg(socket)
                            .args(["--", "sh", "-c", &script]),
                        &format!("claim {i}"),
                        common::deadline::RUN_DEADLINE,
                        pool_said,
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, out) in outs.iter().enumerate() {
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let context = format!("claim {i}:\n{stdout}\n{stderr}\n{}", pool_said());
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
    interactive_claim(&claimants[1], &socket, &pool_said);
    // Stopped, the pool takes its machines with it and its socket is gone: a claim says how
    // to start one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.id().cast_signed()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = std::time::Instant::now();
    let status = loop {
        if let Some(status) = pool.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < std::time::Duration::from_secs(60),
            "the pool did not stop on SIGTERM\n{}",
            pool_said()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
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

/// An interactive claim: `moat run --pool` on a terminal (a pseudo-terminal here), no command.
/// The agent's shell reads what is typed there (moat hands its terminal to the machine's
/// console, `console-input`), its exit status is the run's, and the terminal's mode comes
/// back as it was.
fn interactive_claim(ws: &Workspace, socket: &Path, pool_said: &dyn Fn() -> String) {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut typist = master.try_clone().unwrap();
    // Killed if the test fails before it exits (its claim then ends with it).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut moat = KillOnDrop(
        ws.moat_run()
            .arg("--pool")
            .arg(socket)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap())
            .spawn()
            .unwrap(),
    );
    let child = &mut moat.0;
    let mut seen = Vec::new();
    // Hang guards, not timings.
    let deadline = Instant::now() + common::deadline::RUN_DEADLINE;
    // Reads what the terminal shows until `done` says so (or moat exits, when `exits`);
    // fails with what it showed after the deadline.
    let mut wait = |what: &str, seen: &mut Vec<u8>, done: &dyn Fn(&str) -> bool, exits: bool| {
        loop {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = master.read(&mut chunk) {
                seen.extend_from_slice(&chunk[..n]);
            }
            let shown = String::from_utf8_lossy(seen).into_owned();
            let status = child.try_wait().unwrap();
            match status {
                Some(s) if exits => return Some(s),
                None if done(&shown) => return None,
                Some(s) => panic!("moat exited ({s}) before {what}:\n{shown}\n{}", pool_said()),
                None if Instant::now() > deadline => {
                    panic!("no {what} within the deadline:\n{shown}\n{}", pool_said())
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    // The shell's prompt: its terminal is open, so what is typed from now on reaches it.
    wait("prompt", &mut seen, &|t| t.contains("$ "), false);
    // Raw meanwhile: keys go to the guest as typed, its terminal echoes and edits lines.
    let during = nix::sys::termios::tcgetattr(&slave).unwrap();
    use nix::sys::termios::LocalFlags;
    assert!(
        !during
            .local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG),
        "the terminal is not raw while the shell runs: {:?}",
        during.local_flags
    );
    // Enter is CR on a raw terminal, as on a serial line; the guest's terminal makes it NL.
    typist.write_all(b"echo typed-$((6*7))\r").unwrap();
    wait(
        "typed command's output",
        &mut seen,
        &|t| t.contains("typed-42"),
        false,
    );
    typist.write_all(b"exit 7\r").unwrap();
    let status = wait("exit", &mut seen, &|_| false, true).unwrap();
    let shown = String::from_utf8_lossy(&seen).into_owned();
    assert_eq!(status.code(), Some(7), "{shown}\n{}", pool_said());
    assert!(shown.contains("claimed a"), "{shown}");
    // Back as it was once moat is gone.
    let after = nix::sys::termios::tcgetattr(&slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "{shown}");
    assert_eq!(after.input_flags, before.input_flags, "{shown}");
    assert_eq!(after.control_chars, before.control_chars, "{shown}");
}

/// The body the agent downloads: deterministic bytes, large enough that the download is under
/// way for several seconds.
const BODY_BYTES: usize = 32 << 20;
/// The server sends this much, then sleeps [`THROTTLE`]: at most about 6 MiB/s, so the download
/// lasts seconds even where the guest could take it faster.
const CHUNK: usize = 64 << 10;
const THROTTLE: std::time::Duration = std::time::Duration::from_millis(10);
/// The test pauses the VM once the server has sent this much (of [`BODY_BYTES`]).
const PAUSE_AFTER: u64 = 4 << 20;

/// A plain-HTTP server on loopback for `download.test`: `/body` is the body, throttled, with
/// its length (so that a cut download cannot pass for a whole one); `/done` answers at once.
/// It counts what it sent of the body and whether it sent all of it.
struct SlowServer {
    port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    finished: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn body() -> Vec<u8> {
    // xorshift64*: the same bytes every time, no run of zeros for anything to shortcut.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut body = Vec::with_capacity(BODY_BYTES);
    while body.len() < BODY_BYTES {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        body.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    body
}

fn start_slow_server(body: std::sync::Arc<Vec<u8>>) -> SlowServer {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (count, done) = (
        std::sync::Arc::clone(&sent),
        std::sync::Arc::clone(&finished),
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            let (body, count, done) = (
                std::sync::Arc::clone(&body),
                std::sync::Arc::clone(&count),
                std::sync::Arc::clone(&done),
            );
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if !head.starts_with(b"GET /body ") {
                    let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if tcp.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for chunk in body.chunks(CHUNK) {
                    if tcp.write_all(chunk).is_err() {
                        return;
                    }
                    count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    std::thread::sleep(THROTTLE);
                }
                done.store(true, Ordering::SeqCst);
            });
        }
    });
    SlowServer {
        port,
        sent,
        finished,
    }
}

/// The `rootfs = "..."` line of the images' current.toml: the root disk moat run gave the VM.
fn root_disk(images: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(images.join("current.toml")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("rootfs = "))
        .map(|v| std::path::PathBuf::from(v.trim_matches('"')))
        .expect("current.toml names the root disk")
}

/// Issue 20's "snapshot a running workspace mid-download and resume it (the download
/// completes or fails cleanly, never corrupts)", and the same snapshot restored without its
/// host.
///
/// Which of the two it is, is decided by moat-vmm: a snapshot stops its devices, and its vsock
/// device drops every host connection then; on `resume` the guest gets a transport reset
/// (vmm/README.md, as Firecracker does). So the download in flight fails, cleanly: curl sees
/// the connection reset and says so with a nonzero status, and no checksum of a partial file
/// is ever printed. The workspace itself goes on: guest-init reattaches its control stream,
/// and the agent's status comes back to `moat run`.
///
/// Restored by moat-vmm alone (nothing listens on its vsock sockets), the mid-download machine
/// has lost its host: guest-init cannot reattach, ends the agent (which would otherwise retry
/// its host forever) and powers off; moat-vmm exits 0 (the guest reset the machine).
#[test]
fn a_snapshot_mid_download_fails_the_download_cleanly_and_a_restore_without_its_host_powers_off() {
    use std::sync::atomic::Ordering;
    const NAME: &str = "a_snapshot_mid_download_fails_the_download_cleanly_and_a_restore_without_its_host_powers_off";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    let body = std::sync::Arc::new(body());
    let server = start_slow_server(std::sync::Arc::clone(&body));
    let mut ws = Workspace::with_backend("vm", Some(images.clone())).with_rules(&format!(
        "[[rules]]\nname = \"download\"\nhosts = [\"download.test\"]\nports = [{}]\n\
         action = \"passthrough\"\ncidrs = [\"127.0.0.0/8\"]\n",
        server.port
    ));
    ws.resolve.push("download.test=127.0.0.1".into());
    let home = ws.dir.path().join("home.ext4");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=1000:1000"])
        .arg(&home)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made.success());
    let api = ws.dir.path().join("vmm-api.sock");
    ws.args = vec![
        "--mem".into(),
        "512".into(),
        "--home-disk".into(),
        home.clone().into(),
        "--api-sock".into(),
        api.clone().into(),
    ];
    let url = |path: &str| format!("http://download.test:{}{path}", server.port);
    // The agent downloads, says how it went, then (as an agent that waits for its host does)
    // retries its host until it answers, and exits with the download's status.
    let script = format!(
        "curl -sS -o /tmp/body {}; rc=$?; \
         if [ $rc -eq 0 ]; then echo sha256=$(sha256sum /tmp/body | cut -c1-64); \
         else echo download-failed=$rc; fi; \
         until curl -sS -o /dev/null {} 2>/dev/null; do sleep 1; done; exit $rc",
        url("/body"),
        url("/done"),
    );

    let run = {
        let ws_dir = ws.dir.path().to_owned();
        let mut cmd = ws.command(&script);
        let what = "moat run --api-sock (the download)".to_owned();
        std::thread::spawn(move || {
            common::deadline::output_within(
                &mut cmd,
                &what,
                common::deadline::RUN_DEADLINE,
                &|| format!("(audit log in {})", ws_dir.display()),
            )
        })
    };
    // Mid-download: the server has sent some of the body, and not all.
    while server.sent.load(Ordering::SeqCst) < PAUSE_AFTER {
        assert!(
            !run.is_finished(),
            "the workspace ended before the download was under way: {:?}",
            run.join().map(|o| (text(&o.stdout), text(&o.stderr)))
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Owner-only: whoever reaches it can copy the VM's memory.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&api).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only");
    let mut vmm = moat_vmm::api::Client::connect(&api).unwrap();
    vmm.pause().unwrap();
    let snapshot = ws.dir.path().join("mid-download");
    vmm.snapshot(&snapshot).unwrap();
    // The home disk as the snapshot left it (devices stay stopped until resume), for the
    // restore below.
    let home_copy = ws.dir.path().join("home-at-snapshot.ext4");
    std::fs::copy(&home, &home_copy).unwrap();
    let sent_at_snapshot = server.sent.load(Ordering::SeqCst);
    vmm.resume().unwrap();
    drop(vmm);

    let out = run.join().unwrap();
    let (console, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        sent_at_snapshot < BODY_BYTES as u64 && !server.finished.load(Ordering::SeqCst),
        "the download was still under way at the snapshot ({sent_at_snapshot} of {BODY_BYTES} \
         bytes sent) and never completed: {console}{stderr}"
    );
    // Failed cleanly: curl's own error and status, never a checksum of what it got.
    let failed: i32 = console
        .lines()
        .find_map(|l| l.strip_prefix("download-failed="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no download-failed= in:\n{console}\n{stderr}"));
    assert_ne!(failed, 0);
    assert!(console.contains("curl: ("), "curl says why: {console}");
    assert!(!console.contains("sha256="), "{console}");
    // The workspace went on: its control stream reattached, and the agent's status came back.
    assert!(
        stderr.contains("control stream was reset (a snapshot) and guest-init reattached it"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(failed), "{console}\n{stderr}");
    eprintln!(
        "snapshot taken after the server sent {sent_at_snapshot} of {BODY_BYTES} bytes; the \
         agent's download: {:?}, status {failed}",
        console
            .lines()
            .find(|l| l.contains("curl: ("))
            .unwrap_or_default()
    );

    // The same machine, restored with moat-vmm directly, with the machine moat run gave it
    // and nothing listening on its vsock sockets: its host is gone.
    let restore_dir = ws.dir.path().join("restored");
    std::fs::create_dir_all(&restore_dir).unwrap();
    let mut restore = std::process::Command::new(
        Path::new(env!("CARGO_BIN_EXE_moat")).with_file_name("moat-vmm"),
    );
    restore
        .arg("--restore")
        .arg(&snapshot)
        .args(["--mem", "512", "--vcpus", "1", "--vsock-uds"])
        .arg(restore_dir.join("vsock"))
        .arg("--block-ro")
        .arg(root_disk(&images))
        .arg("--block")
        .arg(&home_copy)
        .args(["--rng", "--serial-in", "off"])
        .env("MOAT_LOG", "warn");
    let restored = std::time::Instant::now();
    let out = common::deadline::output_within(
        &mut restore,
        "moat-vmm --restore (the mid-download snapshot, without its host)",
        common::deadline::RUN_DEADLINE,
        &String::new,
    );
    let console = text(&out.stdout);
    assert!(
        console.contains("moat guest-init: the host is gone"),
        "guest-init says why it stops: {console}\n{}",
        text(&out.stderr)
    );
    assert!(!console.contains("sha256="), "{console}");
    // And nothing else: the agent's end under the stop is not an error of its own.
    assert!(!console.contains("cannot start the agent"), "{console}");
    // 0: the guest reset the machine (vmm/src/exit.rs), on its own.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{console}\n{}",
        text(&out.stderr)
    );
    eprintln!(
        "the restore without its host powered off after {:.1} s; its console:\n{console}",
        restored.elapsed().as_secs_f64()
    );
}

/// `--api-sock` is moat-vmm's: the namespace backend refuses it, and so does a template run
/// (which has a control socket of its own), each saying why.
#[test]
fn api_sock_is_refused_without_a_vm_and_beside_snapshot_to() {
    let ws = Workspace::with_backend("namespace", None);
    let api = ws.dir.path().join("api.sock");
    let out = ws
        .moat_run()
        .arg("--api-sock")
        .arg(&api)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--api-sock is moat-vmm's control socket"),
        "{}",
        text(&out.stderr)
    );
    let out = ws
        .moat_run()
        .arg("--api-sock")
        .arg(&api)
        .arg("--snapshot-to")
        .arg(ws.dir.path().join("template"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        text(&out.stderr)
    );
    assert!(!api.exists());
}
