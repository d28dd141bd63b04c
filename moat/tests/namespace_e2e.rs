//! End to end through the namespace backend with real programs: `moat run --backend
//! namespace -- <command>` runs curl, git and a shell inside the workspace; their traffic goes
//! through the virtual DNS, the TUN device, the netstack, the flow header and the egress proxy
//! to a TLS server on the host's loopback (rcgen test CA). Needs unprivileged user namespaces
//! and /dev/net/tun (both present on our CI machines), curl, git and python3.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A static HTTPS file server on 127.0.0.1 for `allowed.test` and `denied.test`, serving
/// `/hello` and the files under `root` (a dumb-HTTP git repository, for instance).
struct Upstream {
    port: u16,
    ca_pem: String,
}

fn start_upstream(root: PathBuf) -> Upstream {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // OpenSSL (curl, git) needs distinct names to tell the CA from the leaf.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "moat e2e CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec![
        "allowed.test".into(),
        "denied.test".into(),
        "api.test".into(),
    ])
    .unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "allowed.test");
    let leaf = leaf_params.signed_by(&key, &ca).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let (config, root) = (Arc::clone(&config), root.clone());
            std::thread::spawn(move || serve(tcp, config, &root));
        }
    });
    Upstream {
        port,
        ca_pem: ca.pem(),
    }
}

fn serve(mut tcp: std::net::TcpStream, config: Arc<rustls::ServerConfig>, root: &Path) {
    let Ok(mut conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        while !head.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        head.clear();
        let target = text.split_whitespace().nth(1).unwrap_or("/");
        // Dumb HTTP: `info/refs?service=...` is answered with the plain file.
        let path = target.split('?').next().unwrap_or("/").to_owned();
        // Whether the real secret arrived (never echoed back).
        let want = format!("\r\nauthorization: Bearer {E2E_SECRET}\r\n");
        let ok = text
            .to_ascii_lowercase()
            .contains(&want.to_ascii_lowercase());
        let body = if path == "/hello" {
            Some(b"hello from upstream\n".to_vec())
        } else if path.starts_with("/private/") && !ok {
            // Files under /private/ are served only to the real secret.
            None
        } else if path == "/auth" {
            Some(if ok {
                b"auth: ok\n".to_vec()
            } else {
                b"auth: wrong\n".to_vec()
            })
        } else {
            let rel = path.trim_start_matches('/');
            (!rel.contains(".."))
                .then(|| std::fs::read(root.join(rel)).ok())
                .flatten()
        };
        let resp = match body {
            Some(b) => [
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len()).into_bytes(),
                b,
            ]
            .concat(),
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        if tls.write_all(&resp).is_err() {
            return;
        }
    }
}

/// The secret the egress proxy injects for `api.test`, read from a file on the host.
const E2E_SECRET: &str = "sk-e2e-REAL-7d3e";
/// What the agent is given instead.
const E2E_PLACEHOLDER: &str = "sk-moat-placeholder-e2e";

