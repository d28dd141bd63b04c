//! The jail through real KVM: the probe guest runs (vsock both ways included) inside a VMM that
//! forked into new namespaces, pivoted into an empty root and dropped to nobody; and the jail's
//! refusals. The same unprivileged, through a user namespace: the VMM spawned as uid 65534.
//! Skipped with a printed reason without /dev/kvm, without root (to set the tests up), or
//! without user namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn not_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
}

macro_rules! require_root_and_kvm {
    () => {
        require_kvm!();
        if not_root() {
            common::skip(
                "these tests need root (the root jail, and setting up the unprivileged one)",
            );
            return;
        }
    };
}

/// A private copy of the probe: cargo hard-links its outputs, and the jail refuses hard links.
fn probe_copy(dir: &Path) -> PathBuf {
    let p = dir.join("probe.elf");
    std::fs::copy(common::probe_guest(), &p).unwrap();
    p
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(what)
    {
        assert!(
            Instant::now() < deadline,
            "{what:?} never appeared in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jailed_vmm_runs_the_probe_with_vsock_both_ways() {
    require_root_and_kvm!();
    let dir = common::scratch("jail-vsock");
    let probe = probe_copy(&dir);
    let vmm = Command::new(env!("CARGO_BIN_EXE_moat-vmm"));
    vsock_both_ways_through_the_jail(vmm, &dir, &probe);
}

/// The probe's vsock echo to a host listener on `<uds>_7000`, then a host `CONNECT 6000`
/// echoed back, through `vmm` jailed in `dir`; the socket is gone afterwards.
fn vsock_both_ways_through_the_jail(mut vmm: Command, dir: &Path, probe: &Path) {
    let socks = dir.join("socks");
    std::fs::create_dir_all(&socks).unwrap();
    // The jail uid binds nothing here, but must reach the proxy's sockets; unprivileged,
    // the VMM also binds <uds> in it.
    std::os::unix::fs::chown(&socks, Some(65534), Some(65534)).unwrap();
    let uds = socks.join("v.sock");
    let serial = dir.join("serial.log");
    let listener = UnixListener::bind(format!("{}_7000", uds.display())).unwrap();
    // The jailed VMM runs as nobody: the proxy's socket must let it connect.
    let sock = PathBuf::from(format!("{}_7000", uds.display()));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).unwrap();
        }
        total
    });
    let child = vmm
        .arg("--kernel")
        .arg(probe)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args(["--mem", "64", "--timeout", "60"])
        .args(["--cmdline", "probe.vsock_echo=7000 probe.vsock_bytes=4096"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    let mut vmm = common::Live { child, serial };
    // Connect once the guest's own connection is done (the guest accepts only then; see
    // probe_vsock.rs).
    vmm.wait_for_line("probe: vsock echo ok 4096 bytes", 50);
    let back = vmm.echo_through_guest_port(&uds, 6000, b"from outside the jail");
    assert_eq!(back, b"from outside the jail");
    let status = vmm.child.wait().unwrap();
    let out = vmm.console();
    assert_eq!(status.code(), Some(0), "serial:\n{out}");
    assert_eq!(echo.join().unwrap(), 4096);
    assert!(
        out.lines().any(|l| l == "probe: vsock echo ok 4096 bytes"),
        "{out}"
    );
    assert!(
        !uds.exists(),
        "the parent removes the socket after the jailed child exits"
    );
}

#[test]
fn jailed_vmm_runs_as_nobody_in_its_own_namespaces_and_root() {
    require_root_and_kvm!();
    let dir = common::scratch("jail-confined");
    let root = dir.join("root");
    let serial = dir.join("serial.log");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(probe_copy(&dir))
        .arg("--jail-dir")
        .arg(&root)
        .args(["--cmdline", "probe.hang=1", "--timeout", "30"])
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    wait_for(&serial, "hanging on purpose");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vmm.id()))
        .unwrap_or_default();
    let child: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    // What the VMM sees as `/`: the jail directory, empty (no vsock asked for).
    let root_entries: Vec<_> = std::fs::read_dir(format!("/proc/{child}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = vmm.kill();
    let _ = vmm.wait();

    assert_eq!(field("Uid:"), vec!["65534"; 4]);
    assert_eq!(field("Gid:"), vec!["65534"; 4]);
    assert_eq!(field("Groups:"), Vec::<&str>::new());
    assert_eq!(field("NSpid:").len(), 2, "a PID namespace of its own");
    assert_eq!(field("NSpid:").last(), Some(&"1"));
    assert_eq!(field("Seccomp:"), vec!["2"]);
    assert_eq!(field("CapEff:"), vec!["0000000000000000"]);
    assert_eq!(field("CapPrm:"), vec!["0000000000000000"]);
    assert_eq!(field("CapBnd:"), vec!["0000000000000000"]);
    for kind in ["net", "mnt", "ipc", "uts", "pid"] {
        assert_ne!(
            ns(&child.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    assert!(root_entries.is_empty(), "{root_entries:?}");
    assert!(root.is_dir());
}

#[test]
fn jail_refuses_a_hard_linked_kernel() {
    let dir = common::scratch("jail-hardlink");
    let k = dir.join("k");
    std::fs::write(&k, b"not even a kernel").unwrap();
    std::fs::hard_link(&k, dir.join("k2")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(&k)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hard links"));
}

#[test]
fn jail_refuses_a_symlinked_disk() {
    let dir = common::scratch("jail-symlink");
    let k = dir.join("k");
    std::fs::write(&k, b"not even a kernel").unwrap();
    std::fs::write(dir.join("disk"), vec![0u8; 512]).unwrap();
    std::os::unix::fs::symlink(dir.join("disk"), dir.join("disk-link")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(&k)
        .arg("--block")
        .arg(dir.join("disk-link"))
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
}

#[test]
fn jail_refuses_a_non_empty_root() {
    let dir = common::scratch("jail-nonempty");
    let k = dir.join("k");
    std::fs::write(&k, b"x").unwrap();
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::write(dir.join("root/stray"), b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(&k)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be an empty directory"));
}

#[test]
fn jailed_vmm_dies_with_its_parent() {
    require_root_and_kvm!();
    let dir = common::scratch("jail-pdeath");
    let serial = dir.join("serial.log");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(probe_copy(&dir))
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args(["--cmdline", "probe.hang=1", "--timeout", "30"])
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    wait_for(&serial, "hanging on purpose");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vmm.id()))
        .unwrap_or_default();
    let child: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{child}")).exists()
        && !std::fs::read_to_string(format!("/proc/{child}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why user namespaces cannot be created by an unprivileged process here, if they cannot.
fn user_namespaces_unavailable() -> Option<String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if read("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Some("user.max_user_namespaces is 0".to_owned());
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Some("kernel.unprivileged_userns_clone is 0".to_owned());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Some("AppArmor restricts unprivileged user namespaces".to_owned());
    }
    for tool in ["unshare", "setpriv", "mknod"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} (util-linux/coreutils) is not installed"));
        }
    }
    None
}

macro_rules! require_unprivileged_jail {
    () => {
        require_root_and_kvm!();
        if let Some(why) = user_namespaces_unavailable() {
            common::skip(&format!(
                "{why}; the unprivileged jail needs user namespaces"
            ));
            return;
        }
    };
}

/// `moat-vmm` as uid/gid 65534 with no groups, given a /dev/kvm it may open: in a private
/// mount namespace of its own (the host's /dev/kvm is root-only, and stays so), a 0666 node
/// for the same device, on a tmpfs under `dir`, is bind-mounted over /dev/kvm.
fn unprivileged_vmm(dir: &Path) -> Command {
    let dev = dir.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    let script = r#"set -e
mount -t tmpfs -o mode=0755 moat-test-dev "$DEV"
mknod -m 0666 "$DEV/kvm" c 10 232
mount --bind "$DEV/kvm" /dev/kvm
exec setpriv --reuid 65534 --regid 65534 --clear-groups "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(env!("CARGO_BIN_EXE_moat-vmm"))
    .env("DEV", &dev);
    cmd
}

/// A scratch directory the unprivileged VMM owns, with a private probe copy in it.
fn unprivileged_scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = common::scratch(name);
    let probe = probe_copy(&dir);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    (dir, probe)
}

#[test]
fn unprivileged_jail_runs_the_probe_with_vsock_both_ways() {
    require_unprivileged_jail!();
    let (dir, probe) = unprivileged_scratch("jail-userns-vsock");
    vsock_both_ways_through_the_jail(unprivileged_vmm(&dir), &dir, &probe);
}

#[test]
fn unprivileged_jail_boots_the_probe_through_a_user_namespace() {
    require_unprivileged_jail!();
    let (dir, probe) = unprivileged_scratch("jail-userns-boot");
    let serial = dir.join("serial.log");
    let out = unprivileged_vmm(&dir)
        .arg("--kernel")
        .arg(&probe)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args(["--mem", "64", "--timeout", "60"])
        .arg("--serial-out")
        .arg(&serial)
        .output()
        .unwrap();
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{console}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.lines().any(|l| l == "probe: done"), "{console}");
}

/// The jailed child's /proc status fields and namespace links, read while the probe hangs.
struct Jailed {
    status: String,
    namespaces: Vec<(&'static str, Option<PathBuf>)>,
    root_entries: usize,
}

impl Jailed {
    fn field(&self, name: &str) -> Vec<String> {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

fn inspect_hanging_jail(mut cmd: Command, dir: &Path, probe: &Path) -> Jailed {
    let serial = dir.join("serial.log");
    let mut vmm = cmd
        .arg("--kernel")
        .arg(probe)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args([
            "--mem",
            "64",
            "--cmdline",
            "probe.hang=1",
            "--timeout",
            "30",
        ])
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();
    wait_for(&serial, "hanging on purpose");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vmm.id()))
        .unwrap_or_default();
    let child: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let jailed = Jailed {
        status: std::fs::read_to_string(format!("/proc/{child}/status")).unwrap(),
        namespaces: ["user", "net", "mnt", "ipc", "uts", "pid"]
            .into_iter()
            .map(|k| (k, std::fs::read_link(format!("/proc/{child}/ns/{k}")).ok()))
            .collect(),
        root_entries: std::fs::read_dir(format!("/proc/{child}/root"))
            .unwrap()
            .count(),
    };
    let _ = vmm.kill();
    let _ = vmm.wait();
    jailed
}

fn assert_confined_in_a_user_namespace(j: &Jailed) {
    assert_eq!(j.field("Uid:"), vec!["65534"; 4]);
    assert_eq!(j.field("Gid:"), vec!["65534"; 4]);
    assert_eq!(j.field("Groups:"), Vec::<String>::new());
    assert_eq!(j.field("NSpid:").last().map(String::as_str), Some("1"));
    assert_eq!(j.field("Seccomp:"), vec!["2"]);
    assert_eq!(j.field("CapEff:"), vec!["0000000000000000"]);
    assert_eq!(j.field("CapPrm:"), vec!["0000000000000000"]);
    assert_eq!(j.field("CapBnd:"), vec!["0000000000000000"]);
    assert_eq!(j.field("NoNewPrivs:"), vec!["1"]);
    for (kind, link) in &j.namespaces {
        let ours = std::fs::read_link(format!("/proc/self/ns/{kind}")).ok();
        assert!(link.is_some(), "{kind} namespace unreadable");
        assert_ne!(link, &ours, "{kind} namespace");
    }
    assert_eq!(j.root_entries, 0);
}

#[test]
fn unprivileged_jail_is_uid_65534_without_capabilities_in_its_own_namespaces() {
    require_unprivileged_jail!();
    let (dir, probe) = unprivileged_scratch("jail-userns-confined");
    let jailed = inspect_hanging_jail(unprivileged_vmm(&dir), &dir, &probe);
    assert_confined_in_a_user_namespace(&jailed);
}

#[test]
fn root_may_choose_the_user_namespace_jail() {
    require_unprivileged_jail!();
    let dir = common::scratch("jail-userns-root");
    let probe = probe_copy(&dir);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat-vmm"));
    cmd.args(["--jail-userns", "on"]);
    let jailed = inspect_hanging_jail(cmd, &dir, &probe);
    assert_confined_in_a_user_namespace(&jailed);
}

#[test]
fn unprivileged_jail_without_a_user_namespace_is_refused() {
    require_unprivileged_jail!();
    let (dir, probe) = unprivileged_scratch("jail-userns-off");
    let out = unprivileged_vmm(&dir)
        .arg("--kernel")
        .arg(&probe)
        .arg("--jail-dir")
        .arg(dir.join("root"))
        .args(["--jail-userns", "off", "--timeout", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a user namespace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn jailed_vmm_delivers_msi_x_from_a_passthrough_device() {
    require_root_and_kvm!();
    let run = |attempt: &str| {
        let dir = common::scratch(&format!("jail-pci-{attempt}"));
        let serial = dir.join("serial.log");
        let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
            .arg("--kernel")
            .arg(probe_copy(&dir))
            .arg("--jail-dir")
            .arg(dir.join("root"))
            .args([
                "--test-fake-gpu",
                "--cmdline",
                "probe.pci=1",
                "--timeout",
                "60",
            ])
            .arg("--serial-out")
            .arg(&serial)
            .output()
            .unwrap();
        (out, std::fs::read_to_string(&serial).unwrap_or_default())
    };
    let (mut out, mut log) = run("1");
    // KNOWN, open: on real KVM (inside L1) the probe guest sometimes triple-faults right after
    // reading the fake device's MSI-X capability (seen in about 1 of 6 runs, never on kvm_pvm;
    // no exception line, so its IDT handler never ran). Until that is understood, a triple
    // fault gets one more try, said loudly; a second one, or any other failure, fails the test.
    if String::from_utf8_lossy(&out.stderr).contains("triple fault") {
        eprintln!(
            "KNOWN INTERMITTENT: the probe triple-faulted (see the comment above); trying once \
             more:\n{}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out, log) = run("2");
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "probe: pci msix unmasked vector 0x40 irr 1 pba 0",
        "probe: pci msi vector 0x42 irr 1",
    ] {
        assert!(
            log.lines().any(|l| l == want),
            "missing {want:?} in:\n{log}"
        );
    }
}
