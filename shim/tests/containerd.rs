//! containerd-shim-moat-v2 under a real containerd: the test's own daemon (root, state and
//! sockets under a temporary directory, never the system's), the runtime registered as
//! `io.containerd.moat.v2`, the project's root image imported from its OCI archive, and `ctr`
//! driving it: run, exec, kill, and the refusals (a second application container in a pod, a
//! profile no trusted key signed).
//!
//! Runs as root (containerd mounts snapshots); `cargo xtask test` installs containerd and
//! builds the `moat` binary beside the shim.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const NAMESPACE: &str = "moat-test";
/// As `cargo xtask images oci` names it (`ctr images import` keeps the name).
const IMAGE: &str = "moat-root:latest";

/// A plain HTTP upstream on loopback answering every request with `hello from upstream`.
fn start_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let body = b"hello from upstream\n";
                let _ = tcp.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = tcp.write_all(body);
            });
        }
    });
    port
}

/// The test's own containerd, stopped (and its state removed) on drop.
struct Containerd {
    dir: tempfile::TempDir,
    daemon: Child,
    upstream: u16,
    /// The key the node trusts for pods' own profiles.
    team_key: moat_policy::signing::GeneratedKey,
}

fn shim_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-moat-v2"))
}

fn moat_binary() -> PathBuf {
    let moat = shim_binary().with_file_name("moat");
    assert!(
        moat.is_file(),
        "{} is missing: build it with `cargo build -p moat` (`cargo xtask test` builds it)",
        moat.display()
    );
    moat
}

fn require(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|d| d.join(program).is_file()),
        "{program} is not installed (Debian package {package}); `cargo xtask test` installs it"
    );
}

fn sign(text: &str, key: &str) -> String {
    moat_policy::signing::sign(text.as_bytes(), key, "").unwrap()
}

fn profile(name: &str, port: u16) -> String {
    format!(
        "version = 1\nname = \"{name}\"\n\n[[rules]]\nname = \"allowed\"\n\
         hosts = [\"allowed.test\"]\nports = [{port}]\naction = \"passthrough\"\n\
         # The test upstream is on loopback: named explicitly.\ncidrs = [\"127.0.0.0/8\"]\n"
    )
}

