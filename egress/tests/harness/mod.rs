//! Test harness: a real proxy in-process, real TLS upstreams on loopback (rcgen test PKI),
//! and clients that speak the flow header like the guest's netstack.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moat_egress::audit::Audit;
use moat_egress::policy_store::PolicySource;
use moat_egress::resolve::StaticResolver;
use moat_egress::{Config, Limits, Proxy};
use moat_flow_header::{FlowHeader, Hostname, Transport};
use moat_policy::signing;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// Names the test PKI's leaf certificate covers.
pub const CERT_NAMES: &[&str] = &[
    "allowed.test",
    "www.allowed.test",
    "other.test",
    "private.test",
];

pub struct Pki {
    pub ca: CertificateDer<'static>,
    pub leaf: CertificateDer<'static>,
    pub leaf_key: Vec<u8>,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "moat test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = CERT_NAMES.iter().map(|s| (*s).to_owned()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            leaf_key: leaf_key.serialize_der(),
        }
    })
}

/// An upstream on loopback: echoes every byte; on EOF from the client writes "bye\n" and
/// closes (so half-close is observable). TLS when `tls`.
pub async fn upstream(tls: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| {
        let p = pki();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.leaf_key.clone()));
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![p.leaf.clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acc) => {
                        if let Ok(s) = acc.accept(tcp).await {
                            echo(s).await;
                        }
                    }
                    None => echo(tcp).await,
                }
            });
        }
    });
    addr
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.write_all(b"bye\n").await;
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A proxy under test, with its files.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub dir: tempfile::TempDir,
    pub uds: PathBuf,
    pub admin: PathBuf,
    pub audit_path: PathBuf,
    pub key_secret: String,
    pub profile: PathBuf,
    pub tls: SocketAddr,
    pub plain: SocketAddr,
}

