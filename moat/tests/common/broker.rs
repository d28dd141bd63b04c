//! The broker end-to-end fixture (`broker_e2e.rs`): a real OpenID Connect provider
//! (panva/oidc-provider under Node, `broker/tests/oidc`), the broker in process on loopback, and
//! a workspace enrolled at it and run by `moat run --tunnel DIR`, with the helpers that sign a
//! person in, run `ssh` through `moat ssh`, and read the audit logs. The tests are in
//! `broker_e2e.rs`; this holds only the world they run in.

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

use super::text;

pub const OIDC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../broker/tests/oidc");
pub const MOAT: &str = env!("CARGO_BIN_EXE_moat");
pub const CLIENT_ID: &str = "moat-broker";
/// The broker's `entitlement_check_secs` in these tests: sessions are re-checked at the provider
/// every 2 s (the check starts half the interval before the confirmation runs out).
pub const ENTITLEMENT_CHECK_SECS: u64 = 4;

/// A loopback TCP port nothing listens on, for a broker the test starts later. Below the
/// ephemeral range (32768-60999 by default): a port the kernel hands out for `127.0.0.1:0` may
/// become another connection's source port before the broker binds it (CI, 2026-12-06: the
/// broker's bind failed with "Address already in use"). Each call in this process gets a port
/// of its own, from a start that differs between processes.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = (std::process::id() % 480) * 25;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

pub fn whoami() -> String {
    text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_owned()
}