impl Containerd {
    fn start() -> Containerd {
        require("containerd", "containerd");
        require("ctr", "containerd");
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "containerd needs root (it mounts the images' snapshots)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let upstream = start_upstream();

        // The node: its default profile and key, a key it trusts for pods' own profiles.
        let node_key = moat_policy::signing::generate("").unwrap();
        let team_key = moat_policy::signing::generate("").unwrap();
        let default = profile("node-default", upstream);
        std::fs::write(d.join("default.toml"), &default).unwrap();
        std::fs::write(
            d.join("default.toml.minisig"),
            sign(&default, &node_key.secret),
        )
        .unwrap();
        std::fs::write(d.join("node.pub"), &node_key.public).unwrap();
        std::fs::write(d.join("team.pub"), &team_key.public).unwrap();
        std::fs::write(
            d.join("node.toml"),
            format!(
                "moat = \"{moat}\"\nbackend = \"namespace\"\n\
                 default_profile = \"{d}/default.toml\"\ndefault_pubkey = \"{d}/node.pub\"\n\
                 trusted_keys = [\"{d}/team.pub\"]\naudit_dir = \"{d}/audit\"\n\
                 state_dir = \"{d}/pods\"\n\
                 resolve = [\"allowed.test=127.0.0.1\", \"denied.test=127.0.0.1\"]\n",
                moat = moat_binary().display(),
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                d = d.display()
            ),
        )
        .unwrap();
        // containerd finds `containerd-shim-moat-v2` on its PATH; the shim reads the node's
        // configuration from MOAT_NODE_CONFIG.
        let path = format!(
            "{}:{}",
            shim_binary().parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("MOAT_NODE_CONFIG", d.join("node.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let containerd = Containerd {
            dir,
            daemon,
            upstream,
            team_key,
        };
        // Ready once it answers (containerd has no readiness notice of its own here).
        let mut tries = 0;
        while !containerd.ctr(&["version"]).status.success() {
            tries += 1;
            assert!(
                tries < 300,
                "containerd did not come up: {}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let archive = std::env::var_os("MOAT_OCI_IMAGE")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .expect("MOAT_OCI_IMAGE names no OCI archive: `cargo xtask test` builds and sets it");
        let import =
            containerd.ctr_os(&["images".as_ref(), "import".as_ref(), archive.as_os_str()]);
        assert!(import.status.success(), "{}", text(&import));
        containerd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        self.ctr_os(&args)
    }

    fn ctr_os(&self, args: &[&std::ffi::OsStr]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The audit records of the workspace named `name`'s file.
    fn audit(&self, file: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit").join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the task `id` is stopped (bounded).
    fn wait_stopped(&self, id: &str) {
        for _ in 0..600 {
            let ls = text(&self.ctr(&["tasks", "ls"]));
            if ls
                .lines()
                .any(|l| l.starts_with(id) && l.contains("STOPPED"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("task {id} never stopped: {}", self.log());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.daemon.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
        // Snapshots mounted under the root must go before the directory can.
        let root = self.dir.path().join("root");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for line in mounts.lines().rev() {
            if let Some(target) = line.split_whitespace().nth(1)
                && Path::new(target).starts_with(self.dir.path())
            {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = root;
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `sh` script a pod runs: fetch the allowed host, be refused the denied one (the proxy
/// answers a refused HTTP request with a 403, so `-f`), exit 42.
fn curl_script(port: u16) -> String {
    format!(
        "curl -sSf -m 20 http://allowed.test:{port}/hello || exit 1; \
         if curl -sSf -m 20 -o /dev/null http://denied.test:{port}/hello; then exit 2; fi; \
         exit 42"
    )
}

#[test]
fn ctr_run_reaches_the_allowed_host_only_through_the_pods_proxy_and_exits_with_its_status() {
    let c = Containerd::start();
    let script = curl_script(c.upstream);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.moat.v2",
        IMAGE,
        "curl-pod",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(out.status.code(), Some(42), "{}\n{}", text(&out), c.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from upstream"),
        "{}",
        text(&out)
    );
    // The refusal is audited, naming the pod (the workspace is `<namespace>/<id>`).
    let records = c.audit("moat-test_curl-pod.audit.jsonl");
    let denied: Vec<_> = records
        .iter()
        .filter(|r| r["dst_endpoint"]["hostname"] == "denied.test")
        .collect();
    assert!(!denied.is_empty(), "no record of denied.test: {records:?}");
    assert!(
        denied
            .iter()
            .all(|r| r["src_endpoint"]["uid"] == "moat-test/curl-pod" && r["action"] == "Denied"),
        "{denied:?}"
    );
}

#[test]
fn ctr_task_exec_runs_in_the_workspace_and_ctr_task_kill_stops_it() {
    let c = Containerd::start();
    let run = c.ctr(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        "io.containerd.moat.v2",
        IMAGE,
        "sleeper",
        "sleep",
        "600",
    ]);
    assert!(run.status.success(), "{}\n{}", text(&run), c.log());
    // The exec sees the agent (same PID namespace), is confined (read-only root), and
    // reaches the network only through the pod's proxy.
    let script = format!(
        "pgrep -x sleep >/dev/null || exit 3; touch /etc/moat-exec 2>/dev/null && exit 4; \
         {}",
        curl_script(c.upstream)
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        "sleeper",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(exec.status.code(), Some(42), "{}\n{}", text(&exec), c.log());
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("hello from upstream"),
        "{}",
        text(&exec)
    );
    let kill = c.ctr(&["task", "kill", "sleeper"]);
    assert!(kill.status.success(), "{}", text(&kill));
    c.wait_stopped("sleeper");
    // SIGTERM reached the agent: the status is the shell's 128 + 15 (ctr warns with it).
    let delete = c.ctr(&["task", "delete", "sleeper"]);
    assert!(delete.status.success(), "{}", text(&delete));
    assert!(
        String::from_utf8_lossy(&delete.stderr).contains("exit code 143"),
        "{}",
        text(&delete)
    );
}

#[test]
fn a_pods_second_application_container_is_refused_naming_the_first() {
    let c = Containerd::start();
    let pod = |id: &str| {
        c.ctr(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            "io.containerd.moat.v2",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod-one",
            "--annotation",
            "io.kubernetes.cri.sandbox-namespace=default",
            "--annotation",
            "io.kubernetes.cri.sandbox-name=pod-one",
            IMAGE,
            id,
            "sleep",
            "600",
        ])
    };
    let first = pod("first");
    assert!(first.status.success(), "{}\n{}", text(&first), c.log());
    let second = pod("second");
    assert!(!second.status.success(), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("one application container per pod") && err.contains("first"),
        "{}",
        text(&second)
    );
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", "first"]);
    c.wait_stopped("first");
}

#[test]
fn a_pod_profile_signed_by_an_untrusted_key_is_refused_and_a_trusted_one_is_used() {
    let c = Containerd::start();
    let own = profile("team", c.upstream);
    let stranger = moat_policy::signing::generate("").unwrap();
    let run = |id: &str, sig: &str| {
        c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.moat.v2",
            "--annotation",
            &format!("moat.dev/profile={own}"),
            "--annotation",
            &format!("moat.dev/profile.minisig={sig}"),
            IMAGE,
            id,
            "sh",
            "-c",
            "exit 5",
        ])
    };
    let refused = run("stranger", &sign(&own, &stranger.secret));
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not signed by a key this node trusts"),
        "{}",
        text(&refused)
    );
    let trusted = run("team", &sign(&own, &c.team_key.secret));
    assert_eq!(
        trusted.status.code(),
        Some(5),
        "{}\n{}",
        text(&trusted),
        c.log()
    );
}
