//! What the end-to-end tests of both backends share: a TLS upstream on loopback, a signed
//! policy naming it, and `moat run` around a shell script.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod broker;
pub mod deadline;
#[macro_use]
pub mod scenarios;
pub mod services;
pub mod vm;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Fails the calling test at once, naming what is missing, when an outside program it runs is
/// not installed; without it the symptom would be unrelated (a workspace that never connects, a
/// script that prints nothing). `cargo xtask test` installs them all (xtask/src/setup.rs).
pub fn require_programs(programs: &[(&str, &str)]) {
    let found = |program: &str| {
        if program.starts_with('/') {
            return Path::new(program).is_file();
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).any(|d| d.join(program).is_file())
    };
    let missing: Vec<String> = programs
        .iter()
        .filter(|(program, _)| !found(program))
        .map(|(program, package)| format!("{program} (Debian package {package})"))
        .collect();
    assert!(
        missing.is_empty(),
        "this test runs programs that are not installed: {}; `cargo xtask test` installs them",
        missing.join(", ")
    );
}

/// A static HTTPS file server on 127.0.0.1 for `allowed.test` and `denied.test`, serving
/// `/hello` and the files under `root` (a dumb-HTTP git repository, for instance).
pub struct Upstream {
    pub port: u16,
    pub ca_pem: String,
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
        } else if path == "/echo" {
            // The request head as it arrived, as TRACE or an error page repeating the request
            // would (the proxy must hand the agent only the placeholder).
            Some(text.clone().into_bytes())
        } else if path.starts_with("/private/") && !ok {
            // Files under /private/ are served only to the real secret.
            None
        } else if path == "/auth" || path == "/auth-required" {
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
pub const E2E_SECRET: &str = "sk-e2e-REAL-7d3e";
/// What the agent is given instead.
pub const E2E_PLACEHOLDER: &str = "sk-moat-placeholder-e2e";
/// The agent's variable holding the `placeholder = "auto"` secret's placeholder.
pub const E2E_AUTO_ENV: &str = "E2E_AUTO_TOKEN";

/// A workspace setup: signed policy, agent home with the CA, audit log.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub upstream: Upstream,
    /// `namespace` or `vm`.
    pub backend: &'static str,
    /// vm backend: the images directory (`MOAT_IMAGES`).
    pub images: Option<PathBuf>,
    /// namespace backend: `moat run --host-root` instead of the root image.
    pub host_root: bool,
    /// `moat run --image`: the root from this OCI image (both backends).
    pub image: Option<PathBuf>,
    /// The key the profile is signed with, to sign it again after a change.
    pub policy_key: String,
    /// More `--resolve NAME=ADDR` for `moat run`, beyond the test upstream's names.
    pub resolve: Vec<String>,
    /// More arguments for `moat run` (`--service ...`), before the agent's command.
    pub args: Vec<std::ffi::OsString>,
}

/// The namespace backend's default root: the root image `cargo xtask images rootfs` keeps as a
/// directory (`rootfs_dir` in target/moat-images/current.toml). `cargo xtask test` builds it
/// before the tests; without it a test fails saying so.
pub fn root_image() -> PathBuf {
    let current = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moat-images/current.toml");
    let text = std::fs::read_to_string(&current).unwrap_or_default();
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("rootfs_dir = "))
        .map(|v| PathBuf::from(v.trim_matches('"')))
        .filter(|p| p.is_dir());
    dir.unwrap_or_else(|| {
        panic!(
            "no root image directory in {} (the namespace backend's root): build it with \
             `cargo xtask images rootfs`, as `cargo xtask test` does",
            current.display()
        )
    })
}

/// The root image as an OCI archive: `MOAT_OCI_IMAGE`, which `cargo xtask test` sets (after
/// `cargo xtask images oci`); without it a test fails saying so.
pub fn oci_image() -> PathBuf {
    let archive = std::env::var_os("MOAT_OCI_IMAGE").map(PathBuf::from);
    archive.filter(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "MOAT_OCI_IMAGE names no OCI archive: `cargo xtask test` builds it and sets it \
             (`cargo xtask images oci` prints its path)"
        )
    })
}