/// A workspace setup: signed policy, agent home with the CA, audit log.
struct Workspace {
    dir: tempfile::TempDir,
    upstream: Upstream,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let repo_root = dir.path().join("srv");
        std::fs::create_dir_all(&repo_root).unwrap();
        let upstream = start_upstream(repo_root);
        let key = moat_policy::signing::generate("").unwrap();
        std::fs::write(dir.path().join("policy.pub"), &key.public).unwrap();
        let profile = format!(
            "version = 1\nname = \"e2e\"\n\n[[rules]]\nname = \"allowed\"\nhosts = [\"allowed.test\"]\n\
             ports = [{}]\naction = \"passthrough\"\n# The test upstream is on loopback: named explicitly.\n\
             cidrs = [\"127.0.0.0/8\"]\n\n\
             [[rules]]\nname = \"api\"\nhosts = [\"api.test\"]\nports = [{port}]\naction = \"intercept\"\n\
             cidrs = [\"127.0.0.0/8\"]\n\n\
             [[secrets]]\nname = \"api\"\nsource = {{ file = \"{secret}\" }}\n\
             placeholder = \"{E2E_PLACEHOLDER}\"\nhosts = [\"api.test\"]\nports = [{port}]\n\
             presentation = \"authorization_bearer\"\n",
            upstream.port,
            port = upstream.port,
            secret = dir.path().join("secret").display(),
        );
        std::fs::write(dir.path().join("secret"), format!("{E2E_SECRET}\n")).unwrap();
        let sig = moat_policy::signing::sign(profile.as_bytes(), &key.secret, "").unwrap();
        std::fs::write(dir.path().join("policy.toml"), &profile).unwrap();
        std::fs::write(dir.path().join("policy.toml.minisig"), sig).unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &upstream.ca_pem).unwrap();
        Workspace { dir, upstream }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn reasons(&self) -> Vec<String> {
        self.audit()
            .iter()
            .filter_map(|r| r["unmapped"]["moat"]["reason"].as_str().map(str::to_owned))
            .collect()
    }

    /// Runs `script` with sh inside the workspace.
    fn run(&self, script: &str) -> Output {
        self.command(script).output().unwrap()
    }

    /// The `moat run` command for `script`.
    fn command(&self, script: &str) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
        cmd.args(["run", "--backend", "namespace"])
            .arg("--profile")
            .arg(d.join("policy.toml"))
            .arg("--pubkey")
            .arg(d.join("policy.pub"))
            .arg("--audit")
            .arg(d.join("audit.jsonl"))
            .arg("--home")
            .arg(self.home())
            .arg("--ca")
            .arg(self.dir.path().join("ca.pem"))
            .arg("--upstream-ca")
            .arg(self.dir.path().join("ca.pem"))
            .args([
                "--resolve",
                "api.test=127.0.0.1",
                "--resolve",
                "allowed.test=127.0.0.1",
                "--resolve",
                "denied.test=127.0.0.1",
            ])
            .args(["--", "sh", "-c", script])
            .env("MOAT_LOG", "warn");
        cmd
    }

    /// Makes a one-commit repository holding `file` and serves it from the upstream at
    /// `/<rel>` over dumb HTTP (a bare clone with `update-server-info`).
    fn serve_repo(&self, rel: &str, file: &str, content: &str) {
        let git = |args: &[&str], dir: &Path| {
            let st = Command::new("git")
                .args(args)
                .current_dir(dir)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@t")
                .status()
                .unwrap();
            assert!(st.success(), "git {args:?}");
        };
        let src = self.dir.path().join("src").join(rel);
        std::fs::create_dir_all(&src).unwrap();
        git(&["init", "-q", "-b", "main"], &src);
        std::fs::write(src.join(file), content).unwrap();
        git(&["add", file], &src);
        git(&["commit", "-q", "-m", "init"], &src);
        let bare = self.dir.path().join("srv").join(rel);
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        let (src, bare_s) = (src.to_str().unwrap(), bare.to_str().unwrap());
        git(&["clone", "-q", "--bare", src, bare_s], self.dir.path());
        git(&["update-server-info"], &bare);
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.upstream.port)
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn curl_reaches_an_allowed_host_through_the_whole_path() {
    let ws = Workspace::new();
    let out = ws.run(&format!("curl -sS {}", ws.url("allowed.test", "/hello")));
    assert_eq!(
        text(&out.stdout),
        "hello from upstream\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(out.status.success());
    let open = ws
        .audit()
        .into_iter()
        .find(|r| r["class_uid"] == 4001 && r["activity_id"] == 1)
        .unwrap();
    assert_eq!(open["dst_endpoint"]["hostname"], "allowed.test");
    assert_eq!(open["firewall_rule"]["name"], "allowed");
}

#[test]
fn curl_with_the_placeholder_gets_the_secret_injected_through_the_whole_path() {
    let ws = Workspace::new();
    let out = ws.run(&format!(
        "curl -sS -H 'Authorization: Bearer {E2E_PLACEHOLDER}' {}",
        ws.url("api.test", "/auth")
    ));
    assert_eq!(
        text(&out.stdout),
        "auth: ok\n",
        "stderr: {}",
        text(&out.stderr)
    );
    let log = std::fs::read_to_string(ws.dir.path().join("audit.jsonl")).unwrap();
    assert!(log.contains("\"class_uid\":4002"));
    assert!(!log.contains(E2E_SECRET));
}

#[test]
fn python_requests_gets_the_secret_injected_through_the_whole_path() {
    let ws = Workspace::new();
    let out = ws.run(&format!(
        "python3 -c \"import requests; \
         r = requests.get('{}', headers={{'Authorization': 'Bearer {E2E_PLACEHOLDER}'}}); \
         print(r.text, end='')\"",
        ws.url("api.test", "/auth")
    ));
    assert_eq!(
        text(&out.stdout),
        "auth: ok\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn git_clones_a_private_repository_with_the_injected_credential() {
    let ws = Workspace::new();
    ws.serve_repo(
        "private/repo.git",
        "SECRET-PROJECT",
        "private, cloned with an injected credential\n",
    );

    // The upstream serves /private/ only to the real secret, which git never holds: through
    // allowed.test (passthrough, no secret bound) the clone fails; through api.test it works
    // because the proxy presents the secret bound to api.test.
    let control = ws.run(&format!(
        "git clone -q {} control 2>/dev/null; echo status=$?",
        ws.url("allowed.test", "/private/repo.git")
    ));
    assert!(
        !text(&control.stdout).contains("status=0"),
        "{}",
        text(&control.stdout)
    );
    let out = ws.run(&format!(
        "git clone -q {} repo && cat repo/SECRET-PROJECT",
        ws.url("api.test", "/private/repo.git")
    ));
    assert_eq!(
        text(&out.stdout),
        "private, cloned with an injected credential\n",
        "stderr: {}",
        text(&out.stderr)
    );
    let log = std::fs::read_to_string(ws.dir.path().join("audit.jsonl")).unwrap();
    assert!(!log.contains(E2E_SECRET));
}

#[test]
fn python_urllib_gets_the_secret_injected_through_the_whole_path() {
    let ws = Workspace::new();
    let out = ws.run(&format!(
        "python3 -c \"import urllib.request as u; \
         r = u.Request('{}', headers={{'Authorization': 'Bearer {E2E_PLACEHOLDER}'}}); \
         print(u.urlopen(r).read().decode(), end='')\"",
        ws.url("api.test", "/auth")
    ));
    assert_eq!(
        text(&out.stdout),
        "auth: ok\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn denied_host_fails_with_an_error_the_agent_can_read() {
    let ws = Workspace::new();
    let out = ws.run(&format!("curl -sS {}", ws.url("denied.test", "/hello")));
    assert!(!out.status.success());
    // The refusal is a TCP reset; depending on when curl looks, it reports it as a reset or
    // as a failed connect (curl exit 56/35 or 7), never as a timeout or an empty reply.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("reset") || stderr.contains("Couldn't connect"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        ws.reasons().contains(&"no_rule".to_owned()),
        "audit: {:?}",
        ws.reasons()
    );
}

#[test]
fn ip_literal_fails() {
    let ws = Workspace::new();
    // (127.0.0.1 would be the workspace's own loopback; any other literal goes to the host.)
    let out = ws.run("curl -sS -k https://192.0.2.10/hello");
    assert!(!out.status.success());
    assert!(ws.reasons().contains(&"ip_literal".to_owned()));
}

#[test]
fn names_resolve_to_the_virtual_pool_and_no_dns_query_leaves() {
    let ws = Workspace::new();
    // A lookup answers from the fake pool (198.18.0.0/15); a datagram to a real resolver is
    // dropped by the netstack, so the query times out.
    let out = ws.run(
        "getent hosts anything.example && python3 -c \"import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b'q', ('8.8.8.8', 53)); s.recv(64)\"",
    );
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("198.18."), "stdout: {stdout}");
    assert!(
        text(&out.stderr).contains("timed out"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(!out.status.success());
}

#[test]
fn dns_over_tcp_is_answered_by_the_virtual_dns() {
    let ws = Workspace::new();
    let script = r#"python3 - <<'EOF'
import socket, struct
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in "tcp.example".split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.create_connection(("10.200.0.1", 53), timeout=5)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
assert r[:2] == b"\x12\x34", r
print(".".join(str(b) for b in r[-4:]))
EOF"#;
    let out = ws.run(script);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("198.18."),
        "stdout: {stdout} stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn git_clones_over_https_through_the_proxy() {
    let ws = Workspace::new();
    ws.serve_repo("repo.git", "README", "cloned through moat\n");

    let out = ws.run(&format!(
        "git clone -q {} repo && cat repo/README",
        ws.url("allowed.test", "/repo.git")
    ));
    assert_eq!(
        text(&out.stdout),
        "cloned through moat\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(ws.home().join("repo/README").exists());
}

#[test]
fn only_home_and_tmp_are_writable() {
    let ws = Workspace::new();
    let out = ws.run("touch /etc/moat-e2e; echo etc=$?; touch /usr/moat-e2e; echo usr=$?; touch /tmp/x; echo tmp=$?; touch ~/made-inside; echo home=$?");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("etc=1") && stdout.contains("usr=1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tmp=0") && stdout.contains("home=0"),
        "{stdout}"
    );
    assert!(ws.home().join("made-inside").exists());
    assert!(!Path::new("/etc/moat-e2e").exists());
}

#[test]
fn tls_clients_are_pointed_at_the_workspace_trust_store() {
    let ws = Workspace::new();
    let out = ws.run("echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $GIT_SSL_CAINFO; grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE");
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        ["/etc/ssl/certs/ca-certificates.crt"; 4].join(" ")
    );
    let host_count = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count();
    // The host's roots, the egress proxy's workspace CA, and the --ca given.
    assert_eq!(
        lines.next().unwrap().parse::<usize>().unwrap(),
        host_count + 2
    );
}

#[test]
fn audit_shows_the_flows_and_the_agent_process_and_validates_as_ocsf() {
    let ws = Workspace::new();
    let out = ws.run(&format!(
        "curl -sS {} ; curl -sS {} ; exit 3",
        ws.url("allowed.test", "/hello"),
        ws.url("denied.test", "/hello")
    ));
    assert_eq!(out.status.code(), Some(3));
    let records = ws.audit();
    let class = |uid: u64, activity: u64| {
        records
            .iter()
            .filter(|r| r["class_uid"] == uid && r["activity_id"] == activity)
            .count()
    };
    assert_eq!(class(1007, 1), 1, "one launch: {records:?}");
    assert_eq!(class(1007, 2), 1, "one terminate");
    let exit = records
        .iter()
        .find(|r| r["class_uid"] == 1007 && r["activity_id"] == 2)
        .unwrap();
    assert_eq!(exit["exit_code"], 3);
    assert_eq!(class(4001, 1), 1, "one flow opened");
    assert_eq!(class(4001, 5), 1, "one flow refused");

    let python = std::env::var("MOAT_OCSF_PYTHON").map_or_else(
        |_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../.venv-ocsf/bin/python"
            ))
        },
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "OCSF validator missing: run `cargo xtask test`"
    );
    let v = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../egress/tests/ocsf/validate.py"
        ))
        .arg(ws.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v.stdout));
    assert!(text(&v.stdout).contains(&format!("{} valid, 0 invalid", records.len())));
}

