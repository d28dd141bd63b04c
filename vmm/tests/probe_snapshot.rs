//! Snapshots through real KVM: the probe guest counts ticks (a running sum in its registers
//! and stack, an rng request per tick); the control socket pauses it and writes a snapshot;
//! fresh moat-vmm processes restore it and the guest goes on counting where it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moat_vmm::api::Client;

const TICKS: u64 = 40;

/// The probe's running sum after tick `i`.
fn sum(i: u64) -> u64 {
    (1..=i).fold(0u64, |s, k| s.wrapping_mul(31).wrapping_add(k))
}

fn tick_line(i: u64) -> String {
    format!("probe: tick {i} sum {:#x} rng 64", sum(i))
}

/// Boots the ticking probe with a control socket, waits for tick 3, pauses, snapshots into
/// `<scratch>/snap` and kills the VMM. Returns the snapshot and the last tick printed whole.
fn take_snapshot(name: &str) -> (PathBuf, u64) {
    let dir = common::scratch(name);
    let api = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(common::probe_guest())
        .args(["--mem", "64", "--rng", "--timeout", "120"])
        .args(["--cmdline", &format!("probe.ticks={TICKS}")])
        .arg("--api-sock")
        .arg(&api)
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    let mut vmm = common::Live { child, serial };
    vmm.wait_for_line(&tick_line(3), 60);
    let snap = dir.join("snap");
    let mut client = vmm.ok("connect to the control socket", Client::connect(&api));
    let paused = client.pause();
    vmm.ok("pause", paused);
    let taken = client.snapshot(&snap);
    vmm.ok("snapshot", taken);
    let _ = vmm.child.kill();
    let _ = vmm.child.wait();
    let last = vmm
        .console()
        .lines()
        .filter_map(|l| l.strip_prefix("probe: tick "))
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .max()
        .unwrap();
    assert!((3..TICKS).contains(&last), "snapshot after tick {last}");
    (snap, last)
}

/// Restores `snap` in a fresh moat-vmm (no kernel) with `mem` MiB.
fn restore(snap: &Path, serial: &Path, mem: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--restore")
        .arg(snap)
        .args(["--mem", mem, "--rng", "--timeout", "120"])
        .arg("--serial-out")
        .arg(serial)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: std::process::Child, serial: &Path) -> (Output, String) {
    let out = child.wait_with_output().unwrap();
    (out, std::fs::read_to_string(serial).unwrap_or_default())
}

#[test]
fn two_restores_of_one_snapshot_each_go_on_from_where_it_was_taken() {
    require_kvm!();
    let (snap, last) = take_snapshot("snap-forks");
    let memory = std::fs::read(snap.join("memory")).unwrap();
    let dir = snap.parent().unwrap();
    let (a_serial, b_serial) = (dir.join("fork-a.log"), dir.join("fork-b.log"));
    let a = restore(&snap, &a_serial, "64");
    let b = restore(&snap, &b_serial, "64");
    for (out, console) in [finished(a, &a_serial), finished(b, &b_serial)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr: {stderr}\nconsole:\n{console}"
        );
        assert!(
            !console.contains("probe: hello"),
            "the guest booted again instead of going on:\n{console}"
        );
        // The tick being printed at the pause may be cut; every later one is whole, with the
        // sum the guest kept in its registers and stack, and an answer from the rng queue.
        for i in last + 2..=TICKS {
            let want = tick_line(i);
            assert!(
                console.lines().any(|l| l == want),
                "missing {want:?} in:\n{console}"
            );
        }
        let done = format!("probe: ticks done sum {:#x}", sum(TICKS));
        assert!(console.lines().any(|l| l == done), "{console}");
        assert!(console.lines().any(|l| l == "probe: done"), "{console}");
    }
    assert!(
        std::fs::read(snap.join("memory")).unwrap() == memory,
        "a restore wrote to the snapshot's memory file (it must be mapped privately)"
    );
}