/// Where the tests' `moat run --image` unpack images: one cache for the whole run (and the
/// one `cargo xtask test` fills on the host before the VM tests run in L1).
pub fn image_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("moat-image-cache")
}

impl Workspace {
    /// A namespace workspace on the root image (the default).
    pub fn new() -> Workspace {
        root_image();
        Self::with_backend("namespace", None)
    }

    /// A workspace of `backend` whose root is the root image's OCI archive (`--image`).
    pub fn from_oci_image(backend: &'static str, images: Option<PathBuf>) -> Workspace {
        Workspace {
            image: Some(oci_image()),
            ..Self::with_backend(backend, images)
        }
    }

    /// A namespace workspace on the host's root (`moat run --host-root`).
    pub fn host_root() -> Workspace {
        Workspace {
            host_root: true,
            ..Self::with_backend("namespace", None)
        }
    }

    pub fn with_backend(backend: &'static str, images: Option<PathBuf>) -> Workspace {
        // The tests run git on the host to make repositories (and, under --host-root, the
        // agent runs the host's own programs).
        require_programs(&[
            ("curl", "curl"),
            ("git", "git"),
            ("/usr/bin/python3", "python3-requests"),
        ]);
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
             presentation = \"authorization_bearer\"\n\n\
             # A placeholder drawn per workspace start, which /auth-required must carry.\n\
             [[secrets]]\nname = \"auto\"\nsource = {{ file = \"{secret}\" }}\n\
             placeholder = \"auto\"\nenv = \"{E2E_AUTO_ENV}\"\nrequire = true\n\
             hosts = [\"api.test\"]\nports = [{port}]\npaths = [\"/auth-required\"]\n\
             presentation = \"authorization_bearer\"\n",
            upstream.port,
            port = upstream.port,
            secret = dir.path().join("secret").display(),
        );
        std::fs::write(dir.path().join("secret"), format!("{E2E_SECRET}\n")).unwrap();
        let sig = moat_policy::signing::sign(profile.as_bytes(), &key.secret, "").unwrap();
        std::fs::write(dir.path().join("policy.toml"), &profile).unwrap();
        std::fs::write(dir.path().join("policy.toml.minisig"), sig).unwrap();
        // Empty: run by root, `moat run` hands it to the workspace's own host uid.
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &upstream.ca_pem).unwrap();
        Workspace {
            dir,
            upstream,
            backend,
            images,
            host_root: false,
            image: None,
            policy_key: key.secret,
            resolve: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds `text` (rules, in TOML) to the profile before its secrets, and signs it again.
    pub fn with_rules(self, text: &str) -> Workspace {
        let path = self.dir.path().join("policy.toml");
        let profile = std::fs::read_to_string(&path).unwrap();
        let profile = profile.replacen("\n[[secrets]]", &format!("\n{text}\n[[secrets]]"), 1);
        let sig = moat_policy::signing::sign(profile.as_bytes(), &self.policy_key, "").unwrap();
        std::fs::write(&path, &profile).unwrap();
        std::fs::write(self.dir.path().join("policy.toml.minisig"), sig).unwrap();
        self
    }

    /// Gives the intercept rule `api` (api.test) HTTP rules: `http` is the `[rules.http]`
    /// block, with its `[[rules.http.requests]]`. The profile is signed again.
    pub fn with_http_rules(self, http: &str) -> Workspace {
        let path = self.dir.path().join("policy.toml");
        let profile = std::fs::read_to_string(&path).unwrap();
        let profile = profile.replacen("\n[[secrets]]", &format!("\n{http}\n[[secrets]]"), 1);
        let sig = moat_policy::signing::sign(profile.as_bytes(), &self.policy_key, "").unwrap();
        std::fs::write(&path, &profile).unwrap();
        std::fs::write(self.dir.path().join("policy.toml.minisig"), sig).unwrap();
        self
    }

    /// Narrows the rule `allowed` (allowed.test) to flows from `programs`; signed again.
    pub fn narrow_allowed_to_programs(&self, programs: &[&str]) {
        let path = self.dir.path().join("policy.toml");
        let profile = std::fs::read_to_string(&path).unwrap();
        let list: Vec<String> = programs.iter().map(|p| format!("{p:?}")).collect();
        let narrowed = profile.replacen(
            "# The test upstream is on loopback",
            &format!(
                "programs = [{}]\n# The test upstream is on loopback",
                list.join(", ")
            ),
            1,
        );
        assert_ne!(narrowed, profile);
        let sig = moat_policy::signing::sign(narrowed.as_bytes(), &self.policy_key, "").unwrap();
        std::fs::write(&path, &narrowed).unwrap();
        std::fs::write(self.dir.path().join("policy.toml.minisig"), sig).unwrap();
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn reasons(&self) -> Vec<String> {
        self.audit()
            .iter()
            .filter_map(|r| r["unmapped"]["moat"]["reason"].as_str().map(str::to_owned))
            .collect()
    }

    /// Runs `script` with sh inside the workspace, within [`deadline::RUN_DEADLINE`]: a run
    /// that hangs fails the test with what it printed so far, its processes and the audit log.
    pub fn run(&self, script: &str) -> Output {
        self.output(
            &mut self.command(script),
            &format!("moat run -- sh -c {script:?}"),
        )
    }

    /// Runs `cmd` (one of this workspace's `moat run`s) to its end within
    /// [`deadline::RUN_DEADLINE`], as [`Workspace::run`] does.
    pub fn output(&self, cmd: &mut Command, what: &str) -> Output {
        deadline::output_within(cmd, what, deadline::RUN_DEADLINE, &|| self.audit_so_far())
    }

    /// The audit log as it stands, for a hang report: its last 30 records.
    pub fn audit_so_far(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- the audit log so far (last {} of {} records) ---\n{}",
            lines.len().min(30),
            lines.len(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// The `moat run` command for `script`.
    pub fn command(&self, script: &str) -> Command {
        let mut cmd = self.moat_run();
        cmd.args(["--", "sh", "-c", script]);
        cmd
    }

    /// `moat run` with this workspace's backend, policy, audit log and names, and no command.
    pub fn moat_run(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
        cmd.args(["run", "--backend", self.backend]);
        if self.backend == "namespace" {
            cmd.arg("--home").arg(self.home());
        }
        if self.host_root {
            cmd.arg("--host-root");
        }
        if let Some(image) = &self.image {
            cmd.arg("--image").arg(image);
            cmd.env("MOAT_IMAGE_CACHE", image_cache());
        }
        if let Some(images) = &self.images {
            cmd.env("MOAT_IMAGES", images);
        }
        cmd.arg("--profile")
            .arg(d.join("policy.toml"))
            .arg("--pubkey")
            .arg(d.join("policy.pub"))
            .arg("--audit")
            .arg(d.join("audit.jsonl"))
            .arg("--audit-key")
            .arg(d.join("audit.key"))
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
            ]);
        for r in &self.resolve {
            cmd.arg("--resolve").arg(r);
        }
        cmd.args(&self.args);
        cmd.env("MOAT_LOG", "warn");
        cmd
    }

    /// Makes a one-commit repository holding `file` and serves it from the upstream at
    /// `/<rel>` over dumb HTTP (a bare clone with `update-server-info`).
    pub fn serve_repo(&self, rel: &str, file: &str, content: &str) {
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

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.upstream.port)
    }
}

/// The published OCSF validator over an audit log (moat-audit's, one helper for every test
/// crate).
pub use moat_audit::testing::validate_ocsf;

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}
