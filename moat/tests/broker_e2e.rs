//! End to end through the trusted access broker with real components: a real OpenID Connect
//! provider (panva/oidc-provider under Node, `broker/tests/oidc`), the broker (in process, on
//! loopback), a real namespace-backend workspace (`moat run --backend namespace --tunnel DIR`,
//! which keeps the workspace's tunnel to the broker up and answers the broker's `CONNECT 22`
//! with a confined `sshd -i` inside the workspace), and the real `ssh` client with `moat ssh`
//! as its ProxyCommand and a broker-signed certificate.
//!
//! Nothing is emulated between a person and the workspace's shell.
//!
//! Needs: node with `npm ci` run in broker/tests/oidc, /usr/sbin/sshd (openssh-server), ssh and
//! ssh-keygen, and root with /dev/net/tun (the namespace backend). `cargo xtask test` installs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use moat_broker::audit::Audit;
use moat_broker::config::{Config, WorkspaceName};
use moat_broker::session::Target as RevokeTarget;
use moat_broker::state::Broker;
use moat_broker_client::https::{Client, Target, roots_from_pem};
use tokio_util::sync::CancellationToken;

const OIDC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../broker/tests/oidc");
const MOAT: &str = env!("CARGO_BIN_EXE_moat");
const CLIENT_ID: &str = "moat-broker";
/// The broker's `entitlement_check_secs` in these tests: sessions are re-checked at the provider
/// every 2 s (the check starts half the interval before the confirmation runs out).
const ENTITLEMENT_CHECK_SECS: u64 = 4;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn whoami() -> String {
    text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_owned()
}

/// A test CA and a leaf for 127.0.0.1, as PEM: (ca, cert, key).
fn loopback_tls() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "moat broker e2e IdP CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "idp");
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// The identity provider, a child process; exits when its stdin closes (on drop).
struct Idp {
    child: Child,
    issuer: String,
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_idp(dir: &Path, redirect_uri: &str, groups: &str) -> Idp {
    common::require_programs(&[("node", "nodejs")]);
    assert!(
        Path::new(OIDC_DIR)
            .join("node_modules/oidc-provider")
            .exists(),
        "the test identity provider is not installed: run `cargo xtask test` (it runs \
         `npm ci` in broker/tests/oidc)"
    );
    let (ca, cert, key) = loopback_tls();
    std::fs::write(dir.join("idp-ca.pem"), ca).unwrap();
    std::fs::write(dir.join("idp.crt"), cert).unwrap();
    std::fs::write(dir.join("idp.key"), key).unwrap();
    // The provider reads the groups from this file at every sign-in and refresh (set_groups).
    std::fs::write(dir.join("idp-groups.json"), groups).unwrap();
    let mut child = Command::new("node")
        .arg("provider.js")
        .current_dir(OIDC_DIR)
        .env("IDP_CERT", dir.join("idp.crt"))
        .env("IDP_KEY", dir.join("idp.key"))
        .env("IDP_REDIRECT_URI", redirect_uri)
        .env("IDP_CLIENT_ID", CLIENT_ID)
        .env("IDP_CLIENT_SECRET", "e2e-client-secret")
        .env("IDP_GROUPS", groups)
        .env("IDP_GROUPS_FILE", dir.join("idp-groups.json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    // Keep draining, so that the provider never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let ready: serde_json::Value = serde_json::from_str(&line).expect("provider ready line");
    Idp {
        child,
        issuer: ready["issuer"].as_str().unwrap().to_owned(),
    }
}

/// The broker, in its own runtime (so that stopping it is like killing the process).
struct RunningBroker {
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: CancellationToken,
    broker: Arc<Broker>,
}

impl RunningBroker {
    fn start(config: &Config) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let broker = runtime.block_on(async {
            let audit = Audit::to_file(config.audit.as_ref().unwrap()).unwrap();
            let broker = Broker::new(config.clone(), audit).await.unwrap();
            let api = tokio::net::TcpListener::bind(config.listen).await.unwrap();
            let tunnel = tokio::net::TcpListener::bind(config.tunnel_listen)
                .await
                .unwrap();
            let _ = std::fs::remove_file(&config.admin_socket);
            let admin = tokio::net::UnixListener::bind(&config.admin_socket).unwrap();
            tokio::spawn(moat_broker::serve::serve(
                Arc::clone(&broker),
                api,
                tunnel,
                admin,
                shutdown.clone(),
            ));
            broker
        });
        RunningBroker {
            runtime: Some(runtime),
            shutdown,
            broker,
        }
    }

    /// Stops it as a crash would: every socket it holds closes.
    fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }

    fn revoke(&self, target: RevokeTarget) -> serde_json::Value {
        self.admin("/v1/revoke", serde_json::to_value(&target).unwrap())
    }

    /// `POST path` with `body` on the admin socket.
    fn admin(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let admin = self.broker.config.admin_socket.clone();
        self.runtime
            .as_ref()
            .unwrap()
            .block_on(moat_broker_client::client::admin_request(
                &admin,
                http::Method::POST,
                path,
                Some(body),
            ))
            .unwrap()
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A real workspace: `moat run --backend namespace --tunnel DIR`, whose agent leaves a file in
/// its home and waits. Stopped (SIGTERM) when dropped.
struct Workspace {
    moat_run: Child,
    /// The `known_hosts` line its enrolment printed: the broker's SSH host CA, for ws1.
    known_hosts: String,
    /// moat run's standard error (where it says where sshd's log is).
    log: PathBuf,
    /// The workspace's own audit log (its egress proxy and process events).
    audit: PathBuf,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.moat_run.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.moat_run.wait();
    }
}

impl Workspace {
    /// sshd's log inside the workspace, as moat run reported where it is.
    /// sshd's log, and `moat run`'s own when sshd wrote nothing (the workspace never started).
    fn sshd_log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .find_map(|l| l.strip_prefix("moat: sshd's log: "))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .filter(|sshd| !sshd.is_empty())
            .unwrap_or_else(|| format!("(nothing; moat run's log:)\n{log}"))
    }
}

/// The workspace's signed policy: three corporate rules (the service ws1 is given, one it is
/// not given, and the given one on a port the broker does not serve), nothing else.
fn write_policy(dir: &Path, corp_port: u16) {
    let key = moat_policy::signing::generate("").unwrap();
    std::fs::write(dir.join("policy.pub"), &key.public).unwrap();
    let rule = |name: &str, host: &str, port: u16, service: &str| {
        format!(
            "[[rules]]\nname = \"{name}\"\nhosts = [\"{host}\"]\nports = [{port}]\n\
             action = \"corporate\"\nservice = \"{service}\"\nprotocols = [\"tcp\"]\n\n"
        )
    };
    let profile = format!(
        "version = 1\nname = \"broker-e2e\"\n\n{}{}{}",
        rule("corp-echo", "echo.corp.test", corp_port, "corp-echo"),
        rule("corp-other", "other.corp.test", corp_port, "corp-other"),
        rule("corp-wrong-port", "wrong-port.corp.test", 7, "corp-echo"),
    );
    let sig = moat_policy::signing::sign(profile.as_bytes(), &key.secret, "").unwrap();
    std::fs::write(dir.join("policy.toml"), &profile).unwrap();
    std::fs::write(dir.join("policy.toml.minisig"), sig).unwrap();
}

/// Enrols ws1 at `broker` into `dir/ws1` (as `moat-broker enrol` does) and starts it with
/// the namespace backend, or the VM backend where `vm_images` names the VM's images.
fn start_workspace(
    dir: &Path,
    broker: &Broker,
    tunnel: u16,
    corp_port: u16,
    vm_images: Option<&Path>,
) -> Workspace {
    let enrolment = dir.join("ws1");
    let identity = broker
        .pki
        .enrol(&WorkspaceName::try_from("ws1").unwrap())
        .unwrap();
    let host_ca = moat_broker::ssh_ca::SshCa::load_or_create(
        &broker
            .config
            .state_dir
            .join(moat_broker::ssh_ca::HOST_CA_FILE),
    )
    .unwrap();
    let known_hosts = moat_broker::enrolment::write_dir(
        &enrolment,
        &moat_broker_client::enrolment::Tunnel {
            workspace: WorkspaceName::try_from("ws1").unwrap(),
            broker: format!("127.0.0.1:{tunnel}"),
            server_name: "127.0.0.1".into(),
        },
        &identity,
        &broker.ssh_ca.public_key_line(),
        &host_ca,
    )
    .unwrap();
    let log = dir.join("moat-run.log");
    let audit = dir.join("workspace-audit.jsonl");
    write_policy(dir, corp_port);
    let mut moat_run = Command::new(MOAT);
    match vm_images {
        Some(images) => moat_run
            .args(["run", "--backend", "vm"])
            .env("MOAT_IMAGES", images),
        None => moat_run.args(["run", "--backend", "namespace"]),
    };
    let moat_run = moat_run
        .arg("--tunnel")
        .arg(&enrolment)
        .arg("--audit")
        .arg(&audit)
        .arg("--profile")
        .arg(dir.join("policy.toml"))
        .arg("--pubkey")
        .arg(dir.join("policy.pub"))
        .args([
            "--",
            "sh",
            "-c",
            "echo from-the-agent > ~/agent-was-here; exec sleep 3600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Workspace {
        moat_run,
        known_hosts,
        log,
        audit,
    }
}

/// The corporate test service: a TCP echo server on loopback. The workspace has no route to it
/// but the broker.
fn start_corporate_echo() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut back);
            });
        }
    });
    port
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The broker's configuration: API on `api`, tunnels on `tunnel`, trusting `issuer`; ws1 for the
/// `eng` group, logged into as the test's own user.
fn broker_config(dir: &Path, api: u16, tunnel: u16, issuer: &str, corp: u16) -> Config {
    std::fs::write(dir.join("client-secret"), "e2e-client-secret\n").unwrap();
    let toml = format!(
        r#"
listen = "127.0.0.1:{api}"
tunnel_listen = "127.0.0.1:{tunnel}"
public_url = "https://127.0.0.1:{api}"
server_names = ["127.0.0.1"]
state_dir = "{dir}/state"
admin_socket = "{dir}/admin.sock"
audit = "{dir}/audit.jsonl"
session_ttl_secs = 300
entitlement_check_secs = {ENTITLEMENT_CHECK_SECS}

[oidc]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
client_secret_file = "{dir}/client-secret"
ca_file = "{dir}/idp-ca.pem"

[[workspaces]]
name = "ws1"
groups = ["eng"]
ssh_user = "agent"
services = ["corp-echo"]

[[services]]
name = "corp-echo"
address = "127.0.0.1:{corp}"

[[services]]
name = "corp-other"
address = "127.0.0.1:{corp}"
"#,
        dir = dir.display(),
    );
    let config: Config = toml::from_str(&toml).unwrap();
    config.check().unwrap();
    config
}

