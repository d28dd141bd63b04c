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
//!
//! The world these tests run in (provider, broker, enrolled workspace, the person's `moat login`
//! and `ssh`) is the fixture in `common/broker.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use moat_broker::audit::Audit;
use moat_broker::config::WorkspaceName;
use moat_broker::session::Target as RevokeTarget;
use moat_broker::state::Broker;
use moat_broker_client::https::{Client, Target, roots_from_pem};
use tokio_util::sync::CancellationToken;

use common::broker::*;
use common::{text, validate_ocsf};

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
