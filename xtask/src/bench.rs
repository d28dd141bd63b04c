//! `cargo xtask bench [--quick] [--intercept-only]`: the egress proxy measured beside a direct loopback connection
//! and squid (CONNECT, with the equivalent allowlist), in one run, interleaved, medians of 5.
//!
//! Setup (all on loopback, in a temporary directory): nginx serves HTTPS with an ECDSA P-256
//! certificate from an rcgen test CA, as in ../shared/design/BENCHMARKS.md. One client (this
//! program, built in release) drives every path the same way: rustls over
//!   direct: TCP to nginx;
//!   moat:   the proxy's Unix socket `<uds>_1025` + a flow header (exactly what the guest's
//!           netstack does), the proxy then checks SNI, resolves and splices;
//!   squid:  TCP to squid, `CONNECT bench.test:<port>`, then TLS through the tunnel.
//! Workloads: bulk download (MB/s), small requests on one kept-alive connection (req/s), and
//! a new TLS connection per request, one at a time (conn/s). Beside every ratio: the proxy's
//! own CPU per GB, per request and per new connection (from `/proc/<pid>/stat`).
//!
//! Needs `nginx` and `squid` (Debian: nginx-light, squid-openssl). Results: a table on stdout
//! and JSON in bench-results/egress-latest.json.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use moat_flow_header::{FlowHeader, Hostname, Transport};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::{root, run_cmd};

const HOST: &str = "bench.test";
const REPS: usize = 5;

struct Sizes {
    bulk_bytes: u64,
    /// Size of each of the 100 concurrent netstack downloads.
    chunk_bytes: u64,
    keepalive_requests: usize,
    new_conns: usize,
    /// Only the interception rows (`--intercept-only`): moat intercept, mitmproxy, direct.
    intercept_only: bool,
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    // The client must be optimised like the proxies it measures: re-run in release.
    if cfg!(debug_assertions) {
        return run_cmd(
            crate::setup::cargo()
                .current_dir(root())
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    // Only this part: the caller runs the VMM part itself.
                    "egress",
                ])
                .args(
                    args.iter()
                        .filter(|a| *a != "egress" && *a != "vmm" && *a != "broker"),
                ),
        );
    }
    let quick = args.iter().any(|a| a == "--quick");
    let intercept_only = args.iter().any(|a| a == "--intercept-only");
    let sizes = if quick {
        Sizes {
            bulk_bytes: 256 << 20,
            chunk_bytes: 4 << 20,
            keepalive_requests: 2000,
            new_conns: 100,
            intercept_only,
        }
    } else {
        Sizes {
            bulk_bytes: 1 << 30,
            chunk_bytes: 20 << 20,
            keepalive_requests: 5000,
            new_conns: 300,
            intercept_only,
        }
    };
    crate::setup::ensure(&[crate::setup::Job::Bench])?;
    run_cmd(crate::setup::cargo().current_dir(root()).args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "moat",
    ]))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(&sizes))
}

/// Kills and reaps a child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
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

/// CPU of `pid` and all its descendants (squid may fork helpers).
fn tree_cpu(pid: u32) -> f64 {
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

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..200 {
        if ready() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not come up")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path3 {
    Direct,
    Moat,
    Squid,
    /// moat intercepting TLS and injecting a credential.
    MoatIntercept,
    /// mitmproxy doing the same header injection.
    Mitm,
}

impl Path3 {
    const ALL: [Path3; 3] = [Path3::Direct, Path3::Moat, Path3::Squid];
    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Moat => "moat",
            Path3::Squid => "squid",
            Path3::MoatIntercept => "moat intercept",
            Path3::Mitm => "mitmproxy",
        }
    }
}

struct Env {
    nginx: SocketAddr,
    squid: SocketAddr,
    moat_sock: PathBuf,
    tls: tokio_rustls::TlsConnector,
    moat_pid: u32,
    squid_pid: u32,
    intercept: Option<InterceptEnv>,
}