/// The whole setup: provider, broker, workspace.
struct World {
    dir: tempfile::TempDir,
    /// The corporate test service (an echo server on loopback, reached through the broker).
    corp_port: u16,
    config: Config,
    broker: Option<RunningBroker>,
    _idp: Idp,
    workspace: Workspace,
}

impl World {
    fn new() -> Self {
        Self::with_vm(None)
    }

    /// The world with its workspace in a VM booted from `vm_images` (namespace: `None`).
    fn with_vm(vm_images: Option<&Path>) -> Self {
        // The workspace's SSH sessions are OpenSSH's sshd; people connect with ssh.
        common::require_programs(&[
            ("/usr/sbin/sshd", "openssh-server"),
            ("ssh", "openssh-client"),
            ("ssh-keygen", "openssh-client"),
        ]);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("moat_broker=debug")
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let (api, tunnel) = (free_port(), free_port());
        let public_url = format!("https://127.0.0.1:{api}");
        let idp = start_idp(
            dir.path(),
            &format!("{public_url}/v1/callback"),
            r#"{"alice": ["eng"], "bob": ["sales"]}"#,
        );
        let corp_port = start_corporate_echo();
        let mut config = broker_config(dir.path(), api, tunnel, &idp.issuer, corp_port);
        if vm_images.is_some() {
            // Inside L1 the provider (node) runs emulated: give its answers time, or the
            // broker, failing closed, ends the session before the VM test has used it.
            config.entitlement_check_secs = 120;
        }
        let broker = RunningBroker::start(&config);
        std::fs::write(
            dir.path().join("broker-ca.pem"),
            broker.broker.pki.tls_ca_pem(),
        )
        .unwrap();
        let workspace = start_workspace(dir.path(), &broker.broker, tunnel, corp_port, vm_images);
        let world = World {
            dir,
            corp_port,
            config,
            broker: Some(broker),
            _idp: idp,
            workspace,
        };
        world.wait_for_tunnel(true);
        keygen(&world.path("id_ed25519"));
        // No raw host key pinned: ssh trusts the broker's host CA for ws1, and the workspace's
        // sshd presents its host certificate.
        std::fs::write(
            world.path("known_hosts"),
            format!("{}\n", world.workspace.known_hosts),
        )
        .unwrap();
        world
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn broker(&self) -> &RunningBroker {
        self.broker.as_ref().unwrap()
    }

    fn api_url(&self) -> String {
        self.config.public_url.clone()
    }

    fn wait_for_tunnel(&self, up: bool) {
        let ws = WorkspaceName::try_from("ws1").unwrap();
        // A VM workspace boots first (seconds in L1's emulation).
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.broker().broker.tunnels.is_connected(&ws) != up {
            assert!(
                Instant::now() < deadline,
                "tunnel never became up={up}; moat run said:\n{}",
                std::fs::read_to_string(&self.workspace.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `moat login` as `login`, the browser part driven through the provider's pages.
    fn login(&self, login: &str) -> Output {
        self.login_with(login, &[])
    }

    /// The same, with more `moat login` flags.
    fn login_with(&self, login: &str, flags: &[&str]) -> Output {
        let mut child = Command::new(MOAT)
            .arg("login")
            .args(flags)
            .args(["--broker", &self.api_url(), "--broker-ca"])
            .arg(self.path("broker-ca.pem"))
            .arg("--session")
            .arg(self.path("session.json"))
            .arg("--ssh-key")
            .arg(self.path("id_ed25519.pub"))
            .arg("ws1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let url = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "no URL: {seen}");
            seen.push_str(&line);
            if let Some(url) = line.trim().strip_prefix("https://") {
                break format!("https://{url}");
            }
        };
        let page = match self.browser(&url, login) {
            Ok(handoff_url) => plain_get(&handoff_url),
            Err(page) => page,
        };
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        let mut out = child.wait_with_output().unwrap();
        out.stderr = format!("{seen}{rest}\n(browser saw: {page})").into_bytes();
        out
    }

    /// A browser: follows redirects, keeps cookies, fills the provider's login form with
    /// `login` (any password), and stops where the broker sends it on to a client's loopback
    /// listener: `Ok(that URL)`, or `Err(page)` if a broker page ends the journey instead.
    fn browser(&self, start: &str, login: &str) -> Result<String, String> {
        let mut roots = std::fs::read(self.path("idp-ca.pem")).unwrap();
        roots.extend(std::fs::read(self.path("broker-ca.pem")).unwrap());
        let client = Client::new(roots_from_pem(&roots, false).unwrap()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut jar: HashMap<String, String> = HashMap::new();
        let mut url = start.to_owned();
        let mut form: Option<String> = None;
        for _ in 0..20 {
            let target = Target::parse(&url).unwrap();
            let cookies = jar
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            let (method, body, ctype) = match form.take() {
                Some(b) => ("POST", b, "application/x-www-form-urlencoded"),
                None => ("GET", String::new(), "text/plain"),
            };
            let request = http::Request::builder()
                .method(method)
                .uri(target.path())
                .header("host", target.authority())
                .header("cookie", cookies)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = rt.block_on(client.send(&target, request)).unwrap();
            for c in response.headers().get_all("set-cookie") {
                let c = c.to_str().unwrap();
                let pair = c.split(';').next().unwrap();
                if let Some((k, v)) = pair.split_once('=') {
                    jar.insert(k.to_owned(), v.to_owned());
                }
            }
            if response.status().is_redirection() {
                let location = response.headers()["location"].to_str().unwrap();
                if location.starts_with("http://127.0.0.1:") {
                    return Ok(location.to_owned());
                }
                url = absolute(&target, location);
                continue;
            }
            let page = text(response.body());
            if url.starts_with(&self.api_url()) {
                return Err(page);
            }
            // The provider's pages: a form to submit (the development login page, the device
            // flow's confirmation), or the end of the journey (the device flow's success page).
            let Some(action) = page.split("action=\"").nth(1) else {
                return Err(page);
            };
            url = absolute(&target, action.split('"').next().unwrap());
            let mut fields = form_inputs(&page);
            if page.contains("name=\"login\"") {
                fields.push(("login".into(), login.into()));
                fields.push(("password".into(), "any".into()));
            }
            form = Some(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields)
                    .finish(),
            );
        }
        panic!("sign-in did not finish");
    }

    /// Runs `command` in the workspace over real OpenSSH through `moat ssh`.
    fn ssh(&self, command: &str) -> Child {
        let proxy = format!(
            "{MOAT} ssh --session {} ws1",
            self.path("session.json").display()
        );
        self.ssh_via(&proxy, command)
    }

    /// Runs `command` as agent@ws1 over real OpenSSH with `proxy` as its ProxyCommand.
    fn ssh_via(&self, proxy: &str, command: &str) -> Child {
        self.ssh_as("agent", proxy, command)
    }

    /// Runs `command` as `user` over real OpenSSH with `proxy` as its ProxyCommand.
    fn ssh_as(&self, user: &str, proxy: &str, command: &str) -> Child {
        self.ssh_full(user, proxy, &[], command)
    }

    /// Runs `command` through the broker with extra `ssh` options.
    fn ssh_with(&self, options: &[&str], command: &str) -> Child {
        let proxy = format!(
            "{MOAT} ssh --session {} ws1",
            self.path("session.json").display()
        );
        self.ssh_full("agent", &proxy, options, command)
    }

    fn ssh_full(&self, user: &str, proxy: &str, options: &[&str], command: &str) -> Child {
        Command::new("ssh")
            .args(options)
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("-i")
            .arg(self.path("id_ed25519"))
            .arg("-o")
            .arg(format!(
                "CertificateFile={}",
                self.path("id_ed25519-cert.pub").display()
            ))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.path("known_hosts").display()
            ))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=ws1"])
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(format!("{user}@ws1"))
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// From inside the workspace (a session's shell): opens `host:port`, sends a line, and
    /// prints what comes back, or `refused`.
    fn corporate(&self, host: &str, port: u16) -> Output {
        wait_exit(
            self.ssh(&format!(
                "exec 3<>/dev/tcp/{host}/{port} && printf 'hello corp\\n' >&3 && \
                 head -c 11 <&3 || echo refused"
            )),
            Instant::now(),
            Duration::from_secs(40),
        )
        .0
    }

    /// Waits for an SSH client (at most 30 s); asserts it succeeded (showing the workspace's
    /// sshd log otherwise) and returns what it printed.
    fn succeeded(&self, ssh: Child) -> String {
        let out = wait_exit(ssh, Instant::now(), Duration::from_secs(30)).0;
        assert!(
            out.status.success(),
            "{}\nsshd: {}",
            text(&out.stderr),
            self.workspace.sshd_log()
        );
        text(&out.stdout)
    }

    fn workspace_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.workspace.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The `name="..." value="..."` pairs of a page's inputs.
fn form_inputs(page: &str) -> Vec<(String, String)> {
    let attr = |tag: &str, name: &str| {
        tag.split(&format!("{name}=\""))
            .nth(1)
            .map(|v| v.split('"').next().unwrap().to_owned())
    };
    page.split("<input")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next().unwrap();
            Some((attr(tag, "name")?, attr(tag, "value")?))
        })
        .collect()
}

/// A plain HTTP GET of a loopback URL (the client's listener); returns the body.
fn plain_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = std::net::TcpStream::connect(authority).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    response
}

/// `link` (absolute or a path) as seen from a page of `target`.
fn absolute(target: &Target, link: &str) -> String {
    if link.starts_with("https://") {
        link.to_owned()
    } else {
        format!("https://{}{link}", target.authority())
    }
}

fn count(records: &[serde_json::Value], class: u64, activity: u64) -> usize {
    records
        .iter()
        .filter(|r| r["class_uid"] == class && r["activity_id"] == activity)
        .count()
}

/// Waits for `child` to exit; returns its output and how long it took from `since`.
fn wait_exit(mut child: Child, since: Instant, within: Duration) -> (Output, Duration) {
    loop {
        if child.try_wait().unwrap().is_some() {
            let took = since.elapsed();
            return (child.wait_with_output().unwrap(), took);
        }
        assert!(since.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn validate_ocsf(file: &Path) {
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
        .arg(file)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}{}", text(&v.stdout), text(&v.stderr));
}

#[test]
fn a_person_signs_in_at_the_real_provider_and_runs_a_command_over_ssh_through_the_tunnel() {
    let world = World::new();

    let login = world.login("alice");
    assert!(login.status.success(), "{}", text(&login.stderr));
    let out = wait_exit(
        world.ssh("echo through-the-broker; id -un"),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;

    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through-the-broker\nagent\n");
    let records = world.audit();
    assert_eq!(count(&records, 3002, 1), 1, "one sign-in: {records:?}");
    assert_eq!(records[0]["user"]["uid"], "alice");
    assert_eq!(records[0]["status_id"], 1);
    assert_eq!(count(&records, 4007, 1), 1, "one remote session opened");
    std::thread::sleep(Duration::from_millis(200));
    let records = world.audit();
    assert_eq!(count(&records, 4007, 2), 1, "and closed: {records:?}");
    validate_ocsf(&world.path("audit.jsonl"));
}

/// The same path into a VM workspace (`moat run --backend vm --tunnel`): the person's session
/// is an sshd started by guest-init inside the VM, reached over vsock port 22. Runs where KVM
/// is real, so inside L1 on our machines (`cargo xtask test` runs it there).
#[test]
fn vm_a_person_signs_in_and_runs_a_command_over_ssh_inside_a_vm_workspace() {
    const NAME: &str = "vm_a_person_signs_in_and_runs_a_command_over_ssh_inside_a_vm_workspace";
    let Some(images) = common::vm::vm_images(NAME) else {
        return;
    };
    let world = World::with_vm(Some(&images));

    let login = world.login("alice");
    assert!(login.status.success(), "{}", text(&login.stderr));
    let out = wait_exit(
        world.ssh(
            "echo through-the-broker; id -un; grep -E '^(NoNewPrivs|CapEff):' /proc/self/status",
        ),
        Instant::now(),
        Duration::from_secs(120),
    )
    .0;

    assert!(
        out.status.success(),
        "{}\nmoat run said:\n{}",
        text(&out.stderr),
        std::fs::read_to_string(&world.workspace.log).unwrap_or_default()
    );
    assert_eq!(
        text(&out.stdout),
        "through-the-broker\nagent\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n"
    );
    let records = world.audit();
    assert_eq!(count(&records, 3002, 1), 1, "one sign-in: {records:?}");
    assert_eq!(count(&records, 4007, 1), 1, "one remote session opened");
}

#[test]
fn a_persons_ssh_session_runs_inside_the_workspace_confined_like_its_agent() {
    let world = World::new();
    assert!(world.login("alice").status.success());

    let got = world.succeeded(world.ssh(
        "hostname; cat ~/agent-was-here; id -un; pwd; \
         grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status; \
         touch /run/moat-ssh-probe 2>/dev/null || echo root-read-only; \
         touch ~/from-ssh && echo home-writable; \
         ls /home; \
         ! test -s /etc/ssh/ssh_host_ed25519_key && echo host-key-hidden; \
         echo \"$SSL_CERT_FILE\"",
    ));
    let lines: Vec<&str> = got.lines().map(str::trim).collect();
    let status = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_start_matches(':').trim().to_owned())
            .unwrap_or_default()
    };
    // The workspace, not this host: its name, the agent's home and file, its account.
    assert_eq!(lines[0], "ws1", "{got}");
    assert_eq!(lines[1], "from-the-agent", "{got}");
    assert_eq!(lines[2], "agent", "{got}");
    assert_eq!(lines[3], "/home/agent", "{got}");
    // Confined like the agent: no privileges, seccomp, read-only root, writable home.
    assert_eq!(status("NoNewPrivs"), "1", "{got}");
    assert_eq!(status("Seccomp"), "2", "{got}");
    assert_eq!(status("CapEff"), "0000000000000000", "{got}");
    assert_eq!(status("CapBnd"), "0000000000000000", "{got}");
    for line in [
        "root-read-only",
        "home-writable",
        "agent",
        "host-key-hidden",
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(lines.contains(&line), "{line} missing:\n{got}");
    }
    // The workspace's audit log has the session's sshd among its processes, launched and
    // (once the session ended) exited.
    let records = world.workspace_audit();
    let sshd = records
        .iter()
        .find(|r| {
            r["class_uid"] == 1007
                && r["activity_id"] == 1
                && r["process"]["cmd_line"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("/usr/sbin/sshd -i"))
        })
        .unwrap_or_else(|| panic!("no process record of the session's sshd: {records:?}"));
    let pid = sshd["process"]["pid"].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !world
        .workspace_audit()
        .iter()
        .any(|r| r["class_uid"] == 1007 && r["activity_id"] == 2 && r["process"]["pid"] == pid)
    {
        assert!(Instant::now() < deadline, "the session's sshd never exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    validate_ocsf(&world.workspace.audit);
    // The service description (with the host key) was read and removed before the workspace
    // started.
    let run_log = std::fs::read_to_string(&world.workspace.log).unwrap();
    let run_dir = run_log
        .lines()
        .find_map(|l| l.strip_prefix("moat: run directory: "))
        .unwrap();
    assert!(Path::new(run_dir).is_dir(), "{run_dir}");
    assert!(!Path::new(run_dir).join("ssh-service.json").exists());
}

#[test]
fn a_persons_terminal_session_gets_a_terminal_in_the_workspace() {
    let world = World::new();
    assert!(world.login("alice").status.success());

    let got = world.succeeded(world.ssh_with(&["-tt"], "tty; stat -c %U /proc/self/fd/0"));
    let lines: Vec<&str> = got.lines().map(str::trim).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{got}");
    assert_eq!(lines[1], "agent", "{got}");
}

#[test]
fn a_persons_ssh_session_has_no_network_path_around_the_egress_proxy() {
    let world = World::new();
    assert!(world.login("alice").status.success());

    // A host the workspace's policy does not allow, from inside the session.
    let curl = wait_exit(
        world.ssh("curl -sS -m 10 -o /dev/null https://example.com; echo curl=$?"),
        Instant::now(),
        Duration::from_secs(40),
    )
    .0;
    // SSH's own forwarding, which would be a path around the proxy: refused by the workspace's
    // sshd (and by the certificate).
    let forward = wait_exit(
        world.ssh_with(&["-W", "example.com:443"], ""),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;

    assert!(curl.status.success(), "{}", text(&curl.stderr));
    let said = text(&curl.stdout);
    // 7 (the handshake refused), 35 or 56 (reset during TLS), by how far the refusal got.
    assert!(
        ["curl=7", "curl=35", "curl=56"]
            .iter()
            .any(|code| said.trim_end().ends_with(code)),
        "curl must fail on the refused connection: {said}"
    );
    let audit = std::fs::read_to_string(&world.workspace.audit).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"class_uid\":4001")
            && l.contains("\"hostname\":\"example.com\"")
            && l.contains("\"activity_id\":5")),
        "the egress proxy must have refused example.com:\n{audit}"
    );
    assert!(
        !forward.status.success(),
        "stdio forwarding must be refused"
    );
    assert!(
        text(&forward.stderr).contains("prohibited"),
        "{}",
        text(&forward.stderr)
    );
}

#[test]
fn a_person_outside_the_workspaces_groups_is_refused_at_sign_in() {
    let world = World::new();

    let login = world.login("bob");

    assert!(!login.status.success());
    assert!(
        text(&login.stderr).contains("not entitled"),
        "{}",
        text(&login.stderr)
    );
    let records = world.audit();
    assert_eq!(count(&records, 3002, 1), 1);
    assert_eq!(records[0]["status_id"], 2);
    assert_eq!(records[0]["user"]["uid"], "bob");
    validate_ocsf(&world.path("audit.jsonl"));
}

#[test]
fn revoking_the_person_drops_a_live_ssh_session_within_two_seconds_and_refuses_new_ones() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    let live = world.ssh("echo ready; sleep 60");
    // Wait until the session is really open (its Open record).
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&world.audit(), 4007, 1) == 0 {
        assert!(Instant::now() < deadline, "the SSH session never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));

    let revoked_at = Instant::now();
    let answer = world.broker().revoke(RevokeTarget::Person("alice".into()));
    let (out, took) = wait_exit(live, revoked_at, Duration::from_secs(10));
    eprintln!("revocation: the live SSH session ended {took:?} after the revoke request");

    assert_eq!(answer["sessions_ended"].as_array().unwrap().len(), 1);
    assert!(
        !out.status.success(),
        "the session must not finish normally"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let again = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(20)).0;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("no such session"),
        "{}",
        text(&again.stderr)
    );
    let relogin = world.login("alice");
    assert!(
        !relogin.status.success(),
        "a revoked person cannot sign in again"
    );
    let records = world.audit();
    assert_eq!(count(&records, 3002, 2), 1, "one logoff: {records:?}");
    assert_eq!(count(&records, 4007, 5), 1, "one refused session");
    validate_ocsf(&world.path("audit.jsonl"));
}

#[test]
fn revoking_the_workspace_drops_its_tunnel_and_refuses_it_when_it_comes_back() {
    let world = World::new();

    let revoked_at = Instant::now();
    let answer = world.broker().revoke(RevokeTarget::Workspace(
        WorkspaceName::try_from("ws1").unwrap(),
    ));
    world.wait_for_tunnel(false);
    let took = revoked_at.elapsed();
    // The connector retries with backoff (250 ms, then 500 ms...); each try is refused.
    std::thread::sleep(Duration::from_millis(1500));

    assert_eq!(answer["tunnel_dropped"], true);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        !world
            .broker()
            .broker
            .tunnels
            .is_connected(&WorkspaceName::try_from("ws1").unwrap())
    );
    let login = world.login("alice");
    assert!(
        !login.status.success(),
        "no new sessions to a revoked workspace"
    );
}

#[test]
fn a_workspace_allowed_again_takes_only_a_certificate_issued_after_its_revocation() {
    let world = World::new();
    let ws = WorkspaceName::try_from("ws1").unwrap();
    let broker = &world.broker().broker;

    let answer = world.broker().revoke(RevokeTarget::Workspace(ws.clone()));
    world.wait_for_tunnel(false);
    let renewed = broker.pki.enrol(&ws).unwrap();
    let allowed = world
        .broker()
        .admin("/v1/unrevoke", serde_json::json!({ "workspace": "ws1" }));
    // The running workspace keeps dialling with its old certificate (backoff 250 ms, 500 ms,
    // 1 s, 2 s... from the revocation): refused by serial although the name is allowed.
    std::thread::sleep(Duration::from_secs(5));
    let old_refused = !broker.tunnels.is_connected(&ws);
    // A host with the certificate issued after the revocation gets in.
    let stop = CancellationToken::new();
    let connector = moat_broker_client::tunnel::connector::Connector::new(
        moat_broker_client::tunnel::connector::ConnectorConfig {
            broker: world.config.tunnel_listen.to_string(),
            server_name: "127.0.0.1".into(),
            cert_pem: renewed.cert_pem,
            key_pem: renewed.key_pem,
            broker_ca_pem: renewed.broker_ca_pem,
            uds: world.path("unused.vsock"),
            ports: vec![22],
            egress_uds: None,
        },
    )
    .unwrap();
    let run = stop.clone();
    world
        .broker()
        .runtime
        .as_ref()
        .unwrap()
        .spawn(async move { connector.run(run).await });
    world.wait_for_tunnel(true);
    stop.cancel();

    assert_eq!(answer["tunnel_dropped"], true);
    assert_eq!(answer["certificates_revoked"], 1, "{answer}");
    assert_eq!(allowed["was_revoked"], true, "{allowed}");
    assert!(old_refused, "the old certificate came back");
}

#[test]
fn with_the_broker_down_live_sessions_end_and_new_ones_fail_closed() {
    let mut world = World::new();
    assert!(world.login("alice").status.success());
    let live = world.ssh("echo ready; sleep 60");
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&world.audit(), 4007, 1) == 0 {
        assert!(Instant::now() < deadline, "the SSH session never opened");
        std::thread::sleep(Duration::from_millis(20));
    }