#[test]
fn the_agent_runs_confined_and_raw_sockets_and_ptrace_fail() {
    let ws = Workspace::new();
    let out = ws.run(concat!(
        "grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; ",
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)' 2>/dev/null; echo raw=$?; ",
        "python3 -c 'import ctypes,sys; c=ctypes.CDLL(None, use_errno=True); r=c.ptrace(0,0,0,0); sys.exit(ctypes.get_errno() if r<0 else 0)'; echo ptrace=$?",
    ));
    let stdout = text(&out.stdout);
    for want in [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "CapEff:\t0000000000000000",
        "raw=1",
        "ptrace=1",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn sigterm_reaches_the_agent_for_an_orderly_shutdown() {
    use std::io::BufRead;
    let ws = Workspace::new();
    let mut child = ws
        .command("trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.1; done")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = i32::try_from(child.id()).unwrap();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(42));
}

#[test]
fn host_secrets_are_not_visible_inside() {
    let ws = Workspace::new();
    let out = ws.run(
        "ls -A /root | wc -l; wc -c < /etc/shadow; cat /etc/ssh/ssh_host_*_key 2>/dev/null | wc -c",
    );
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(lines, ["0", "0", "0"], "stderr: {}", text(&out.stderr));
}

#[test]
fn exit_status_of_the_command_is_the_workspaces() {
    let ws = Workspace::new();
    let out = ws.run("exit 7");
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out.stderr).contains("backend namespace"));
}

#[test]
fn the_workspace_sees_only_its_own_processes_and_leaves_none_behind() {
    let ws = Workspace::new();
    let out = ws.run("sleep 300 & ps -e -o pid= | wc -l");
    // init, sh, sleep, ps, wc: nothing of the host's.
    let n: usize = text(&out.stdout).trim().parse().unwrap();
    assert!(n <= 6, "{n} processes visible");
    let leftover = Command::new("pgrep")
        .args(["-f", &ws.home().to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "left behind: {}",
        text(&leftover.stdout)
    );
}
