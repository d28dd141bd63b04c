//! The tunnel alone, at scale: the broker's tunnel registry and a workspace host's connector over
//! real TLS (a workspace certificate from the broker's PKI, HTTP/2), and an echo service behind
//! the workspace's vsock Unix-socket convention. No identity provider: these tests are about the
//! tunnel's streams, not about who may open them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_broker::config::WorkspaceName;
use moat_broker::pki::Pki;
use moat_broker::tunnel::registry::{Sever, Tunnels};
use moat_broker_client::tunnel::connector::{Connector, ConnectorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

/// A guest that accepts `CONNECT 22` and echoes.
fn echo_guest(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut line = Vec::new();
                loop {
                    let b = stream.read_u8().await.unwrap();
                    if b == b'\n' {
                        break;
                    }
                    line.push(b);
                }
                assert_eq!(line, b"CONNECT 22");
                stream.write_all(b"OK 1\n").await.unwrap();
                let (mut rd, mut wr) = stream.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
}

/// A tunnel for `ws1` between an in-process registry and connector.
async fn tunnel(dir: &Path) -> (Arc<Tunnels>, WorkspaceName, CancellationToken) {
    let pki = Pki::load_or_create(&dir.join("state"), &["127.0.0.1".to_owned()]).unwrap();
    let ws = WorkspaceName::try_from("ws1").unwrap();
    let uds = dir.join("ws1.vsock");
    echo_guest(&uds);
    let tunnels = Arc::new(Tunnels::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.tunnel_server_config().unwrap());
    let stop = CancellationToken::new();
    {
        let (tunnels, ws, stop) = (Arc::clone(&tunnels), ws.clone(), stop.clone());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let sever = Sever::new(&tcp).unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let _ = tunnels.serve(tls, sever, ws, stop).await;
        });
    }
    let enrolment = pki.enrol(&ws).unwrap();
    let connector = Connector::new(ConnectorConfig {
        broker: addr.to_string(),
        server_name: "127.0.0.1".into(),
        cert_pem: enrolment.cert_pem,
        key_pem: enrolment.key_pem,
        broker_ca_pem: enrolment.broker_ca_pem,
        uds,
        ports: vec![22],
        egress_uds: None,
    })
    .unwrap();
    let connector_stop = stop.clone();
    tokio::spawn(async move { connector.run(connector_stop).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tunnels.is_connected(&ws) {
        assert!(Instant::now() < deadline, "tunnel never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (tunnels, ws, stop)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Enough file descriptors for `n` sessions (each holds a socket pair on the guest side).
fn raise_fd_limit(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(n.max(soft)), hard).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tunnel_holds_a_thousand_concurrent_sessions_in_bounded_memory() {
    const SESSIONS: u32 = 1000;
    raise_fd_limit(4 * u64::from(SESSIONS) + 256);
    let dir = tempfile::tempdir().unwrap();
    let (tunnels, ws, stop) = tunnel(dir.path()).await;
    let before = rss_kib();
    let started = Instant::now();

    let mut open = Vec::with_capacity(SESSIONS as usize);
    for i in 0..SESSIONS {
        let mut stream = hyper_util::rt::TokioIo::new(tunnels.open(&ws, 22).await.unwrap());
        let msg = format!("session {i}\n");
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
        open.push(stream);
    }
    let took = started.elapsed();
    let grown = rss_kib().saturating_sub(before);
    eprintln!(
        "{SESSIONS} concurrent tunnelled sessions: opened in {took:?} ({:?} each), \
         {grown} KiB more resident memory ({} KiB per session, both tunnel ends and the guest)",
        took / SESSIONS,
        grown / u64::from(SESSIONS)
    );

    // For `cargo xtask bench broker`: the figures as JSON too.
    if let Some(dir) = std::env::var_os("MOAT_BENCH_DIR") {
        let json = serde_json::json!({
            "bench": "broker tunnel: concurrent sessions on one tunnel (release)",
            "sessions": SESSIONS,
            "open_each_us": u64::try_from((took / SESSIONS).as_micros()).unwrap_or(u64::MAX),
            "resident_kib_per_session": grown / u64::from(SESSIONS),
        });
        std::fs::write(
            std::path::Path::new(&dir).join("broker-tunnel-latest.json"),
            serde_json::to_string_pretty(&json).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(open.len(), SESSIONS as usize);
    assert!(
        grown / (SESSIONS as u64) < 256,
        "{grown} KiB for {SESSIONS} sessions"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_tunnel_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (tunnels, ws, _stop) = tunnel(dir.path()).await;
    let mut stream = hyper_util::rt::TokioIo::new(tunnels.open(&ws, 22).await.unwrap());

    assert!(tunnels.disconnect(&ws));
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;

    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_side_refuses_a_port_it_was_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let (tunnels, ws, _stop) = tunnel(dir.path()).await;

    let err = tunnels.open(&ws, 2375).await.unwrap_err();

    assert!(err.to_string().contains("refused the stream (403"), "{err}");
}

/// A broker's tunnel side: accepts tunnels on `listener` for any enrolled workspace until `stop`.
fn serve_tunnels(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => r.unwrap(),
                () = stop.cancelled() => return,
            };
            let (acceptor, tunnels, stop) = (acceptor.clone(), Arc::clone(&tunnels), stop.clone());
            tokio::spawn(async move {
                let sever = Sever::new(&tcp).unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let ws = moat_broker::pki::workspace_of(&cert).unwrap();
                let _ = tunnels.serve(tls, sever, ws, stop).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_workspaces_under_load_come_back_after_a_broker_restart_and_their_sessions_do_not() {
    const WORKSPACES: usize = 50;
    const STREAMS_EACH: usize = 4;
    raise_fd_limit(4096);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(&dir.path().join("state"), &["127.0.0.1".to_owned()]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.tunnel_server_config().unwrap());
    let uds = dir.path().join("guest.vsock");
    echo_guest(&uds);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tunnels, stop) = (Arc::new(Tunnels::default()), CancellationToken::new());
    serve_tunnels(
        listener,
        acceptor.clone(),
        Arc::clone(&tunnels),
        stop.clone(),
    );
    let names: Vec<WorkspaceName> = (0..WORKSPACES)
        .map(|i| WorkspaceName::try_from(format!("ws{i}").as_str()).unwrap())
        .collect();
    let hosts = CancellationToken::new();
    for ws in &names {
        let enrolment = pki.enrol(ws).unwrap();
        let connector = Connector::new(ConnectorConfig {
            broker: addr.to_string(),
            server_name: "127.0.0.1".into(),
            cert_pem: enrolment.cert_pem,
            key_pem: enrolment.key_pem,
            broker_ca_pem: enrolment.broker_ca_pem,
            uds: uds.clone(),
            ports: vec![22],
            egress_uds: None,
        })
        .unwrap();
        let hosts = hosts.clone();
        tokio::spawn(async move { connector.run(hosts).await });
    }
    let all_up = |tunnels: &Tunnels| names.iter().all(|ws| tunnels.is_connected(ws));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !all_up(&tunnels) {
        assert!(Instant::now() < deadline, "not every workspace connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut live = Vec::new();
    for ws in &names {
        for _ in 0..STREAMS_EACH {
            let mut s = hyper_util::rt::TokioIo::new(tunnels.open(ws, 22).await.unwrap());
            s.write_all(b"ping\n").await.unwrap();
            let mut back = [0u8; 5];
            s.read_exact(&mut back).await.unwrap();
            live.push(s);
        }
    }

    // The broker goes away under that load, and comes back a second later on the same address.
    stop.cancel();
    drop(tunnels);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let restarted = Instant::now();
    let (tunnels, stop) = (Arc::new(Tunnels::default()), CancellationToken::new());
    serve_tunnels(listener, acceptor, Arc::clone(&tunnels), stop.clone());
    let deadline = Instant::now() + Duration::from_secs(40);
    while !all_up(&tunnels) {
        assert!(Instant::now() < deadline, "not every workspace came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back_in = restarted.elapsed();
    eprintln!(
        "broker restart under load ({} live sessions on {WORKSPACES} workspaces): every tunnel \
         back {back_in:?} after the broker",
        live.len()
    );

    for mut old in live {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), old.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a session survived: {r:?}"
        );
    }
    for ws in &names {
        let mut s = hyper_util::rt::TokioIo::new(tunnels.open(ws, 22).await.unwrap());
        s.write_all(b"pong\n").await.unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong\n");
    }
    hosts.cancel();
    stop.cancel();
}

/// A broker configuration with `ws1` (the tunnel tests need only its workspaces).
fn config_with_ws1(dir: &Path) -> moat_broker::config::Config {
    let config: moat_broker::config::Config = toml::from_str(&format!(
        r#"
listen = "127.0.0.1:0"
tunnel_listen = "127.0.0.1:0"
public_url = "https://broker.test"
server_names = ["127.0.0.1"]
state_dir = "{d}/state"
admin_socket = "{d}/admin.sock"

[oidc]
issuer = "https://idp.test"
client_id = "moat-broker"
client_secret_file = "{d}/secret"

[[workspaces]]
name = "ws1"
groups = ["eng"]
"#,
        d = dir.display()
    ))
    .unwrap();
    config.check().unwrap();
    config
}

/// A connector for `enrolment` to the broker at `addr`, kept up until `stop`.
fn connect(
    addr: std::net::SocketAddr,
    enrolment: moat_broker::pki::Enrolment,
    uds: &Path,
) -> CancellationToken {
    let connector = Connector::new(ConnectorConfig {
        broker: addr.to_string(),
        server_name: "127.0.0.1".into(),
        cert_pem: enrolment.cert_pem,
        key_pem: enrolment.key_pem,
        broker_ca_pem: enrolment.broker_ca_pem,
        uds: uds.to_owned(),
        ports: vec![22],
        egress_uds: None,
    })
    .unwrap();
    let stop = CancellationToken::new();
    let run = stop.clone();
    tokio::spawn(async move { connector.run(run).await });
    stop
}

async fn wait_connected(tunnels: &Tunnels, ws: &WorkspaceName, connected: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnels.is_connected(ws) != connected {
        assert!(Instant::now() < deadline, "ws1 connected: {}", !connected);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_certificate_stays_revoked_when_its_workspace_is_allowed_again() {
    use moat_broker::session::{Sessions, Target, Unrevoke};
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config_with_ws1(dir.path()));
    let pki = Pki::load_or_create(&config.state_dir, &config.server_names).unwrap();
    let sessions = Arc::new(
        Sessions::new(
            Duration::from_secs(60),
            moat_broker::session::schedule::Schedule::new(Duration::from_secs(60)),
            Some(config.state_dir.join("revoked.json")),
        )
        .unwrap(),
    );
    let ws = WorkspaceName::try_from("ws1").unwrap();
    let uds = dir.path().join("ws1.vsock");
    echo_guest(&uds);
    // The broker's tunnel listener, admitting each connection as `moat-broker serve` does, and
    // reporting every refusal.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.tunnel_server_config().unwrap());
    let tunnels = Arc::new(Tunnels::default());
    let (refusals, mut refused) = tokio::sync::mpsc::unbounded_channel::<String>();
    {
        let (tunnels, config, sessions) = (
            Arc::clone(&tunnels),
            Arc::clone(&config),
            Arc::clone(&sessions),
        );
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, tunnels, config, sessions, refusals) = (
                    acceptor.clone(),
                    Arc::clone(&tunnels),
                    Arc::clone(&config),
                    Arc::clone(&sessions),
                    refusals.clone(),
                );
                tokio::spawn(async move {
                    let sever = Sever::new(&tcp).unwrap();
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    match moat_broker::serve::admit_tunnel(&config, &sessions, cert) {
                        Ok(ws) => {
                            let _ = tunnels
                                .serve(tls, sever, ws, CancellationToken::new())
                                .await;
                        }
                        Err(why) => {
                            let _ = refusals.send(why);
                        }
                    }
                });
            }
        });
    }
    // The workspace is enrolled and connects; someone keeps a copy of its certificate and key.
    let stolen = pki.enrol(&ws).unwrap();
    let stolen_serial = stolen.serial.clone();
    let thief = connect(addr, stolen, &uds);
    wait_connected(&tunnels, &ws, true).await;

    // Revoked (as `POST /v1/revoke {"workspace"}` does), enrolled again, allowed again.
    sessions.revoke(&Target::Workspace(ws.clone())).unwrap();
    let revoked = sessions
        .revoke_certificates(pki.issued_to(&ws).unwrap())
        .unwrap();
    assert!(tunnels.disconnect(&ws));
    assert_eq!(revoked, 1);
    let renewed = pki.enrol(&ws).unwrap();
    assert!(sessions.unrevoke(&Unrevoke::Workspace(ws.clone())).unwrap());

    // The old certificate keeps dialling and is refused, by its serial.
    let why = loop {
        let why = tokio::time::timeout(Duration::from_secs(10), refused.recv())
            .await
            .expect("the old certificate never came back")
            .unwrap();
        if why.contains("certificate") {
            break why;
        }
    };
    assert!(
        why.contains(&format!(
            "certificate {stolen_serial} of workspace ws1 revoked"
        )),
        "{why}"
    );
    assert!(!tunnels.is_connected(&ws));
    thief.cancel();
    // The certificate issued after the revocation works.
    let host = connect(addr, renewed, &uds);
    wait_connected(&tunnels, &ws, true).await;
    let mut stream = hyper_util::rt::TokioIo::new(tunnels.open(&ws, 22).await.unwrap());
    stream.write_all(b"back\n").await.unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"back\n");
    host.cancel();
}
