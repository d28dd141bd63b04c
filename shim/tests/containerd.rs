//! containerd-shim-moat-v2 under a real containerd: the test's own daemon (root, state and
//! sockets under a temporary directory, never the system's), the runtime registered as
//! `io.containerd.moat.v2`, the project's root image imported from its OCI archive, and `ctr`
//! driving it: run, exec, kill, and the refusals (a second application container in a pod, a
//! profile no trusted key signed, a pool the node does not keep). A pod claimed from a warm
//! pool of VMs (`moat pool`), where KVM is real (inside L1 on our machines). And the kubelet's
//! path: the same daemon with its CRI plugin,
//! the runtime handler `moat`, a loopback-only CNI network, the project's own pause image, driven
//! over the CRI socket by a real gRPC client (Python grpcio on the pinned CRI v1 proto).
//!
//! Runs as root (containerd mounts snapshots); `cargo xtask test` installs containerd and the
//! CNI plugins, makes the CRI client's venv and builds the `moat` binary beside the shim.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

const NAMESPACE: &str = "moat-test";
/// containerd's namespace for everything its CRI plugin does.
const CRI_NAMESPACE: &str = "k8s.io";
/// The images under the names the CRI resolves (`moat-root` is Docker's short form of it).
const CRI_IMAGE: &str = "docker.io/library/moat-root:latest";
const CRI_PAUSE: &str = "docker.io/library/moat-pause:latest";
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
    /// The containerd namespace `ctr` works in.
    namespace: &'static str,
    /// Connections made to the registry mirror the CRI is given: an image pull would make one.
    registry_hits: Arc<AtomicUsize>,
    /// The node's OTLP sink.
    otlp: moat_audit::testing::OtlpReceiver,
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

/// A registry on loopback that only counts who connects: the CRI's only registry (a mirror for
/// every host), so that an image pull, which must never happen here, is seen.
fn start_registry() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (port, hits)
}

/// The containerd configuration: the CRI plugin off (`ctr` tests), or on with the runtime
/// handler `moat` as a node would register it (docs/kubernetes.md), the test's own CNI
/// directories, the project's pause image and the counting registry.
fn containerd_config(d: &Path, cri: bool, registry: u16) -> String {
    let mut config = format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
         [grpc]\n  address = \"{d}/containerd.sock\"\n\
         [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
         [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
        d = d.display()
    );
    if !cri {
        return format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{config}");
    }
    let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#;
    // runc stays the default (the node's other pods); moat is the handler a RuntimeClass names.
    let runc = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]"#;
    let runtimes = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.moat]"#;
    let cni = r#"[plugins."io.containerd.grpc.v1.cri".cni]"#;
    let mirror = r#"[plugins."io.containerd.grpc.v1.cri".registry.mirrors."*"]"#;
    config.push_str(&format!(
        "{cri}\n  sandbox_image = \"{CRI_PAUSE}\"\n  stream_server_address = \"127.0.0.1\"\n\
           stream_server_port = \"0\"\n\
         {runc}\n  runtime_type = \"io.containerd.runc.v2\"\n\
         {runtimes}\n  runtime_type = \"io.containerd.moat.v2\"\n  pod_annotations = [\"moat.dev/*\"]\n\
         {cni}\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{d}/cni\"\n\
         {mirror}\n  endpoint = [\"http://127.0.0.1:{registry}\"]\n",
        d = d.display()
    ));
    config
}

/// The bridge a test's pods' `eth0`s hang on: named after the test's directory (unique, and
/// within a link name's 15 bytes).
fn bridge_name(d: &Path) -> String {
    let tail: String = d
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("moat-{}", &tail[tail.len().saturating_sub(9)..])
}

/// The CNI network for pods' namespaces: loopback, and an `eth0` on an isolated bridge (no
/// address on the host, so no route between the host and the pod; no gateway, no masquerade).
fn cni_config(d: &Path) -> String {
    json!({
        "cniVersion": "0.4.0",
        "name": "moat-isolated",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge_name(d),
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": "10.255.255.0/24",
                "dataDir": d.join("cni-ipam").display().to_string(),
            },
        }],
    })
    .to_string()
}

impl Containerd {
    fn start() -> Containerd {
        Containerd::start_with(false)
    }

