//! The bench's environment, all on loopback in one temporary directory: the test PKI, nginx
//! (the upstream), squid (the CONNECT proxy compared against), moat proxies, mitmdump, and the
//! client's connections through each of them ([`Env::connect`]); child processes are killed
//! when their [`Guard`] drops, and their CPU time is read from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use moat_flow_header::{FlowHeader, Hostname, Transport};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::workloads::read_head;
use super::{HOST, Sizes};
use crate::{root, run_cmd};

/// Kills and reaps a child on drop.
pub(super) struct Guard(pub(super) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback TCP port free just now.
pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) a process has used so far.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// CPU seconds a process's live threads have run so far, to the nanosecond (the scheduler's
/// own count, `/proc/<pid>/task/*/schedstat`), where `/proc/<pid>/stat` counts 10 ms ticks: a
/// run of 5000 kept-alive requests costs a moat proxy about 0.25 s, which ticks would measure
/// to 4%. A thread that ends between two readings takes its time with it, so this is for
/// moat's proxies, whose tokio workers live as long as the proxy (its only blocking-pool work
/// is a policy reload, which the bench never does); falls back to ticks without schedstat.
pub(super) fn thread_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return cpu_seconds(pid);
    };
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let Some(run) = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            return cpu_seconds(pid);
        };
        ns += run;
    }
    ns as f64 / 1e9
}

/// CPU of `pid` and all its descendants (squid may fork helpers).
pub(super) fn tree_cpu(pid: u32) -> f64 {
    let mut total = cpu_seconds(pid);
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            total += tree_cpu(c);
        }
    }
    total
}

/// Polls `ready` every 50 ms for 10 s.
pub(super) async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..200 {
        if ready() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not come up")
}

/// A way from the client to nginx.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Path3 {
    Direct,
    Moat,
    Squid,
    /// moat intercepting TLS and injecting a credential (responses not scanned: the rows
    /// as they were before the scan, `--no-response-scan`).
    MoatIntercept,
    /// The same, with HTTP rules on the rule (four, the last deciding) and every response
    /// scanned for the injected secret (the default).
    MoatScan,
    /// mitmproxy doing the same header injection.
    Mitm,
}

impl Path3 {
    pub(super) const ALL: [Path3; 3] = [Path3::Direct, Path3::Moat, Path3::Squid];
    pub(super) fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Moat => "moat",
            Path3::Squid => "squid",
            Path3::MoatIntercept => "moat intercept",
            Path3::MoatScan => "moat intercept + HTTP rules + response scan",
            Path3::Mitm => "mitmproxy",
        }
    }
}

/// Every path's endpoint and the client's TLS configuration.
pub(super) struct Env {
    pub(super) nginx: SocketAddr,
    pub(super) squid: SocketAddr,
    pub(super) moat_sock: PathBuf,
    pub(super) tls: tokio_rustls::TlsConnector,
    pub(super) moat_pid: u32,
    pub(super) squid_pid: u32,
    pub(super) intercept: Option<InterceptEnv>,
}

/// The interception paths: a second moat proxy with an intercept rule and a secret, and
/// mitmdump injecting the same header.
pub(super) struct InterceptEnv {
    pub(super) moat_sock: PathBuf,
    pub(super) moat_tls: tokio_rustls::TlsConnector,
    pub(super) moat_pid: u32,
    /// The same proxy with its response scan on (a workspace CA of its own).
    pub(super) scan_sock: PathBuf,
    pub(super) scan_tls: tokio_rustls::TlsConnector,
    pub(super) scan_pid: u32,
    /// mitmproxy, where it runs (not for `--scan-only`).
    pub(super) mitm: Option<(SocketAddr, tokio_rustls::TlsConnector, u32)>,
}