/// Replaces `from` with `to` (same length) in the state file and recomputes its checksum, as
/// another moat-vmm or another host would have written it.
fn rewrite_state(snap: &Path, from: &[u8], to: &[u8]) {
    let path = snap.join("state");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the field is in the state file");
    bytes[at..at + to.len()].copy_from_slice(to);
    let body = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

fn copy_snapshot(snap: &Path, name: &str) -> PathBuf {
    let dst = snap.parent().unwrap().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(snap.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn refused(snap: &Path, mem: &str) -> String {
    let serial = snap.join("serial.log");
    let (out, console) = finished(restore(snap, &serial, mem), &serial);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(console.is_empty(), "a refused snapshot ran:\n{console}");
    stderr
}

#[test]
fn corrupt_foreign_or_misfitting_snapshots_are_refused_before_the_guest_runs() {
    require_kvm!();
    let (snap, _) = take_snapshot("snap-refused");

    let corrupt = copy_snapshot(&snap, "corrupt");
    let mut bytes = std::fs::read(corrupt.join("state")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(corrupt.join("state"), bytes).unwrap();
    let e = refused(&corrupt, "64");
    assert!(e.contains("snapshot state is corrupt"), "{e}");

    let other_vmm = copy_snapshot(&snap, "other-vmm");
    let ours = env!("CARGO_PKG_VERSION").as_bytes();
    let mut theirs = ours.to_vec();
    theirs[0] = if theirs[0] == b'9' { b'8' } else { b'9' };
    rewrite_state(&other_vmm, ours, &theirs);
    let e = refused(&other_vmm, "64");
    assert!(e.contains("snapshot was taken by moat-vmm"), "{e}");

    let other_cpu = copy_snapshot(&snap, "other-cpu");
    let vendor: &[u8] = if std::fs::read(snap.join("state"))
        .unwrap()
        .windows(12)
        .any(|w| w == b"AuthenticAMD")
    {
        b"AuthenticAMD"
    } else {
        b"GenuineIntel"
    };
    rewrite_state(&other_cpu, vendor, b"HygonGenuine");
    let e = refused(&other_cpu, "64");
    assert!(e.contains("another host CPU"), "{e}");

    let truncated = copy_snapshot(&snap, "truncated-memory");
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap();
    memory.set_len(1 << 20).unwrap();
    let e = refused(&truncated, "64");
    assert!(e.contains("truncated"), "{e}");

    let e = refused(&copy_snapshot(&snap, "more-memory"), "128");
    assert!(e.contains("does not fit this VM"), "{e}");
    // Six copies of guest memory: kept only while a failure may need them.
    std::fs::remove_dir_all(snap.parent().unwrap()).unwrap();
}

/// The probe counting 8 ticks with a control socket, past its first tick: its scratch
/// directory, the socket, the running VMM.
fn probe_with_control_socket(name: &str) -> (PathBuf, PathBuf, common::Live) {
    let dir = common::scratch(name);
    let api = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(common::probe_guest())
        .args(["--mem", "64", "--rng", "--timeout", "120"])
        .args(["--cmdline", "probe.ticks=8"])
        .arg("--api-sock")
        .arg(&api)
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    let mut vmm = common::Live { child, serial };
    vmm.wait_for_line(&tick_line(1), 60);
    (dir, api, vmm)
}

#[test]
fn the_control_socket_answers_bad_requests_with_an_error_and_the_vm_goes_on() {
    require_kvm!();
    let (dir, api, mut vmm) = probe_with_control_socket("snap-api-errors");
    // Owner-only from the start, whatever the umask: whoever reaches it can copy guest memory.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&api).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only");
    let mut client = vmm.ok("connect", Client::connect(&api));
    for bad in ["bogus", "snapshot", "x".repeat(200).as_str()] {
        let answer = client.request(bad);
        assert!(answer.is_err(), "{bad:?} was accepted");
        if bad.len() > 64 {
            // An oversized request ends the connection; a new one is served.
            client = vmm.ok("reconnect", Client::connect(&api));
        }
    }
    let snap = client.snapshot(&dir.join("snap"));
    let e = snap.unwrap_err().to_string();
    assert!(e.contains("pause the VM first"), "{e}");
    vmm.ok("pause", client.pause());
    vmm.ok("resume", client.resume());
    vmm.wait_for_line("probe: done", 60);
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.console());
}

#[test]
fn a_console_attached_over_the_control_socket_gets_the_output_from_then_on() {
    require_kvm!();
    let (dir, api, mut vmm) = probe_with_control_socket("snap-console");
    let mut client = vmm.ok("connect", Client::connect(&api));
    vmm.ok("pause", client.pause());
    // Without a descriptor the request is refused and the old sink stays.
    let e = client.request("console").unwrap_err().to_string();
    assert!(e.contains("descriptor"), "{e}");
    let claimed = dir.join("claimed.log");
    let out = std::fs::File::create(&claimed).unwrap();
    vmm.ok("console", client.attach_console(&out));
    vmm.ok("resume", client.resume());
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.console());
    let before = vmm.console();
    let after = std::fs::read_to_string(&claimed).unwrap();
    assert!(before.contains(&tick_line(1)), "{before}");
    assert!(!before.contains("probe: done"), "{before}");
    assert!(after.contains("probe: done"), "{after}");
    assert!(after.contains(&tick_line(8)), "{after}");
}