    /// containerd with its CRI plugin, the pause and root images imported for it.
    fn start_cri() -> Containerd {
        assert!(
            Path::new("/usr/lib/cni/loopback").is_file(),
            "the CNI loopback plugin is not installed (Debian package containernetworking-plugins); \
             `cargo xtask test` installs it"
        );
        Containerd::start_with(true)
    }

    fn start_with(cri: bool) -> Containerd {
        require("containerd", "containerd");
        require("ctr", "containerd");
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "containerd needs root (it mounts the images' snapshots)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let upstream = start_upstream();
        // The node's OTLP sink.
        let otlp = moat_audit::testing::OtlpReceiver::start(d, &[]);

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
                 state_dir = \"{d}/pods\"\naudit_key = \"{d}/audit.key\"\n\
                 otlp_endpoint = \"{otlp}\"\n\
                 resolve = [\"allowed.test=127.0.0.1\", \"denied.test=127.0.0.1\"]\n",
                moat = moat_binary().display(),
                d = d.display(),
                otlp = otlp.endpoint()
            ),
        )
        .unwrap();
        let (registry, registry_hits) = start_registry();
        std::fs::write(d.join("config.toml"), containerd_config(d, cri, registry)).unwrap();
        // The pod's network namespace, which moat never uses (the agent's network is moat's
        // own): containerd 1.6's CRI insists on an `eth0` with an address in it, so besides
        // loopback a veth on a bridge of the test's own that has no address on the host, no
        // uplink and no route anywhere (docs/kubernetes.md, "The pod's network namespace").
        std::fs::create_dir_all(d.join("cni")).unwrap();
        std::fs::write(d.join("cni/10-moat.conflist"), cni_config(d)).unwrap();
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
            namespace: if cri { CRI_NAMESPACE } else { NAMESPACE },
            registry_hits,
            otlp,
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
        if cri {
            // The pause image, the project's own (packed here, one small file): the CRI makes
            // the sandbox container from it, and the shim never runs it.
            let tree = containerd.dir.path().join("pause-tree");
            std::fs::create_dir_all(&tree).unwrap();
            std::fs::write(
                tree.join("moat-pause"),
                "never run: moat's shim holds the pod\n",
            )
            .unwrap();
            let pause = containerd.dir.path().join("pause.oci.tar");
            moat_image::pack(&tree, &pause, "moat-pause:latest").unwrap();
            let import =
                containerd.ctr_os(&["images".as_ref(), "import".as_ref(), pause.as_os_str()]);
            assert!(import.status.success(), "{}", text(&import));
            for (name, full) in [
                ("moat-root:latest", CRI_IMAGE),
                ("moat-pause:latest", CRI_PAUSE),
            ] {
                let tag = containerd.ctr(&["images", "tag", name, full]);
                assert!(tag.status.success(), "{}", text(&tag));
            }
        }
        containerd
    }

    /// A CRI client on this containerd's socket, once the CRI sees both images.
    fn cri(&self) -> Cri {
        let python = std::env::var_os("MOAT_CRI_PYTHON")
            .map(PathBuf::from)
            .or_else(|| {
                let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-cri/bin/python");
                venv.is_file().then_some(venv)
            })
            .expect("MOAT_CRI_PYTHON names no python with grpcio: `cargo xtask test` sets it");
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cri");
        let stubs = self.dir.path().join("cri-stubs");
        std::fs::create_dir_all(&stubs).unwrap();
        let protoc = Command::new(&python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()))
            .arg("api.proto")
            .output()
            .unwrap();
        assert!(protoc.status.success(), "{}", text(&protoc));
        let mut child = Command::new(&python)
            .arg(proto.join("cri_client.py"))
            .arg(self.dir.path().join("containerd.sock"))
            .arg(&stubs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut cri = Cri { child, stdout };
        // The CRI learns of imported images from containerd's events: wait for both.
        for image in [CRI_IMAGE, CRI_PAUSE] {
            let mut tries = 0;
            while cri.call("ImageStatus", json!({"image": {"image": image}}))["image"].is_null() {
                tries += 1;
                assert!(tries < 300, "the CRI never saw {image}: {}", self.log());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cri
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
            .args(["--namespace", self.namespace])
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

    /// Adds `[pools.NAME]` to the node's configuration (the shim reads it at each call).
    fn add_pool(&self, name: &str, socket: &Path) {
        let mut node = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("node.toml"))
            .unwrap();
        writeln!(node, "[pools.{name}]\nsocket = \"{}\"", socket.display()).unwrap();
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
        // Shims outlive their containerd by design (a restarted containerd finds them again);
        // ours must not outlive the test (one left holding the test run's descriptors was seen).
        kill_shims_of(self.dir.path());
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
        // The CRI's pods' bridge, if there was one.
        let _ = Command::new("ip")
            .args(["link", "delete", &bridge_name(self.dir.path())])
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills every shim process whose containerd address lies under `dir`.
fn kill_shims_of(dir: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let dir = dir.to_string_lossy();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-moat-v2"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == "-address" && w[1].starts_with(&*dir));
        if is_shim && ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The CRI client (shim/tests/cri/cri_client.py): one JSON call a line, one answer a line.
struct Cri {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Cri {
    /// The answer to `method`: `{"response": ..}` or `{"error": {"code", "details"}}`.
    fn try_call(&mut self, method: &str, request: Value) -> Value {
        use std::io::BufRead;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{}", json!({"method": method, "request": request})).unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{method}: {e}: {line:?}"))
    }

    /// The response to `method`, which must succeed.
    fn call(&mut self, method: &str, request: Value) -> Value {
        let answer = self.try_call(method, request);
        match answer.get("response") {
            Some(response) => response.clone(),
            None => panic!("{method} failed: {answer}"),
        }
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
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
    // The node's OTLP sink has every record of the pod's file, the refusal among them.
    let exported = || -> Vec<serde_json::Value> {
        c.otlp
            .received()
            .iter()
            .filter_map(|r| serde_json::from_str(r["body"]["string_value"].as_str()?).ok())
            .collect()
    };
    let mut tries = 0;
    while exported().len() < records.len() && tries < 200 {
        tries += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let exported = exported();
    assert_eq!(exported.len(), records.len(), "{exported:?}");
    assert!(
        exported
            .iter()
            .any(|r| r["dst_endpoint"]["hostname"] == "denied.test"
                && r["src_endpoint"]["uid"] == "moat-test/curl-pod"
                && r["action"] == "Denied"),
        "{exported:?}"
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

/// The kubelet's calls, in its order, over containerd's CRI socket with the runtime handler
/// `moat`: the pod runs as a workspace under its own signed profile, ExecSync runs in it (its
/// output and status come back), the denied host is refused and audited naming the pod, and
/// the pod stops and goes away. No image is ever pulled.
#[test]
fn the_cri_runs_a_pod_as_a_workspace_execs_in_it_and_removes_it() {
    let c = Containerd::start_cri();
    let mut cri = c.cri();
    // The pod's own profile (its rule named apart from the node default's): the records of
    // the allowed host name that rule only if the annotations came through the CRI.
    let own = profile("team", c.upstream).replace("name = \"allowed\"", "name = \"team-a\"");
    let pod_config = json!({
        "metadata": {"name": "agent-pod", "namespace": "team-a", "uid": "0b5e7a1c", "attempt": 0},
        "log_directory": c.dir.path().join("pod-logs").display().to_string(),
        "annotations": {
            "moat.dev/profile": own,
            "moat.dev/profile.minisig": sign(&own, &c.team_key.secret),
        },
        "linux": {},
    });
    let pod = cri.call(
        "RunPodSandbox",
        json!({"config": pod_config, "runtime_handler": "moat"}),
    );
    let pod_id = pod["pod_sandbox_id"].as_str().unwrap().to_owned();
    let created = cri.call(
        "CreateContainer",
        json!({
            "pod_sandbox_id": pod_id,
            "config": {
                "metadata": {"name": "agent"},
                "image": {"image": CRI_IMAGE},
                "command": ["sleep", "600"],
                "log_path": "agent.log",
                "linux": {},
            },
            "sandbox_config": pod_config,
        }),
    );
    let id = created["container_id"].as_str().unwrap().to_owned();
    cri.call("StartContainer", json!({"container_id": id}));
    let status = cri.call("ContainerStatus", json!({"container_id": id}));
    assert_eq!(status["status"]["state"], "CONTAINER_RUNNING", "{status}");

    // ExecSync as `kubectl exec` makes it: in the workspace, through the pod's proxy only.
    let exec = cri.call(
        "ExecSync",
        json!({
            "container_id": id,
            "cmd": ["sh", "-c", format!("pgrep -x sleep >/dev/null || exit 3; {}", curl_script(c.upstream))],
            "timeout": 60,
        }),
    );
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(exec["stdout"].as_str().unwrap_or_default())
        .unwrap();
    assert_eq!(exec["exit_code"], 42, "{exec}\n{}", c.log());
    assert!(
        String::from_utf8_lossy(&stdout).contains("hello from upstream"),
        "{exec}"
    );
    let records = c.audit("team-a_agent-pod.audit.jsonl");
    let denied: Vec<_> = records
        .iter()
        .filter(|r| r["dst_endpoint"]["hostname"] == "denied.test")
        .collect();
    assert!(!denied.is_empty(), "no record of denied.test: {records:?}");
    assert!(
        denied
            .iter()
            .all(|r| r["src_endpoint"]["uid"] == "team-a/agent-pod" && r["action"] == "Denied"),
        "{denied:?}"
    );
    let allowed: Vec<_> = records
        .iter()
        .filter(|r| r["dst_endpoint"]["hostname"] == "allowed.test")
        .collect();
    assert!(
        !allowed.is_empty()
            && allowed
                .iter()
                .all(|r| r["firewall_rule"]["name"] == "team-a" && r["action"] == "Allowed"),
        "{allowed:?}"
    );

    cri.call("StopPodSandbox", json!({"pod_sandbox_id": pod_id}));
    let status = cri.call("ContainerStatus", json!({"container_id": id}));
    assert_eq!(status["status"]["state"], "CONTAINER_EXITED", "{status}");
    cri.call("RemovePodSandbox", json!({"pod_sandbox_id": pod_id}));
    let left = cri.call("ListPodSandbox", json!({}));
    assert!(left["items"].is_null(), "{left}");
    assert_eq!(
        c.registry_hits.load(Ordering::SeqCst),
        0,
        "the CRI tried to pull an image"
    );
}

/// Not a test: `cargo xtask bench k8s` runs it (`--ignored`) for figures, and asserts nothing
/// about time. N pods (MOAT_BENCH_K8S_PODS, default 8) are started at once with `ctr run`, each
/// agent printing a line first thing: the time from its `ctr run` to that line on ctr's stdout
/// (the agent's first instruction ran), pods started per second (N over the time until the last
/// printed), and then, every pod idle, the PSS of each pod's processes (the shim, `moat run`, the
/// proxy, guest-init and the agent: the shim's process tree). Written as JSON to
/// MOAT_BENCH_K8S_OUT.
#[test]
#[ignore = "a benchmark: cargo xtask bench k8s"]
fn bench_k8s_pods_start_and_idle() {
    use std::io::BufRead;
    use std::time::Instant;
    let pods: usize = std::env::var("MOAT_BENCH_K8S_PODS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    let c = Containerd::start();
    let address = c.dir.path().join("containerd.sock");
    let begin = Instant::now();
    let mut runs = Vec::new();
    for i in 0..pods {
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&address)
            .args([
                "--namespace",
                NAMESPACE,
                "run",
                "--runtime",
                "io.containerd.moat.v2",
            ])
            .args([
                IMAGE,
                &format!("bench-{i}"),
                "sh",
                "-c",
                "echo started; exec sleep 600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let started = Instant::now();
        let first = std::thread::spawn(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "started");
            (
                started.elapsed(),
                started.duration_since(begin) + started.elapsed(),
            )
        });
        runs.push((child, first));
    }
    let mut firsts = Vec::new();
    let mut children = Vec::new();
    for (child, first) in runs {
        firsts.push(first.join().unwrap());
        children.push(child);
    }
    let all_started = firsts.iter().map(|f| f.1).max().unwrap();
    let mut to_first: Vec<f64> = firsts.iter().map(|f| f.0.as_secs_f64() * 1000.0).collect();
    to_first.sort_by(f64::total_cmp);
    // Idle: every agent sleeping. The pods' processes: each shim's tree.
    std::thread::sleep(Duration::from_secs(2));
    let pss = pod_trees_pss_kib(c.dir.path());
    let json = json!({
        "pods": pods,
        "backend": "namespace",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "pods_per_second": pods as f64 / all_started.as_secs_f64(),
        "all_started_ms": all_started.as_secs_f64() * 1000.0,
        "run_to_first_output_ms": {
            "min": to_first[0],
            "median": to_first[to_first.len() / 2],
            "max": to_first[to_first.len() - 1],
        },
        "idle_pss_kib_per_pod": pss.iter().sum::<u64>() / (pss.len().max(1) as u64),
        "idle_pss_kib_by_process_per_pod": pod_pss_by_name(c.dir.path(), pods),
        "shims": pss.len(),
    });
    println!("{json}");
    if let Some(out) = std::env::var_os("MOAT_BENCH_K8S_OUT") {
        std::fs::write(out, json.to_string()).unwrap();
    }
    for i in 0..pods {
        let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &format!("bench-{i}")]);
    }
    for mut child in children {
        let _ = child.wait();
    }
}

/// The process tree of each shim of the containerd in `dir` (its command line names the
/// daemon's socket there): (pid, comm) of the shim and its descendants.
fn pod_trees(dir: &Path) -> Vec<Vec<(i32, String)>> {
    let mut parent = HashMap::new();
    let mut comm = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        parent.insert(pid, ppid);
        comm.insert(pid, stat[open + 1..close].to_owned());
    }
    let shims: Vec<i32> = comm
        .iter()
        .filter(|(pid, c)| {
            c.starts_with("containerd-shim")
                && String::from_utf8_lossy(
                    &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
                )
                .contains(&dir.display().to_string())
        })
        .map(|(p, _)| *p)
        .collect();
    shims
        .into_iter()
        .map(|shim| {
            comm.iter()
                .filter(|(pid, _)| {
                    let mut p = **pid;
                    loop {
                        if p == shim {
                            return true;
                        }
                        match parent.get(&p) {
                            Some(&pp) if pp > 1 => p = pp,
                            _ => return false,
                        }
                    }
                })
                .map(|(p, c)| (*p, c.clone()))
                .collect()
        })
        .collect()
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The PSS of each shim's tree, in KiB.
fn pod_trees_pss_kib(dir: &Path) -> Vec<u64> {
    pod_trees(dir)
        .iter()
        .map(|tree| tree.iter().map(|(pid, _)| pss_kib(*pid)).sum())
        .collect()
}

/// The pods' PSS by process name, averaged over `pods`, in KiB.
fn pod_pss_by_name(dir: &Path, pods: usize) -> Value {
    let mut by: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for tree in pod_trees(dir) {
        for (pid, name) in tree {
            *by.entry(name).or_default() += pss_kib(pid);
        }
    }
    json!(
        by.into_iter()
            .map(|(k, v)| (k, v / pods.max(1) as u64))
            .collect::<std::collections::BTreeMap<_, _>>()
    )
}

#[test]
fn a_pod_naming_a_pool_the_node_does_not_keep_is_refused_at_create_naming_the_nodes_pools() {
    let c = Containerd::start();
    c.add_pool("python", &c.dir.path().join("python.sock"));
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.moat.v2",
        "--annotation",
        "moat.dev/pool=ruby",
        IMAGE,
        "ruby-pod",
        "true",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pod moat-test/ruby-pod asks for the pool \"ruby\"")
            && err.contains("the node's pools: python"),
        "{}",
        text(&out)
    );
}

/// Why a pool's VMs cannot run here, if they cannot: hardware KVM (on kvm_pvm a guest's user
/// space cannot run: `cargo xtask test` runs this inside L1), moat-vmm beside moat, and the VM
/// images `cargo xtask images` built (found beside the target directory, as `moat run` finds
/// them).
fn pool_unavailable() -> Option<String> {
    if !moat_host_probe::kvm_flavour().is_hardware() || !moat_host_probe::kvm_usable() {
        return Some(format!(
            "/dev/kvm cannot run a guest's user space here ({:?})",
            moat_host_probe::kvm_flavour()
        ));
    }
    if !moat_binary().with_file_name("moat-vmm").is_file() {
        return Some("moat-vmm is not built beside moat (cargo build -p moat-vmm)".into());
    }
    let images = std::env::var_os("MOAT_IMAGES").map_or_else(
        || {
            shim_binary()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("moat-images")
        },
        PathBuf::from,
    );
    if !images.join("current.toml").is_file() {
        return Some(format!(
            "no VM images in {} (cargo xtask images)",
            images.display()
        ));
    }
    None
}

/// The node's `moat pool`, stopped on drop.
struct Pool(Child);

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// A pod annotated `moat.dev/pool` is a VM claimed from the node's pool: its command runs in a
/// restored VM (generation not 0), reaches the allowed host through the pod's own proxy and is
/// refused the denied one, audited naming the pod; an exec into it is refused; a second pod
/// claims the VM the pool made ready after the first claim.
#[test]
fn pooled_pod_runs_in_a_vm_claimed_from_the_nodes_pool_through_its_own_proxy() {
    const NAME: &str = "pooled_pod_runs_in_a_vm_claimed_from_the_nodes_pool_through_its_own_proxy";
    if let Some(why) = pool_unavailable() {
        assert!(
            std::env::var_os("MOAT_EXPECT_REAL_KVM").is_none(),
            "{NAME}: this run expects real KVM and the images, but: {why}"
        );
        eprintln!("SKIPPED {NAME}: {why}");
        return;
    }
    let c = Containerd::start();
    let d = c.dir.path();
    // The template: a VM snapshotted while guest-init stands by, before any workspace exists.
    let template = d.join("template");
    let made = Command::new(moat_binary())
        .args(["run", "--backend", "vm", "--mem", "512", "--snapshot-to"])
        .arg(&template)
        .arg("--profile")
        .arg(d.join("default.toml"))
        .arg("--pubkey")
        .arg(d.join("node.pub"))
        .arg("--audit")
        .arg(d.join("template.audit.jsonl"))
        .arg("--audit-key")
        .arg(d.join("audit.key"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    // The node's pool of one, as the node would run it.
    let socket = d.join("python.sock");
    let pool_log = std::fs::File::create(d.join("pool.log")).unwrap();
    let _pool = Pool(
        Command::new(moat_binary())
            .args(["pool", "--size", "1", "--template"])
            .arg(&template)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(pool_log.try_clone().unwrap())
            .stderr(pool_log)
            .spawn()
            .unwrap(),
    );
    let pool_log = || std::fs::read_to_string(d.join("pool.log")).unwrap_or_default();
    let mut tries = 0;
    while !socket.exists() {
        tries += 1;
        assert!(
            tries < 3000,
            "the pool never served {}: {}",
            socket.display(),
            pool_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.add_pool("python", &socket);
    let pooled = |detached: bool, id: &str, args: &[&str]| {
        let mut argv = vec!["run"];
        argv.extend(if detached {
            ["-d", "--null-io"].as_slice()
        } else {
            ["--rm"].as_slice()
        });
        argv.extend([
            "--runtime",
            "io.containerd.moat.v2",
            "--annotation",
            "moat.dev/pool=python",
            IMAGE,
            id,
        ]);
        argv.extend(args);
        c.ctr(&argv)
    };

    // The first claim: a pod that stays, and an exec into it, refused.
    let held = pooled(true, "held", &["sleep", "600"]);
    assert!(held.status.success(), "{}\n{}", text(&held), c.log());
    let exec = c.ctr(&["task", "exec", "--exec-id", "probe", "held", "true"]);
    assert!(!exec.status.success(), "{}", text(&exec));
    assert!(
        String::from_utf8_lossy(&exec.stderr).contains("cannot exec into a VM"),
        "{}",
        text(&exec)
    );
    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", "held"]);
    assert!(kill.status.success(), "{}", text(&kill));
    c.wait_stopped("held");

    // The second claim waits for the VM the pool restores after the first.
    let script = format!(
        "g=$(cat /run/moat/generation) && [ \"$g\" != 0 ] || exit 3; echo generation=$g; {}",
        curl_script(c.upstream)
    );
    let out = pooled(false, "pooled", &["sh", "-c", &script]);
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}\n{}\npool: {}",
        text(&out),
        c.log(),
        pool_log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("generation=") && stdout.contains("hello from upstream"),
        "{}",
        text(&out)
    );
    let records = c.audit("moat-test_pooled.audit.jsonl");
    let denied: Vec<_> = records
        .iter()
        .filter(|r| r["dst_endpoint"]["hostname"] == "denied.test")
        .collect();
    assert!(!denied.is_empty(), "no record of denied.test: {records:?}");
    assert!(
        denied
            .iter()
            .all(|r| r["src_endpoint"]["uid"] == "moat-test/pooled" && r["action"] == "Denied"),
        "{denied:?}"
    );
}