    let stopped_at = Instant::now();
    world.broker.take().unwrap().stop();
    let (out, took) = wait_exit(live, stopped_at, Duration::from_secs(10));
    eprintln!("broker stopped: the live SSH session ended after {took:?}");

    assert!(!out.status.success());
    let again = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(20)).0;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("cannot reach the broker"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn a_restarted_broker_gets_its_workspace_back_and_no_session_survives_it() {
    let mut world = World::new();
    assert!(world.login("alice").status.success());
    let first = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(30)).0;
    assert!(first.status.success(), "{}", text(&first.stderr));

    world.broker.take().unwrap().stop();
    world.broker = Some(RunningBroker::start(&world.config));
    let restarted_at = Instant::now();
    world.wait_for_tunnel(true);
    eprintln!(
        "broker restart: the workspace's tunnel was back {:?} after the broker",
        restarted_at.elapsed()
    );

    let stale = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(20)).0;
    assert!(!stale.status.success(), "the old session must not survive");
    assert!(world.login("alice").status.success());
    let fresh = wait_exit(
        world.ssh("echo again"),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;
    assert!(fresh.status.success(), "{}", text(&fresh.stderr));
    assert_eq!(text(&fresh.stdout), "again\n");
}

#[test]
fn a_provider_whose_discovery_document_names_another_issuer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (api, tunnel) = (free_port(), free_port());
    let idp = start_idp(
        dir.path(),
        &format!("https://127.0.0.1:{api}/v1/callback"),
        "{}",
    );
    // The same provider, named differently: its discovery document and tokens say `issuer`.
    let config = broker_config(dir.path(), api, tunnel, &format!("{}/", idp.issuer), 9);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let started = rt.block_on(Broker::new(
        config,
        Audit::to_writer(Box::new(std::io::sink())),
    ));

    let err = started.unwrap_err();
    assert!(
        moat_broker_client::error_chain(&err).contains("names issuer"),
        "{}",
        moat_broker_client::error_chain(&err)
    );
}