/// A client connection to nginx: TCP, a flow socket, or TLS over either.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Env {
    pub(super) async fn connect(&self, path: Path3) -> Result<Box<dyn Io>> {
        let stream: Box<dyn Io> = match path {
            Path3::Direct => {
                let s = TcpStream::connect(self.nginx).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Path3::Moat => {
                let mut s = UnixStream::connect(&self.moat_sock).await?;
                let header = FlowHeader {
                    flow_id: 1,
                    transport: Transport::Tcp,
                    destination: SocketAddr::new([198, 18, 0, 1].into(), self.nginx.port()),
                    hostname: Some(Hostname::new(HOST)?),
                    program: None,
                };
                s.write_all(&header.encode()).await?;
                Box::new(s)
            }
            Path3::MoatIntercept | Path3::MoatScan => {
                let i = self.intercept.as_ref().context("no interception setup")?;
                let (sock, tls) = if path == Path3::MoatScan {
                    (&i.scan_sock, &i.scan_tls)
                } else {
                    (&i.moat_sock, &i.moat_tls)
                };
                let mut s = UnixStream::connect(sock).await?;
                let header = FlowHeader {
                    flow_id: 1,
                    transport: Transport::Tcp,
                    destination: SocketAddr::new([198, 18, 0, 1].into(), self.nginx.port()),
                    hostname: Some(Hostname::new(HOST)?),
                    program: None,
                };
                s.write_all(&header.encode()).await?;
                let tls = tls.connect(ServerName::try_from(HOST)?, s).await?;
                return Ok(Box::new(tls));
            }
            Path3::Mitm => {
                let (mitm, mitm_tls, _) = self
                    .intercept
                    .as_ref()
                    .and_then(|i| i.mitm.as_ref())
                    .context("mitmproxy is not running")?;
                let mut s = TcpStream::connect(mitm).await?;
                s.set_nodelay(true)?;
                // mitmproxy resolves names itself; the address keeps it on loopback.
                let target = self.nginx;
                s.write_all(
                    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
                )
                .await?;
                let head = read_head(&mut s).await?;
                if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
                    bail!(
                        "mitmproxy refused CONNECT: {}",
                        head.lines().next().unwrap_or("")
                    );
                }
                let tls = mitm_tls.connect(ServerName::try_from(HOST)?, s).await?;
                return Ok(Box::new(tls));
            }
            Path3::Squid => {
                let mut s = TcpStream::connect(self.squid).await?;
                s.set_nodelay(true)?;
                let port = self.nginx.port();
                s.write_all(
                    format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
                let head = read_head(&mut s).await?;
                if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
                    bail!(
                        "squid refused CONNECT: {}",
                        head.lines().next().unwrap_or("")
                    );
                }
                Box::new(s)
            }
        };
        let tls = self
            .tls
            .connect(ServerName::try_from(HOST)?, stream)
            .await
            .context("TLS handshake")?;
        Ok(Box::new(tls))
    }

    /// The Host header for `path`: mitmproxy was given the upstream by address (it resolves
    /// names itself, and bench.test exists only in our static maps), so its requests name
    /// the address too, or it would dial a new upstream per request.
    pub(super) fn host_header(&self, path: Path3) -> String {
        match path {
            Path3::Mitm => self.nginx.to_string(),
            _ => HOST.to_owned(),
        }
    }

    pub(super) fn proxy_cpu(&self, path: Path3) -> f64 {
        match path {
            Path3::Direct => 0.0,
            Path3::Moat => thread_cpu_seconds(self.moat_pid),
            Path3::Squid => tree_cpu(self.squid_pid),
            Path3::MoatIntercept => self
                .intercept
                .as_ref()
                .map_or(0.0, |i| thread_cpu_seconds(i.moat_pid)),
            Path3::MoatScan => self
                .intercept
                .as_ref()
                .map_or(0.0, |i| thread_cpu_seconds(i.scan_pid)),
            Path3::Mitm => self
                .intercept
                .as_ref()
                .and_then(|i| i.mitm.as_ref())
                .map_or(0.0, |(_, _, pid)| tree_cpu(*pid)),
        }
    }
}

/// Writes the test PKI into `dir`: an ECDSA P-256 CA (rcgen's default, like the reference
/// nginx setup) in ca.pem, and nginx's leaf for bench.test and 127.0.0.1 in cert.pem and
/// key.pem. Returns the CA certificate.
pub(super) fn pki(dir: &Path) -> Result<CertificateDer<'static>> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL (nginx, mitmproxy) needs distinct names to tell the CA from the leaf.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "moat bench CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    // The address too: mitmproxy verifies the upstream against the CONNECT target, which is
    // the address (it resolves names itself, and bench.test exists only in our static maps).
    let mut leaf_params =
        rcgen::CertificateParams::new(vec![HOST.to_owned(), "127.0.0.1".to_owned()])?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, HOST);
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem())?;
    Ok(CertificateDer::from(ca.der().to_vec()))
}

/// The upstream: nginx, up and accepting.
pub(super) struct Nginx {
    pub(super) _guard: Guard,
    /// HTTPS (the proxy rows): `/bulk`, `/text` and `/small`.
    pub(super) tls: SocketAddr,
    /// Plain HTTP (the netstack rows): `/bulk` and `/chunk`.
    pub(super) plain_port: u16,
}

/// Size of `/text` at most (it is written out, unlike the sparse `/bulk`).
const TEXT_BYTES: u64 = 256 << 20;