/// The interception paths: a second moat proxy with an intercept rule and a secret, and
/// mitmdump injecting the same header.
struct InterceptEnv {
    moat_sock: PathBuf,
    moat_tls: tokio_rustls::TlsConnector,
    moat_pid: u32,
    mitm: SocketAddr,
    mitm_tls: tokio_rustls::TlsConnector,
    mitm_pid: u32,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Env {
    async fn connect(&self, path: Path3) -> Result<Box<dyn Io>> {
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
                };
                s.write_all(&header.encode()).await?;
                Box::new(s)
            }
            Path3::MoatIntercept => {
                let i = self.intercept.as_ref().context("no interception setup")?;
                let mut s = UnixStream::connect(&i.moat_sock).await?;
                let header = FlowHeader {
                    flow_id: 1,
                    transport: Transport::Tcp,
                    destination: SocketAddr::new([198, 18, 0, 1].into(), self.nginx.port()),
                    hostname: Some(Hostname::new(HOST)?),
                };
                s.write_all(&header.encode()).await?;
                let tls = i.moat_tls.connect(ServerName::try_from(HOST)?, s).await?;
                return Ok(Box::new(tls));
            }
            Path3::Mitm => {
                let i = self.intercept.as_ref().context("no interception setup")?;
                let mut s = TcpStream::connect(i.mitm).await?;
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
                let tls = i.mitm_tls.connect(ServerName::try_from(HOST)?, s).await?;
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
    fn host_header(&self, path: Path3) -> String {
        match path {
            Path3::Mitm => self.nginx.to_string(),
            _ => HOST.to_owned(),
        }
    }

    fn proxy_cpu(&self, path: Path3) -> f64 {
        match path {
            Path3::Direct => 0.0,
            Path3::Moat => cpu_seconds(self.moat_pid),
            Path3::Squid => tree_cpu(self.squid_pid),
            Path3::MoatIntercept => self
                .intercept
                .as_ref()
                .map_or(0.0, |i| cpu_seconds(i.moat_pid)),
            Path3::Mitm => self
                .intercept
                .as_ref()
                .map_or(0.0, |i| tree_cpu(i.mitm_pid)),
        }
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("connection closed in response head");
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            bail!("response head too large");
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends GET `path` and reads the whole response body; returns its length.
async fn get(s: &mut Box<dyn Io>, host: &str, path: &str, close: bool) -> Result<u64> {
    let conn = if close { "close" } else { "keep-alive" };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n").as_bytes(),
    )
    .await?;
    s.flush().await?;
    let head = read_head(s).await?;
    // A proxy's error page is not a measurement.
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("empty response"));
    }
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("response without Content-Length")?;
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            bail!("connection closed with {left} body bytes left");
        }
        left -= n as u64;
    }
    Ok(len)
}

/// One measurement: units of work done, wall seconds, proxy CPU seconds.
struct Sample {
    units: f64,
    secs: f64,
    cpu: f64,
}