#[test]
fn a_sign_in_url_finished_in_someone_elses_browser_gives_its_starter_nothing() {
    let world = World::new();
    let mut roots = std::fs::read(world.path("broker-ca.pem")).unwrap();
    roots.extend(std::fs::read(world.path("idp-ca.pem")).unwrap());
    let client = Client::new(roots_from_pem(&roots, false).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let post = |path: &str, body: serde_json::Value| {
        let target = Target::parse(&format!("{}{path}", world.api_url())).unwrap();
        let request = http::Request::post(target.path())
            .header("host", target.authority())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = rt.block_on(client.send(&target, request)).unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(response.body()).unwrap(),
        )
    };
    // Someone starts a sign-in (they hold its login handle) and sends its URL to alice.
    let (_, started) = post(
        "/v1/login",
        serde_json::json!({"workspace": "ws1", "loopback_port": 9}),
    );

    // Alice's browser finishes it and goes on to *her* loopback, not theirs.
    let landed = world
        .browser(started["authorize_url"].as_str().unwrap(), "alice")
        .unwrap();
    let (status, _) = post(
        "/v1/login/complete",
        serde_json::json!({"login_id": started["login_id"], "handoff": "a-guess"}),
    );

    assert!(
        landed.starts_with("http://127.0.0.1:9/?handoff="),
        "{landed}"
    );
    assert_eq!(status, 404, "no session without the handoff");
}