/// The test profile. `{tls}` and `{plain}` are the upstreams' ports.
pub fn profile_text(tls: u16, plain: u16, extra: &str) -> String {
    format!(
        r#"version = 1
name = "test"

[[rules]]
name = "allowed"
hosts = ["allowed.test", "*.allowed.test"]
ports = [{tls}, {plain}]
action = "passthrough"
# Test upstreams live on loopback: this rule names that range explicitly.
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "public-only"
hosts = ["private.test", "mapped.test", "metadata.test", "cgnat.test"]
ports = [{tls}]
action = "passthrough"

[[rules]]
name = "raw"
hosts = ["raw.test"]
ports = [{plain}]
action = "passthrough"
protocols = ["tcp"]
cidrs = ["127.0.0.0/8"]

[[rules]]
name = "loopback-literal"
ports = [{plain}]
action = "passthrough"
protocols = ["tcp"]
cidrs = ["127.0.0.2/32"]
{extra}"#
    )
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestProxy {
        Self::start_full(limits, true).await
    }

    /// A proxy that reloads only on SIGHUP (or an explicit `reload`), not on file changes.
    pub async fn start_unwatched() -> TestProxy {
        Self::start_full(Limits::default(), false).await
    }

    async fn start_full(limits: Limits, watch: bool) -> TestProxy {
        let tls = upstream(true).await;
        let plain = upstream(false).await;
        let dir = tempfile::tempdir().unwrap();
        let key = signing::generate("").unwrap();
        let pubkey = dir.path().join("policy.pub");
        std::fs::write(&pubkey, &key.public).unwrap();
        let profile = dir.path().join("profile.toml");
        let text = profile_text(tls.port(), plain.port(), "");
        write_signed(&profile, &text, &key.secret);
        let mut resolver = StaticResolver::new();
        for name in ["allowed.test", "www.allowed.test", "other.test", "raw.test"] {
            resolver.insert(name, "127.0.0.1".parse().unwrap()).unwrap();
        }
        resolver
            .insert("private.test", "127.0.0.1".parse().unwrap())
            .unwrap();
        resolver
            .insert("mapped.test", "::ffff:127.0.0.1".parse().unwrap())
            .unwrap();
        resolver
            .insert("metadata.test", "169.254.169.254".parse().unwrap())
            .unwrap();
        resolver
            .insert("cgnat.test", "100.64.1.1".parse().unwrap())
            .unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let audit = Audit::to_file(&audit_path, "test-ws").unwrap();
        let uds = dir.path().join("v.sock");
        let admin = dir.path().join("admin.sock");
        let config = Config {
            workspace: "test-ws".into(),
            uds: uds.clone(),
            port: moat_egress::EGRESS_VSOCK_PORT,
            admin: Some(admin.clone()),
            source: PolicySource::new(&profile, &pubkey).unwrap(),
            watch,
            limits,
        };
        let proxy = Proxy::start(config, Box::new(resolver), audit).unwrap();
        TestProxy {
            proxy,
            dir,
            uds,
            admin,
            audit_path,
            key_secret: key.secret,
            profile,
            tls,
            plain,
        }
    }

    /// Opens a flow stream and writes a header for `host` (or an IP literal) and `port`.
    pub async fn flow(&self, host: Option<&str>, addr: IpAddr, port: u16) -> UnixStream {
        let mut s = UnixStream::connect(self.proxy.listen_path()).await.unwrap();
        let header = FlowHeader {
            flow_id: 7,
            transport: Transport::Tcp,
            destination: SocketAddr::new(addr, port),
            hostname: host.map(|h| Hostname::new(h).unwrap()),
        };
        s.write_all(&header.encode()).await.unwrap();
        s
    }

    /// A named flow, with a fake guest address as the netstack would claim.
    pub async fn named(&self, host: &str, port: u16) -> UnixStream {
        self.flow(Some(host), "198.18.0.5".parse().unwrap(), port)
            .await
    }

    /// Rewrites and re-signs the profile with `extra` rules appended (or replaced `text`).
    pub fn rewrite_profile(&self, text: &str) {
        write_signed(&self.profile, text, &self.key_secret);
    }

    /// Waits until the audit log holds a record matching `pred`, and returns it.
    pub async fn wait_record(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            if let Some(r) = self.records().into_iter().find(|r| pred(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "no matching audit record; log:\n{}",
            std::fs::read_to_string(&self.audit_path).unwrap_or_default()
        );
    }

    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the refusal record with `reason` and returns it.
    pub async fn refused(&self, reason: &str) -> Value {
        self.wait_record(|r| r["unmapped"]["moat"]["reason"] == reason && r["activity_id"] == 5)
            .await
    }

    /// GET a path from the admin socket.
    pub async fn admin_get(&self, path: &str) -> String {
        let mut s = UnixStream::connect(&self.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

pub fn write_signed(profile: &Path, text: &str, secret: &str) {
    let sig = signing::sign(text.as_bytes(), secret, "").unwrap();
    let mut sig_path = profile.as_os_str().to_owned();
    sig_path.push(".minisig");
    // Signature first, then the profile: either order must end with the new policy in force.
    std::fs::write(&sig_path, sig).unwrap();
    std::fs::write(profile, text).unwrap();
}

/// A TLS client over the flow stream that trusts the test CA and sends `sni` (none for an IP).
pub async fn tls_client(
    stream: UnixStream,
    sni: ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<UnixStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni, stream)
        .await
}

pub fn name(s: &str) -> ServerName<'static> {
    ServerName::try_from(s.to_owned()).unwrap()
}

/// Reads until EOF or error, with a timeout; returns what was read.
pub async fn read_all<R: tokio::io::AsyncRead + Unpin>(r: &mut R, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, r.read_to_end(&mut out)).await;
    out
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The Python interpreter with the OCSF validator installed (see egress/tests/ocsf/README.md).
pub fn ocsf_python() -> PathBuf {
    if let Ok(p) = std::env::var("MOAT_OCSF_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-ocsf/bin/python");
    assert!(
        venv.exists(),
        "the OCSF validator is not installed: run `cargo xtask test` (it installs it into \
         .venv-ocsf) or set MOAT_OCSF_PYTHON"
    );
    venv
}