async fn bulk(env: &Env, path: Path3) -> Result<Sample> {
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    let mut s = env.connect(path).await?;
    let n = get(&mut s, &env.host_header(path), "/bulk", true).await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Sample {
        units: n as f64 / 1e6,
        secs,
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

async fn keepalive(env: &Env, path: Path3, requests: usize) -> Result<Sample> {
    let mut s = env.connect(path).await?;
    let host = env.host_header(path);
    get(&mut s, &host, "/small", false).await?;
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    for i in 0..requests {
        get(&mut s, &host, "/small", false)
            .await
            .with_context(|| format!("request {i}"))?;
    }
    Ok(Sample {
        units: requests as f64,
        secs: t.elapsed().as_secs_f64(),
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

async fn new_conns(env: &Env, path: Path3, conns: usize) -> Result<Sample> {
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    for _ in 0..conns {
        let mut s = env.connect(path).await?;
        get(&mut s, &env.host_header(path), "/small", true).await?;
    }
    Ok(Sample {
        units: conns as f64,
        secs: t.elapsed().as_secs_f64(),
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn bench(sizes: &Sizes) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("moat-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = bench_in(&dir, sizes).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench_in(dir: &Path, sizes: &Sizes) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;

    // Test PKI: ECDSA P-256 (rcgen's default), like the reference nginx setup.
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
    let bulk_file = dir.join("bulk");
    std::fs::File::create(&bulk_file)?.set_len(sizes.bulk_bytes)?;

    std::fs::File::create(dir.join("chunk"))?.set_len(sizes.chunk_bytes)?;
    // nginx upstream: HTTPS for the proxy rows, plain HTTP for the netstack rows.
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

    // squid, allowing exactly CONNECT to bench.test:<nginx_port>.
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

    // moat proxy with the equivalent signed allowlist.
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

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec()))?;
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every new connection is a full handshake, as for curl run once per request: session
    // resumption would hide most of a new connection's cost (and mitmproxy mishandles
    // resumed sessions on kept-alive connections).
    client.resumption = rustls::client::Resumption::disabled();
    let env = Env {
        nginx: nginx_addr,
        squid: squid_addr,
        moat_sock,
        tls: tokio_rustls::TlsConnector::from(Arc::new(client)),
        moat_pid: moat_proxy.0.id(),
        squid_pid: squid.0.id(),
        intercept: None,
    };
    // Warm up every path once (and prove each works) before measuring.
    let passthrough_paths: &[Path3] = if sizes.intercept_only {
        &[]
    } else {
        &Path3::ALL
    };
    for &p in passthrough_paths {
        new_conns(&env, p, 3)
            .await
            .with_context(|| format!("{} path does not work", p.name()))?;
    }

    struct Row {
        name: &'static str,
        unit: &'static str,
        cpu_unit: &'static str,
        cpu_scale: f64,
        samples: Vec<Vec<Sample>>,
    }
    let mut rows = vec![
        Row {
            name: "bulk HTTPS download",
            unit: "MB/s",
            cpu_unit: "s/GB",
            cpu_scale: 1000.0,
            samples: vec![],
        },
        Row {
            name: "small requests, 1 kept-alive conn",
            unit: "req/s",
            cpu_unit: "µs/req",
            cpu_scale: 1e6,
            samples: vec![],
        },
        Row {
            name: "new TLS connection per request",
            unit: "conn/s",
            cpu_unit: "µs/conn",
            cpu_scale: 1e6,
            samples: vec![],
        },
    ];
    for row in &mut rows {
        row.samples = Path3::ALL.iter().map(|_| Vec::new()).collect();
    }
    for rep in (0..REPS).filter(|_| !sizes.intercept_only) {
        eprintln!("xtask bench: round {}/{REPS}", rep + 1);
        for (i, p) in Path3::ALL.iter().enumerate() {
            let what = |w: &str| format!("{} path, {w}", p.name());
            rows[0].samples[i].push(bulk(&env, *p).await.with_context(|| what("bulk"))?);
            rows[1].samples[i].push(
                keepalive(&env, *p, sizes.keepalive_requests)
                    .await
                    .with_context(|| what("kept-alive requests"))?,
            );
            rows[2].samples[i].push(
                new_conns(&env, *p, sizes.new_conns)
                    .await
                    .with_context(|| what("new connections"))?,
            );
        }
    }
    drop((moat_proxy, squid));
    let mut env = env;
    let intercept_rows = intercept_rows(&mut env, dir, sizes).await?;
    let ns_rows = if sizes.intercept_only {
        Vec::new()
    } else {
        netstack_rows(dir, plain_port, sizes)?
    };
    drop(nginx);

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| test | direct | moat | squid | moat CPU | squid CPU |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut json_rows = Vec::new();
    for row in rows.iter().filter(|_| !sizes.intercept_only) {
        let rate = |i: usize| median(row.samples[i].iter().map(|s| s.units / s.secs).collect());
        let cpu = |i: usize| {
            median(
                row.samples[i]
                    .iter()
                    .map(|s| s.cpu / s.units * row.cpu_scale)
                    .collect(),
            )
        };
        let (d, m, s) = (rate(0), rate(1), rate(2));
        let _ = writeln!(
            table,
            "| {} ({}) | {d:.0} (1.00) | {m:.0} ({:.2}) | {s:.0} ({:.2}) | {:.3} {} | {:.3} {} |",
            row.name,
            row.unit,
            m / d,
            s / d,
            cpu(1),
            row.cpu_unit,
            cpu(2),
            row.cpu_unit
        );
        json_rows.push(serde_json::json!({
            "test": row.name, "unit": row.unit,
            "direct": d, "moat": m, "squid": s,
            "moat_ratio": m / d, "squid_ratio": s / d,
            "moat_cpu": cpu(1), "squid_cpu": cpu(2), "cpu_unit": row.cpu_unit,
        }));
    }
    let _ = writeln!(
        table,
        "\n| interception + injection | direct | moat intercept | mitmproxy | moat CPU | mitmproxy CPU | CPU per unit, mitmproxy / moat |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in &intercept_rows {
        let _ = writeln!(
            table,
            "| {} ({}) | {:.0} (1.00) | {:.0} ({:.2}) | {:.0} ({:.3}) | {:.3} {} | {:.3} {} | {:.1}x |",
            r.name,
            r.unit,
            r.direct,
            r.moat,
            r.moat / r.direct,
            r.mitm,
            r.mitm / r.direct,
            r.moat_cpu,
            r.cpu_unit,
            r.mitm_cpu,
            r.cpu_unit,
            r.mitm_cpu / r.moat_cpu
        );
        json_rows.push(serde_json::json!({
            "test": format!("intercept: {}", r.name), "unit": r.unit,
            "direct": r.direct, "moat": r.moat, "mitmproxy": r.mitm,
            "moat_cpu": r.moat_cpu, "mitmproxy_cpu": r.mitm_cpu, "cpu_unit": r.cpu_unit,
        }));
    }
    let _ = writeln!(
        table,
        "\n| netstack test | plain loopback TCP | moat namespace (TUN, netstack, proxy) |\n| --- | --- | --- |"
    );
    for (name, d, m) in &ns_rows {
        let _ = writeln!(
            table,
            "| {name} (Gbit/s) | {d:.2} (1.00) | {m:.2} ({:.2}) |",
            m / d
        );
        json_rows.push(serde_json::json!({
            "test": name, "unit": "Gbit/s", "direct": d, "moat": m, "moat_ratio": m / d,
        }));
    }
    println!("{table}");
    let out_dir = root().join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let json = serde_json::json!({
        "bench": "egress",
        "reps": REPS,
        "bulk_bytes": sizes.bulk_bytes,
        "keepalive_requests": sizes.keepalive_requests,
        "new_conns": sizes.new_conns,
        "rows": json_rows,
    });
    // A partial run never overwrites the full run's results.
    let stem = if sizes.intercept_only {
        "egress-intercept-latest"
    } else {
        "egress-latest"
    };
    std::fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join(format!("{stem}.md")), &table)?;
    eprintln!("xtask bench: wrote bench-results/{stem}.json");
    Ok(())
}

/// Bulk throughput through the workspace's own network path (TUN, netstack, flow header,
/// egress proxy) beside plain loopback TCP, measured by curl over plain HTTP in both cases:
/// one flow, and 100 concurrent flows. Returns (test, direct Gbit/s, moat Gbit/s).
fn netstack_rows(dir: &Path, port: u16, sizes: &Sizes) -> Result<Vec<(&'static str, f64, f64)>> {
    let moat = moat_bin();
    let profile = dir.join("ns.toml");
    std::fs::write(
        &profile,
        format!(
            "version = 1\nname = \"bench-ns\"\n\n[[rules]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
             ports = [{port}]\naction = \"passthrough\"\nprotocols = [\"http\"]\ncidrs = [\"127.0.0.0/8\"]\n"
        ),
    )?;
    sign_profile(dir, &profile)?;
    // Prints the elapsed nanoseconds of the downloads.
    let one = |host: &str| {
        format!(
            "s=$(date +%s%N); curl -sf -o /dev/null http://{host}:{port}/bulk || exit 9; e=$(date +%s%N); echo $((e-s))"
        )
    };
    let many = |host: &str| {
        format!(
            "s=$(date +%s%N); seq 100 | xargs -P 100 -I{{}} curl -sf -o /dev/null http://{host}:{port}/chunk || exit 9; e=$(date +%s%N); echo $((e-s))"
        )
    };
    let run = |script: String, inside: bool| -> Result<f64> {
        let mut cmd = if inside {
            let mut c = Command::new(&moat);
            c.args(["run", "--backend", "namespace", "--profile"])
                .arg(&profile)
                .arg("--pubkey")
                .arg(dir.join("bench.pub"))
                .arg("--audit")
                .arg(dir.join("ns-audit.jsonl"))
                .args([
                    "--resolve",
                    &format!("{HOST}=127.0.0.1"),
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .env("MOAT_LOG", "error");
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let out = cmd.stderr(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("netstack bench run failed ({}): {script}", out.status);
        }
        let nanos: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("elapsed")?;
        Ok(nanos / 1e9)
    };
    let gbit = |bytes: u64, secs: f64| bytes as f64 * 8.0 / secs / 1e9;
    let (mut d1, mut m1, mut d100, mut m100) = (vec![], vec![], vec![], vec![]);
    for rep in 0..3 {
        eprintln!("xtask bench: netstack round {}/3", rep + 1);
        d1.push(gbit(sizes.bulk_bytes, run(one("127.0.0.1"), false)?));
        m1.push(gbit(sizes.bulk_bytes, run(one(HOST), true)?));
        d100.push(gbit(
            100 * sizes.chunk_bytes,
            run(many("127.0.0.1"), false)?,
        ));
        m100.push(gbit(100 * sizes.chunk_bytes, run(many(HOST), true)?));
    }
    Ok(vec![
        ("netstack: 1 flow, bulk HTTP", median(d1), median(m1)),
        (
            "netstack: 100 concurrent flows, bulk HTTP",
            median(d100),
            median(m100),
        ),
    ])
}

/// The release `moat` binary the benchmarks run.
fn moat_bin() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join("release/moat")
}

/// Signs `profile` with the bench key (made by `moat policy keygen` at setup).
fn sign_profile(dir: &Path, profile: &Path) -> Result<()> {
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
fn moat_proxy(dir: &Path, name: &str, profile: &Path) -> Command {
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

/// One interception row: medians of rate and proxy CPU per unit.
struct InterceptRow {
    name: &'static str,
    unit: &'static str,
    cpu_unit: &'static str,
    direct: f64,
    moat: f64,
    mitm: f64,
    moat_cpu: f64,
    mitm_cpu: f64,
}

fn tls_trusting(pem_path: &Path) -> Result<tokio_rustls::TlsConnector> {
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

/// Interception with credential injection: moat (intercept rule, a secret bound to the
/// upstream, injected as `Authorization: Bearer`) beside mitmdump with an addon setting the
/// same header, both verifying the upstream against the bench CA, interleaved, medians of 5.
async fn intercept_rows(env: &mut Env, dir: &Path, sizes: &Sizes) -> Result<Vec<InterceptRow>> {
    let mitmdump = crate::setup::mitmdump()?;
    let port = env.nginx.port();
    let profile = dir.join("intercept.toml");
    std::fs::write(
        &profile,
        format!(
            "version = 1\nname = \"bench-intercept\"\n\n[[rules]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
             ports = [{port}]\naction = \"intercept\"\ncidrs = [\"127.0.0.0/8\"]\n\n\
             [[secrets]]\nname = \"bench\"\nsource = {{ env = \"MOAT_BENCH_SECRET\" }}\n\
             placeholder = \"sk-moat-placeholder-bench\"\nhosts = [\"{HOST}\"]\nports = [{port}]\n\
             presentation = \"authorization_bearer\"\n"
        ),
    )?;
    sign_profile(dir, &profile)?;
    let uds = dir.join("intercept.sock");
    let moat_proxy = Guard(
        moat_proxy(dir, "intercept", &profile)
            .arg("--upstream-ca")
            .arg(dir.join("ca.pem"))
            .arg("--ca-out")
            .arg(dir.join("moat-ca.pem"))
            .env("MOAT_BENCH_SECRET", "bench-secret-value")
            .spawn()?,
    );
    let moat_sock = moat_egress::port_path(&uds, moat_egress::EGRESS_VSOCK_PORT);
    wait_for("moat intercepting proxy", || {
        moat_sock.exists() && dir.join("moat-ca.pem").exists()
    })
    .await?;

    let mitm_port = free_port()?;
    std::fs::write(
        dir.join("inject.py"),
        "def request(flow):\n    flow.request.headers[\"authorization\"] = \"Bearer bench-secret-value\"\n",
    )?;
    let confdir = dir.join("mitm");
    let mitm = Guard(
        Command::new(&mitmdump)
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

    env.intercept = Some(InterceptEnv {
        moat_sock,
        moat_tls: tls_trusting(&dir.join("moat-ca.pem"))?,
        moat_pid: moat_proxy.0.id(),
        mitm: mitm_addr,
        mitm_tls: tls_trusting(&mitm_ca)?,
        mitm_pid: mitm.0.id(),
    });
    let paths = [Path3::Direct, Path3::MoatIntercept, Path3::Mitm];
    for p in paths {
        new_conns(env, p, 3)
            .await
            .with_context(|| format!("{} path does not work", p.name()))?;
    }
    // mitmproxy is two orders of magnitude slower per request: smaller runs keep it in minutes.
    let requests = (sizes.keepalive_requests / 5).max(200);
    let conns = (sizes.new_conns / 2).max(50);
    let mut samples: Vec<Vec<Vec<Sample>>> = (0..3)
        .map(|_| paths.iter().map(|_| Vec::new()).collect())
        .collect();
    for rep in 0..REPS {
        eprintln!("xtask bench: interception round {}/{REPS}", rep + 1);
        for (i, p) in paths.iter().enumerate() {
            let what = |w: &str| format!("{} path, {w}", p.name());
            samples[0][i].push(bulk(env, *p).await.with_context(|| what("bulk"))?);
            match keepalive(env, *p, requests).await {
                Ok(sample) => samples[1][i].push(sample),
                // mitmproxy 11 resets our kept-alive connections after the first response
                // (a Python client keeps them; see docs/benchmarks.md): the row says so.
                Err(e) if *p == Path3::Mitm => {
                    eprintln!("xtask bench: mitmproxy kept-alive run failed: {e:#}");
                }
                Err(e) => return Err(e.context(what("kept-alive requests"))),
            }
            samples[2][i].push(
                new_conns(env, *p, conns)
                    .await
                    .with_context(|| what("new connections"))?,
            );
        }
    }
    drop((moat_proxy, mitm));
    env.intercept = None;
    let names = [
        ("bulk HTTPS download", "MB/s", "s/GB", 1000.0),
        ("small requests, 1 kept-alive conn", "req/s", "µs/req", 1e6),
        ("new TLS connection per request", "conn/s", "µs/conn", 1e6),
    ];
    Ok(names
        .iter()
        .zip(samples)
        .map(|((name, unit, cpu_unit, scale), s)| {
            // NaN marks a path that could not be measured (printed as NaN in the table).
            let rate = |i: usize| {
                if s[i].is_empty() {
                    return f64::NAN;
                }
                median(s[i].iter().map(|x| x.units / x.secs).collect())
            };
            let cpu = |i: usize| {
                if s[i].is_empty() {
                    return f64::NAN;
                }
                median(s[i].iter().map(|x| x.cpu / x.units * scale).collect())
            };
            InterceptRow {
                name,
                unit,
                cpu_unit,
                direct: rate(0),
                moat: rate(1),
                mitm: rate(2),
                moat_cpu: cpu(1),
                mitm_cpu: cpu(2),
            }
        })
        .collect())
}