#[test]
fn a_person_signs_in_with_the_device_flow_from_a_terminal_without_a_browser() {
    let world = World::new();

    let login = world.login_with("alice", &["--device"]);
    let out = wait_exit(
        world.ssh("echo by-device"),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;

    assert!(login.status.success(), "{}", text(&login.stderr));
    assert!(
        text(&login.stderr).contains("enter the code"),
        "{}",
        text(&login.stderr)
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "by-device\n");
    let records = world.audit();
    assert_eq!(records[0]["class_uid"], 3002);
    assert_eq!(records[0]["user"]["uid"], "alice");
}

/// Runs `child` to its end; returns how long it took and how many bytes it wrote.
fn timed(mut child: Child) -> (Duration, u64) {
    let started = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let bytes = std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    (took, bytes)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: cargo test -p moat --test broker_e2e -- --ignored --nocapture"]
fn bench_session_setup_and_throughput_through_the_broker_beside_direct_ssh() {
    const RUNS: usize = 10;
    const BYTES: u64 = 256 << 20;
    let world = World::new();
    assert!(world.login("alice").status.success());
    // The baseline: OpenSSH's sshd on this host, started by ssh itself over a pipe (no broker,
    // no tunnel, no workspace), with the workspace's host key and the broker's user CA, letting
    // the certificate's principal in as this host's user.
    let config = world.path("direct_sshd_config");
    std::fs::write(world.path("principals"), "agent@ws1\n").unwrap();
    std::fs::write(
        world.path("user_ca.pub"),
        world.broker().broker.ssh_ca.public_key_line(),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "HostKey {}\nHostCertificate {}\nTrustedUserCAKeys {}\nAuthorizedPrincipalsFile {}\n\
             AuthorizedKeysFile none\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n\
             UsePAM no\nPidFile none\n",
            world.path("ws1/ssh_host_ed25519_key").display(),
            world.path("ws1/ssh_host_ed25519_key-cert.pub").display(),
            world.path("user_ca.pub").display(),
            world.path("principals").display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let direct = format!(
        "/usr/sbin/sshd -i -f {} -E {}",
        config.display(),
        world.path("direct_sshd.log").display()
    );
    let broker = format!(
        "{MOAT} ssh --session {} ws1",
        world.path("session.json").display()
    );
    let mut report = String::new();
    let me = whoami();
    let mut rows = Vec::new();
    for (name, user, proxy) in [
        ("direct ssh (sshd -i on a pipe)", me.as_str(), &direct),
        ("through broker and tunnel", "agent", &broker),
    ] {
        let setup = median(
            (0..RUNS)
                .map(|_| timed(world.ssh_as(user, proxy, "true")).0)
                .collect(),
        );
        let (took, bytes) = timed(world.ssh_as(user, proxy, &format!("head -c {BYTES} /dev/zero")));
        assert_eq!(bytes, BYTES);
        let mib_s = (BYTES >> 20) as f64 / took.as_secs_f64();
        report.push_str(&format!(
            "{name:32} session setup (ssh true, median of {RUNS}) {setup:>10.1?}   throughput {mib_s:>7.0} MiB/s\n"
        ));
        rows.push(serde_json::json!({
            "path": name,
            "session_setup_ms": setup.as_secs_f64() * 1e3,
            "throughput_mib_s": mib_s,
        }));
    }
    let ratio = |key: &str| rows[1][key].as_f64().unwrap() / rows[0][key].as_f64().unwrap();
    let (setup_ratio, throughput_ratio) = (ratio("session_setup_ms"), ratio("throughput_mib_s"));
    report.push_str(&format!(
        "broker / direct: session setup {setup_ratio:.2}x, throughput {throughput_ratio:.2}x\n"
    ));
    eprintln!("\n{report}");
    // For `cargo xtask bench broker`: the figures as JSON too.
    if let Some(dir) = std::env::var_os("MOAT_BENCH_DIR") {
        let json = serde_json::json!({
            "bench": "broker session: ssh through broker, tunnel and workspace beside direct sshd",
            "runs": RUNS,
            "bytes": BYTES,
            "rows": rows,
            "broker_over_direct": {
                "session_setup": setup_ratio,
                "throughput": throughput_ratio,
            },
        });
        std::fs::write(
            Path::new(&dir).join("broker-session-latest.json"),
            serde_json::to_string_pretty(&json).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn a_corporate_service_is_reached_from_inside_the_workspace_only_through_the_broker() {
    let world = World::new();
    assert!(world.login("alice").status.success());

    let by_name = world.corporate("echo.corp.test", world.corp_port);
    // An address instead of a name (the workspace's own loopback is not the host's, so any
    // routed address stands for one): the policy has no rule for it, and nothing else leads
    // out of the workspace.
    let by_address = world.corporate("192.0.2.1", world.corp_port);

    assert!(by_name.status.success(), "{}", text(&by_name.stderr));
    assert_eq!(text(&by_name.stdout), "hello corp\n");
    assert_eq!(text(&by_address.stdout).trim(), "refused");
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&world.audit(), 4001, 2) == 0 {
        assert!(
            Instant::now() < deadline,
            "no Close record at the broker: {:?}",
            world.audit()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The broker's record: the flow came from ws1, to the configured service.
    let records = world.audit();
    assert_eq!(count(&records, 4001, 1), 1, "one corporate flow opened");
    let close = records
        .iter()
        .find(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .unwrap();
    assert_eq!(close["traffic"]["bytes_out"], 11);
    assert_eq!(close["src_endpoint"]["uid"], "ws1");
    // The workspace's egress proxy: the named flow went to the broker as service corp-echo; the
    // address was refused by the policy.
    let ours = world.workspace_audit();
    // (Named in it by its name at the broker, from the enrolment.)
    assert!(
        ours.iter().any(|r| r["class_uid"] == 4001
            && r["activity_id"] == 1
            && r["src_endpoint"]["uid"] == "ws1"
            && r["dst_endpoint"]["svc_name"] == "corp-echo"
            && r["unmapped"]["moat"]["policy_action"] == "corporate"),
        "no corporate Open in the workspace's audit: {ours:?}"
    );
    assert!(
        ours.iter().any(|r| r["class_uid"] == 4001
            && r["activity_id"] == 5
            && r["dst_endpoint"]["ip"] == "192.0.2.1"),
        "the address must be refused by the workspace's policy: {ours:?}"
    );
    validate_ocsf(&world.path("audit.jsonl"));
    validate_ocsf(&world.workspace.audit);
}

#[test]
fn a_workspace_reaches_no_corporate_service_it_is_not_given_nor_on_another_port() {
    let world = World::new();
    assert!(world.login("alice").status.success());

    // The policy sends both to the broker; the broker refuses both: corp-other is not ws1's,
    // and corp-echo is served on its configured port only.
    let other = world.corporate("other.corp.test", world.corp_port);
    let wrong_port = world.corporate("wrong-port.corp.test", 7);

    assert_eq!(text(&other.stdout).trim(), "refused");
    assert_eq!(text(&wrong_port.stdout).trim(), "refused");
    assert_eq!(
        count(&world.audit(), 4001, 5),
        2,
        "two refusals at the broker: {:?}",
        world.audit()
    );
    let refused_here = world
        .workspace_audit()
        .into_iter()
        .filter(|r| r["class_uid"] == 4001 && r["activity_id"] == 5)
        .count();
    assert_eq!(refused_here, 2, "and two in the workspace's audit");
    validate_ocsf(&world.path("audit.jsonl"));
    validate_ocsf(&world.workspace.audit);
}

#[test]
fn the_workspaces_sshd_refuses_a_key_without_a_broker_certificate() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    std::fs::remove_file(world.path("id_ed25519-cert.pub")).unwrap();

    let out = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(30)).0;

    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_workspaces_sshd_refuses_a_certificate_from_another_ca() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    let rogue = world.path("rogue_ca");
    keygen(&rogue);
    let signed = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&rogue)
        .args(["-I", "rogue", "-n", "agent", "-V", "-1m:+5m"])
        .arg(world.path("id_ed25519.pub"))
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", text(&signed.stderr));

    let out = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(30)).0;

    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_workspaces_sshd_refuses_a_certificate_the_broker_issued_for_another_workspace() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    let broker = &world.broker().broker;
    let cert = world.path("id_ed25519-cert.pub");
    // What the broker issues for a session on ws2: the same CA, the same account, another
    // workspace.
    let for_ws2 = broker
        .ssh_ca
        .certify(
            &std::fs::read_to_string(world.path("id_ed25519.pub")).unwrap(),
            &moat_broker::ssh_ca::Grant {
                account: "agent",
                workspace: &WorkspaceName::try_from("ws2").unwrap(),
                key_id: "moat session elsewhere".into(),
                valid_before: std::time::SystemTime::now() + Duration::from_secs(300),
            },
        )
        .unwrap();
    std::fs::write(&cert, format!("{for_ws2}\n")).unwrap();
    let other_workspace = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(30)).0;
    // And one from the broker's CA for the bare account, as certificates were before they
    // were bound to a workspace.
    let signed = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(
            broker
                .config
                .state_dir
                .join(moat_broker::ssh_ca::USER_CA_FILE),
        )
        .args(["-I", "unbound", "-n", "agent", "-V", "-1m:+5m"])
        .arg(world.path("id_ed25519.pub"))
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", text(&signed.stderr));
    let unbound = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(30)).0;

    for out in [other_workspace, unbound] {
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out.stderr)
        );
    }
    assert!(
        world
            .workspace
            .sshd_log()
            .contains("Certificate does not contain an authorized principal"),
        "{}",
        world.workspace.sshd_log()
    );
}