/// Writes `len` bytes of text shaped like an API's JSON answers (printable ASCII: letters,
/// digits, quotes, `%`, `\\`, `=`; no two 64 KiB blocks alike in their first bytes), for the
/// response scan's bulk row: the sparse `/bulk` holds only zeros, which a search skips at
/// once, where text keeps stopping it.
fn write_text(path: &Path, len: u64) -> Result<()> {
    use std::io::Write as _;
    const ALPHABET: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \"\":,{}[]-_/%\\=+.\n";
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    // A fixed xorshift sequence: the same file every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        for b in &mut block {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = ALPHABET[usize::try_from(x % ALPHABET.len() as u64).unwrap_or(0)];
        }
        let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Starts nginx on two loopback ports, serving the files of `sizes` (written into `dir`).
pub(super) async fn nginx(dir: &Path, sizes: &Sizes) -> Result<Nginx> {
    std::fs::File::create(dir.join("bulk"))?.set_len(sizes.bulk_bytes)?;
    std::fs::File::create(dir.join("chunk"))?.set_len(sizes.chunk_bytes)?;
    write_text(&dir.join("text"), sizes.bulk_bytes.min(TEXT_BYTES))?;
    // HTTPS for the proxy rows, plain HTTP for the netstack rows.
    let nginx_port = free_port()?;
    let plain_port = free_port()?;
    let conf = format!(
        "daemon off;\nworker_processes 1;\nuser nobody nogroup;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
           server {{\n    listen 127.0.0.1:{nginx_port} ssl;\n    server_name {HOST};\n\
             ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
             ssl_protocols TLSv1.3;\n    ssl_session_tickets off;\n\
             location = /bulk {{ alias {d}/bulk; default_type application/octet-stream; }}\n\
             location = /text {{ alias {d}/text; default_type application/json; }}\n\
             location = /small {{ default_type text/plain; return 200 \"ok\\n\"; }}\n  }}\n\
           server {{\n    listen 127.0.0.1:{plain_port};\n    server_name {HOST};\n\
             location = /bulk {{ alias {d}/bulk; default_type application/octet-stream; }}\n\
             location = /chunk {{ alias {d}/chunk; default_type application/octet-stream; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let nginx = Guard(
        Command::new(crate::setup::which("nginx").context("nginx")?)
            .args(["-p"])
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let nginx_addr: SocketAddr = ([127, 0, 0, 1], nginx_port).into();
    wait_for("nginx", || std::net::TcpStream::connect(nginx_addr).is_ok()).await?;
    Ok(Nginx {
        _guard: nginx,
        tls: nginx_addr,
        plain_port,
    })
}

/// A proxy process, up and accepting.
pub(super) struct Proxy<A> {
    pub(super) proxy: Guard,
    pub(super) addr: A,
}

/// Starts squid, allowing exactly CONNECT to bench.test:`nginx_port`.
pub(super) async fn squid(dir: &Path, nginx_port: u16) -> Result<Proxy<SocketAddr>> {
    let squid_port = free_port()?;
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 {HOST}\n"))?;
    let squid_conf = format!(
        "http_port 127.0.0.1:{squid_port}\nhosts_file {d}/hosts\npid_filename {d}/squid.pid\n\
         cache_log {d}/squid.log\naccess_log none\ncache deny all\ncache_mem 8 MB\n\
         shutdown_lifetime 0 seconds\ndns_nameservers 127.0.0.1\n\
         acl bench_host dstdomain {HOST}\nacl bench_port port {nginx_port}\nacl CONNECT method CONNECT\n\
         http_access allow CONNECT bench_host bench_port\nhttp_access deny all\n",
        d = dir.display()
    );
    std::fs::write(dir.join("squid.conf"), squid_conf)?;
    let squid = Guard(
        Command::new(crate::setup::which("squid").context("squid")?)
            .args(["-N", "-f"])
            .arg(dir.join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let squid_addr: SocketAddr = ([127, 0, 0, 1], squid_port).into();
    wait_for("squid", || std::net::TcpStream::connect(squid_addr).is_ok()).await?;
    Ok(Proxy {
        proxy: squid,
        addr: squid_addr,
    })
}

/// Makes the bench's policy key (bench.key, bench.pub) and starts the passthrough moat proxy
/// with the signed allowlist equivalent to squid's. Returns its flow socket.
pub(super) async fn moat_passthrough(dir: &Path, nginx_port: u16) -> Result<Proxy<PathBuf>> {
    let moat = moat_bin();
    let profile = dir.join("bench.toml");
    std::fs::write(
        &profile,
        format!(
            "version = 1\nname = \"bench\"\n\n[[rules]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
             ports = [{nginx_port}]\naction = \"passthrough\"\nprotocols = [\"tls\"]\n\
             # The upstream is on loopback: named explicitly.\ncidrs = [\"127.0.0.0/8\"]\n"
        ),
    )?;
    run_cmd(
        Command::new(&moat)
            .args(["policy", "keygen", "--out"])
            .arg(dir.join("bench"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    sign_profile(dir, &profile)?;
    let uds = dir.join("passthrough.sock");
    let moat_proxy = Guard(moat_proxy(dir, "passthrough", &profile).spawn()?);
    let moat_sock = moat_egress::port_path(&uds, moat_egress::EGRESS_VSOCK_PORT);
    wait_for("moat proxy", || moat_sock.exists()).await?;
    Ok(Proxy {
        proxy: moat_proxy,
        addr: moat_sock,
    })
}

/// The client's TLS configuration: trusts `ca` only, never resumes a session.
pub(super) fn client_tls(ca: CertificateDer<'static>) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every new connection is a full handshake, as for curl run once per request: session
    // resumption would hide most of a new connection's cost (and mitmproxy mishandles
    // resumed sessions on kept-alive connections).
    client.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
}

/// The release `moat` binary the benchmarks run.
pub(super) fn moat_bin() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join("release/moat")
}

/// Signs `profile` with the bench key (made by `moat policy keygen` at setup).
pub(super) fn sign_profile(dir: &Path, profile: &Path) -> Result<()> {
    run_cmd(
        Command::new(moat_bin())
            .args(["policy", "sign", "--key"])
            .arg(dir.join("bench.key"))
            .arg(profile)
            .stdout(Stdio::null()),
    )
}

/// `moat proxy` serving `<dir>/<name>.sock` under `profile`, resolving bench.test to loopback,
/// auditing to `<dir>/<name>-audit.jsonl`. The caller adds flags and spawns it.
pub(super) fn moat_proxy(dir: &Path, name: &str, profile: &Path) -> Command {
    let mut cmd = Command::new(moat_bin());
    cmd.arg("proxy")
        .arg("--uds")
        .arg(dir.join(format!("{name}.sock")))
        .arg("--profile")
        .arg(profile)
        .arg("--pubkey")
        .arg(dir.join("bench.pub"))
        .arg("--audit")
        .arg(dir.join(format!("{name}-audit.jsonl")))
        .args(["--resolve", &format!("{HOST}=127.0.0.1"), "--no-watch"])
        .env("MOAT_LOG", "warn")
        .stdout(Stdio::null());
    cmd
}

/// A TLS client trusting the certificates of the PEM bundle at `pem_path`, never resuming a
/// session.
pub(super) fn tls_trusting(pem_path: &Path) -> Result<tokio_rustls::TlsConnector> {
    let pem = std::fs::read_to_string(pem_path)
        .with_context(|| format!("cannot read {}", pem_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for block in pem
        .split("-----END CERTIFICATE-----")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
    {
        let b64: String = block
            .lines()
            .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
            .collect();
        let der = STANDARD.decode(&b64).context("certificate is not base64")?;
        roots.add(CertificateDer::from(der))?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Starts mitmdump with an addon injecting the same header as moat's secret, verifying the
/// upstream against the bench CA. Returns its address and the CA certificate it made.
pub(super) async fn mitmdump(dir: &Path, mitmdump: &Path) -> Result<(Proxy<SocketAddr>, PathBuf)> {
    let mitm_port = free_port()?;
    std::fs::write(
        dir.join("inject.py"),
        "def request(flow):\n    flow.request.headers[\"authorization\"] = \"Bearer bench-secret-value\"\n",
    )?;
    let confdir = dir.join("mitm");
    let mitm = Guard(
        Command::new(mitmdump)
            .args([
                "-q",
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                &mitm_port.to_string(),
            ])
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .arg("--set")
            .arg(format!(
                "ssl_verify_upstream_trusted_ca={}",
                dir.join("ca.pem").display()
            ))
            .args(["--set", "stream_large_bodies=1m", "-s"])
            .arg(dir.join("inject.py"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mitm_addr: SocketAddr = ([127, 0, 0, 1], mitm_port).into();
    let mitm_ca = confdir.join("mitmproxy-ca-cert.pem");
    wait_for("mitmdump", || {
        std::net::TcpStream::connect(mitm_addr).is_ok() && mitm_ca.exists()
    })
    .await?;
    Ok((
        Proxy {
            proxy: mitm,
            addr: mitm_addr,
        },
        mitm_ca,
    ))
}