/// A test CA and a leaf for 127.0.0.1, as PEM: (ca, cert, key).
pub fn loopback_tls() -> (String, String, String) {
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
pub struct Idp {
    pub child: Child,
    pub issuer: String,
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_idp(dir: &Path, redirect_uri: &str, groups: &str) -> Idp {
    super::require_programs(&[("node", "nodejs")]);
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
pub struct RunningBroker {
    pub runtime: Option<tokio::runtime::Runtime>,
    pub shutdown: CancellationToken,
    pub broker: Arc<Broker>,
}

impl RunningBroker {
    pub fn start(config: &Config) -> Self {
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
    pub fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }

    pub fn revoke(&self, target: RevokeTarget) -> serde_json::Value {
        self.admin("/v1/revoke", serde_json::to_value(&target).unwrap())
    }

    /// `POST path` with `body` on the admin socket.
    pub fn admin(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
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
pub struct Workspace {
    pub moat_run: Child,
    /// The `known_hosts` line its enrolment printed: the broker's SSH host CA, for ws1.
    pub known_hosts: String,
    /// moat run's standard error (where it says where sshd's log is).
    pub log: PathBuf,
    /// The workspace's own audit log (its egress proxy and process events).
    pub audit: PathBuf,
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
    pub fn sshd_log(&self) -> String {
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
pub fn write_policy(dir: &Path, corp_port: u16) {
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
pub fn start_workspace(
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
    let log_file = std::fs::File::create(&log).unwrap();
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
        .arg("--audit-key")
        .arg(dir.join("audit.key"))
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
        // The VM's console (guest-init's own errors) too, so a failure shows them: one open
        // file, one offset.
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
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
pub fn start_corporate_echo() -> u16 {
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

pub fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The broker's configuration: API on `api`, tunnels on `tunnel`, trusting `issuer`; ws1 for the
/// `eng` group, logged into as the test's own user.
pub fn broker_config(dir: &Path, api: u16, tunnel: u16, issuer: &str, corp: u16) -> Config {
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
pub struct World {
    pub dir: tempfile::TempDir,
    /// The corporate test service (an echo server on loopback, reached through the broker).
    pub corp_port: u16,
    pub config: Config,
    pub broker: Option<RunningBroker>,
    pub _idp: Idp,
    pub workspace: Workspace,
}

impl World {
    pub fn new() -> Self {
        Self::with_vm(None)
    }

    /// The world with its workspace in a VM booted from `vm_images` (namespace: `None`).
    pub fn with_vm(vm_images: Option<&Path>) -> Self {
        // The workspace's SSH sessions are OpenSSH's sshd; people connect with ssh.
        super::require_programs(&[
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn broker(&self) -> &RunningBroker {
        self.broker.as_ref().unwrap()
    }

    pub fn api_url(&self) -> String {
        self.config.public_url.clone()
    }

    pub fn wait_for_tunnel(&self, up: bool) {
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
    pub fn login(&self, login: &str) -> Output {
        self.login_with(login, &[])
    }

    /// The same, with more `moat login` flags.
    pub fn login_with(&self, login: &str, flags: &[&str]) -> Output {
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
    pub fn browser(&self, start: &str, login: &str) -> Result<String, String> {
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
    pub fn ssh(&self, command: &str) -> Child {
        let proxy = format!(
            "{MOAT} ssh --session {} ws1",
            self.path("session.json").display()
        );
        self.ssh_via(&proxy, command)
    }

    /// Runs `command` as agent@ws1 over real OpenSSH with `proxy` as its ProxyCommand.
    pub fn ssh_via(&self, proxy: &str, command: &str) -> Child {
        self.ssh_as("agent", proxy, command)
    }

    /// Runs `command` as `user` over real OpenSSH with `proxy` as its ProxyCommand.
    pub fn ssh_as(&self, user: &str, proxy: &str, command: &str) -> Child {
        self.ssh_full(user, proxy, &[], command)
    }

    /// Runs `command` through the broker with extra `ssh` options.
    pub fn ssh_with(&self, options: &[&str], command: &str) -> Child {
        let proxy = format!(
            "{MOAT} ssh --session {} ws1",
            self.path("session.json").display()
        );
        self.ssh_full("agent", &proxy, options, command)
    }

    pub fn ssh_full(&self, user: &str, proxy: &str, options: &[&str], command: &str) -> Child {
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
    pub fn corporate(&self, host: &str, port: u16) -> Output {
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
    pub fn succeeded(&self, ssh: Child) -> String {
        let out = wait_exit(ssh, Instant::now(), Duration::from_secs(30)).0;
        assert!(
            out.status.success(),
            "{}\nsshd: {}",
            text(&out.stderr),
            self.workspace.sshd_log()
        );
        text(&out.stdout)
    }

    pub fn workspace_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.workspace.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The broker's records, in order (the log's own, Event Log Activity 1008, left out: its
    /// start, checkpoints and end).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["class_uid"] != 1008)
            .collect()
    }
}

/// The `name="..." value="..."` pairs of a page's inputs.
pub fn form_inputs(page: &str) -> Vec<(String, String)> {
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
pub fn plain_get(url: &str) -> String {
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
pub fn absolute(target: &Target, link: &str) -> String {
    if link.starts_with("https://") {
        link.to_owned()
    } else {
        format!("https://{}{link}", target.authority())
    }
}

pub fn count(records: &[serde_json::Value], class: u64, activity: u64) -> usize {
    records
        .iter()
        .filter(|r| r["class_uid"] == class && r["activity_id"] == activity)
        .count()
}

/// Waits for `child` to exit; returns its output and how long it took from `since`.
pub fn wait_exit(mut child: Child, since: Instant, within: Duration) -> (Output, Duration) {
    loop {
        if child.try_wait().unwrap().is_some() {
            let took = since.elapsed();
            return (child.wait_with_output().unwrap(), took);
        }
        assert!(since.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Changes the groups at the provider, as its administrator would (atomically: the provider
/// reads the file at every sign-in and refresh).
pub fn set_groups(world: &World, groups: &str) {
    let tmp = world.path("idp-groups.json.tmp");
    std::fs::write(&tmp, groups).unwrap();
    std::fs::rename(&tmp, world.path("idp-groups.json")).unwrap();
}

/// Waits until a remote session is open (its SSH Activity Open record).
pub fn wait_for_open(world: &World) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&world.audit(), 4007, 1) == 0 {
        assert!(Instant::now() < deadline, "the SSH session never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Authentication Logoff records, once there is one (its relay may close a moment before
/// it is written).
pub fn wait_for_logoffs(world: &World) -> Vec<serde_json::Value> {
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
pub fn only_session(world: &World) -> moat_broker::session::SessionSummary {
    let sessions = world.broker().broker.sessions.list();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    sessions[0].clone()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the provider has confirmed the one live session after `after` (Unix seconds).
pub fn wait_for_confirmation_after(world: &World, after: u64) {
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