#[test]
fn moat_ssh_without_a_session_says_to_sign_in() {
    let dir = tempfile::tempdir().unwrap();

    let out = Command::new(MOAT)
        .args(["ssh", "--session"])
        .arg(dir.path().join("none.json"))
        .arg("ws1")
        .output()
        .unwrap();

    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not signed in to ws1 (run `moat login`)"),
        "{}",
        text(&out.stderr)
    );
}

/// Changes the groups at the provider, as its administrator would (atomically: the provider
/// reads the file at every sign-in and refresh).
fn set_groups(world: &World, groups: &str) {
    let tmp = world.path("idp-groups.json.tmp");
    std::fs::write(&tmp, groups).unwrap();
    std::fs::rename(&tmp, world.path("idp-groups.json")).unwrap();
}

/// Waits until a remote session is open (its SSH Activity Open record).
fn wait_for_open(world: &World) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&world.audit(), 4007, 1) == 0 {
        assert!(Instant::now() < deadline, "the SSH session never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Authentication Logoff records, once there is one (its relay may close a moment before
/// it is written).
fn wait_for_logoffs(world: &World) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logoffs: Vec<_> = world
            .audit()
            .into_iter()
            .filter(|r| r["class_uid"] == 3002 && r["activity_id"] == 2)
            .collect();
        if !logoffs.is_empty() || Instant::now() > deadline {
            return logoffs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one live session's admin view.
fn only_session(world: &World) -> moat_broker::session::SessionSummary {
    let sessions = world.broker().broker.sessions.list();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    sessions[0].clone()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the provider has confirmed the one live session after `after` (Unix seconds).
fn wait_for_confirmation_after(world: &World, after: u64) {
    let deadline = Instant::now() + Duration::from_secs(3 * ENTITLEMENT_CHECK_SECS + 10);
    while only_session(world).confirmed_at <= after {
        assert!(
            Instant::now() < deadline,
            "the provider never confirmed the session again: {:?}",
            world.broker().broker.sessions.list()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Slack on the entitlement bound: one check's round trip to the provider, the broker's 250 ms
/// sweep, and a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

#[test]
fn losing_the_workspace_group_at_the_provider_ends_a_live_ssh_session_within_the_interval() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    let live = world.ssh("echo ready; sleep 60");
    wait_for_open(&world);

    let removed_at = Instant::now();
    set_groups(&world, r#"{"alice": ["sales"], "bob": ["sales"]}"#);
    let bound = Duration::from_secs(ENTITLEMENT_CHECK_SECS);
    let (out, took) = wait_exit(live, removed_at, bound + Duration::from_secs(30));
    eprintln!(
        "entitlement lost: the live SSH session ended {took:?} after the group was removed at \
         the provider (entitlement_check_secs = {ENTITLEMENT_CHECK_SECS})"
    );

    assert!(
        !out.status.success(),
        "the session must not finish normally"
    );
    assert!(took < bound + SLACK, "took {took:?}");
    let logoffs = wait_for_logoffs(&world);
    assert_eq!(logoffs.len(), 1, "{logoffs:?}");
    assert_eq!(
        logoffs[0]["status_detail"],
        "entitlement lost: group removed"
    );
    assert_eq!(logoffs[0]["user"]["uid"], "alice");
    assert!(world.broker().broker.sessions.list().is_empty());
    let again = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(20)).0;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("no such session"),
        "{}",
        text(&again.stderr)
    );
    let relogin = world.login("alice");
    assert!(!relogin.status.success(), "no longer entitled at sign-in");
    assert!(
        text(&relogin.stderr).contains("not entitled"),
        "{}",
        text(&relogin.stderr)
    );
    validate_ocsf(&world.path("audit.jsonl"));
}

#[test]
fn with_the_provider_unreachable_a_live_session_ends_within_one_interval_of_its_last_check() {
    let mut world = World::new();
    assert!(world.login("alice").status.success());
    let live = world.ssh("echo ready; sleep 60");
    wait_for_open(&world);
    // A check has confirmed the session since sign-in: refreshing works.
    wait_for_confirmation_after(&world, only_session(&world).confirmed_at);

    let stopped_at = Instant::now();
    world._idp.child.kill().unwrap();
    world._idp.child.wait().unwrap();
    let bound = Duration::from_secs(ENTITLEMENT_CHECK_SECS);
    let (out, took) = wait_exit(live, stopped_at, bound + Duration::from_secs(30));
    eprintln!(
        "provider unreachable: the live SSH session ended {took:?} after the provider stopped \
         (its last successful check was before that; entitlement_check_secs = \
         {ENTITLEMENT_CHECK_SECS})"
    );

    assert!(!out.status.success());
    // The last successful check was at most the lead before the stop, so the session ended at
    // most one interval after it.
    assert!(took < bound + SLACK, "took {took:?}");
    let logoffs = wait_for_logoffs(&world);
    assert_eq!(logoffs.len(), 1, "{logoffs:?}");
    assert_eq!(
        logoffs[0]["status_detail"],
        "entitlement unconfirmed: the identity provider could not confirm it in time"
    );
    let again = wait_exit(world.ssh("true"), Instant::now(), Duration::from_secs(20)).0;
    assert!(!again.status.success(), "fails closed");
    validate_ocsf(&world.path("audit.jsonl"));
}

#[test]
fn a_session_whose_group_stays_keeps_working_across_several_entitlement_checks() {
    let world = World::new();
    assert!(world.login("alice").status.success());
    let signed_in = only_session(&world).confirmed_at;
    let span = 3 * ENTITLEMENT_CHECK_SECS + 1;

    let live = world.ssh(&format!("echo ready; sleep {span}; echo still-here"));
    let (out, took) = wait_exit(live, Instant::now(), Duration::from_secs(span + 30));

    assert!(
        out.status.success(),
        "{}\n{:?}",
        text(&out.stderr),
        world.audit()
    );
    assert_eq!(text(&out.stdout), "ready\nstill-here\n");
    assert!(took >= Duration::from_secs(span));
    // The provider confirmed it again and again (each refresh rotating the refresh token), the
    // last time within the interval.
    let session = only_session(&world);
    assert!(session.confirmed_at > signed_in, "{session:?}");
    assert!(
        unix_now().saturating_sub(session.confirmed_at) <= ENTITLEMENT_CHECK_SECS,
        "{session:?}"
    );
    let again = wait_exit(
        world.ssh("echo again"),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(count(&world.audit(), 3002, 2), 0, "no logoff");
}

#[test]
fn a_device_flow_session_is_confirmed_again_with_its_refresh_token() {
    let world = World::new();
    let login = world.login_with("alice", &["--device"]);
    assert!(login.status.success(), "{}", text(&login.stderr));
    let signed_in = only_session(&world).confirmed_at;

    // Two intervals later it is still there, confirmed since: the device flow got a refresh
    // token too (without one, it would have ended after one interval).
    wait_for_confirmation_after(&world, signed_in);
    std::thread::sleep(Duration::from_secs(2 * ENTITLEMENT_CHECK_SECS));
    let session = only_session(&world);
    let out = wait_exit(
        world.ssh("echo by-device"),
        Instant::now(),
        Duration::from_secs(30),
    )
    .0;

    assert!(
        unix_now().saturating_sub(session.confirmed_at) <= ENTITLEMENT_CHECK_SECS,
        "{session:?}"
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count(&world.audit(), 3002, 2), 0, "no logoff");
}
