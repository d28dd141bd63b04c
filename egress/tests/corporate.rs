//! Corporate flows: a rule whose action is `corporate` sends the flow to the host side's broker
//! connector (`CONNECT <service>:<port>\n`, answered `OK\n` or `ERR ...\n`), never to an address.
//! The connector here is a fake on a Unix socket that records each request line and then speaks
//! for the service: an SSH-like banner, then an echo. Real proxy, real sockets, one behaviour per
//! test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

const WAIT: Duration = Duration::from_secs(5);

/// The corporate rules every proxy here starts with.
const CORPORATE_RULES: &str = r#"
[[rules]]
name = "corp-git"
hosts = ["git.corp.test"]
ports = [22]
action = "corporate"
service = "git-corp"
protocols = ["tcp"]

[[rules]]
name = "corp-wiki"
hosts = ["wiki.corp.test"]
ports = [80]
action = "corporate"
service = "corp-wiki"
protocols = ["http"]
"#;

/// What the fake service says first, in the same write as the connector's `OK\n`: the proxy
/// must leave it for the agent.
const BANNER: &[u8] = b"SSH-2.0-fake-corp\r\n";

/// A fake broker connector listening on a Unix socket.
struct Connector {
    path: PathBuf,
    /// Every request line received (without its newline), in order.
    requests: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Connector {
    /// Answers every request with `answer` (in one write); after an `OK`, the service's banner
    /// in the same write, then an echo until EOF, then `bye\n`.
    async fn start(answer: &'static str) -> Connector {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    loop {
                        let Ok(b) = s.read_u8().await else { return };
                        if b == b'\n' {
                            break;
                        }
                        if line.len() == 128 {
                            return;
                        }
                        line.push(b);
                    }
                    log.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&line).into_owned());
                    let ok = answer == "OK\n";
                    let first = if ok {
                        [answer.as_bytes(), BANNER].concat()
                    } else {
                        answer.as_bytes().to_vec()
                    };
                    if s.write_all(&first).await.is_err() || !ok {
                        return;
                    }
                    let mut buf = [0u8; 4096];
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
                });
            }
        });
        Connector {
            path,
            requests,
            _dir: dir,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A proxy with the corporate rules, sending corporate flows to `connector`.
async fn proxy_to(connector: &Connector) -> TestProxy {
    TestProxy::start_corporate(Some(connector.path.clone()), CORPORATE_RULES).await
}

/// An open corporate flow to git.corp.test:22, past the service's banner.
async fn live_git_flow(tp: &TestProxy) -> GuestStream {
    let mut s = tp.named("git.corp.test", 22).await;
    let mut banner = vec![0u8; BANNER.len()];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(banner, BANNER);
    s
}

/// The refused flow's stream is closed by the proxy: reading gives EOF or an error, no bytes.
async fn assert_closed<S: tokio::io::AsyncRead + Unpin>(mut s: S) {
    let got = read_all(&mut s, WAIT).await;
    assert!(got.is_empty(), "refused flow returned bytes: {got:?}");
}

/// The record of a flow that failed (allowed, but could not be handed on) for `reason`.
async fn failed(tp: &TestProxy, reason: &str) -> serde_json::Value {
    tp.wait_record(|r| r["unmapped"]["moat"]["reason"] == reason && r["activity_id"] == 4)
        .await
}

#[tokio::test]
async fn corporate_flow_reaches_the_service_through_the_broker_connector() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = tp.named("git.corp.test", 22).await;
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    // Half-close: our EOF reaches the service, which answers "bye" on the open direction.
    s.shutdown().await.unwrap();
    let got = read_all(&mut s, WAIT).await;
    assert_eq!(got, [BANNER, b"SSH-2.0-OpenSSH_9.2\r\n", b"bye\n"].concat());
    assert_eq!(connector.requests(), ["CONNECT git-corp:22"]);
}

#[tokio::test]
async fn corporate_flow_records_the_action_and_the_service() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = tp.named("git.corp.test", 22).await;
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    read_all(&mut s, WAIT).await;
    let open = tp.wait_record(|r| r["activity_id"] == 1).await;
    assert_eq!(open["firewall_rule"]["name"], "corp-git");
    assert_eq!(open["unmapped"]["moat"]["policy_action"], "corporate");
    assert_eq!(open["dst_endpoint"]["svc_name"], "git-corp");
    assert_eq!(open["dst_endpoint"]["hostname"], "git.corp.test");
    assert_eq!(open["dst_endpoint"]["port"], 22);
    // The proxy connected to no address: the broker did.
    assert!(open["dst_endpoint"].get("ip").is_none(), "{open}");
    let close = tp.wait_record(|r| r["activity_id"] == 2).await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "finished");
    assert_eq!(close["unmapped"]["moat"]["policy_action"], "corporate");
    assert_eq!(close["dst_endpoint"]["svc_name"], "git-corp");
    assert_eq!(close["traffic"]["bytes_out"], 21);
    assert_eq!(close["traffic"]["bytes_in"], BANNER.len() + 21 + 4);
}

#[tokio::test]
async fn corporate_hostname_is_never_resolved_by_the_proxy() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = live_git_flow(&tp).await;
    s.shutdown().await.unwrap();
    read_all(&mut s, WAIT).await;
    // A passthrough flow after it: its name is resolved, so the log does record resolutions.
    let mut raw = tp.named("raw.test", tp.plain.port()).await;
    raw.shutdown().await.unwrap();
    assert_eq!(read_all(&mut raw, WAIT).await, b"bye\n");
    assert_eq!(*tp.resolved.lock().unwrap(), ["raw.test"]);
}

#[tokio::test]
async fn corporate_http_flow_sends_the_checked_request_head_after_ok() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = tp.named("wiki.corp.test", 80).await;
    let req = b"GET /index HTTP/1.1\r\nHost: wiki.corp.test\r\n\r\n";
    s.write_all(req).await.unwrap();
    s.shutdown().await.unwrap();
    let got = read_all(&mut s, WAIT).await;
    assert_eq!(got, [BANNER, req, b"bye\n"].concat());
    assert_eq!(connector.requests(), ["CONNECT corp-wiki:80"]);
}

#[tokio::test]
async fn corporate_http_flow_naming_another_host_is_refused_before_the_broker() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = tp.named("wiki.corp.test", 80).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: hr.corp.test\r\n\r\n")
        .await
        .unwrap();
    // Answered with a 403 naming the reason, by the proxy: nothing reached the broker.
    let got = String::from_utf8(read_all(&mut s, WAIT).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{got:?}");
    assert!(got.contains("reason: host_mismatch\n"), "{got:?}");
    let rec = tp.refused("host_mismatch").await;
    assert_eq!(rec["unmapped"]["moat"]["policy_action"], "corporate");
    assert!(connector.requests().is_empty());
}

#[tokio::test]
async fn host_not_in_a_corporate_rule_is_denied_as_before() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    assert_closed(tp.named("hr.corp.test", 22).await).await;
    tp.refused("no_rule").await;
    assert_closed(tp.named("git.corp.test", 443).await).await;
    tp.refused("port_not_allowed").await;
    assert!(connector.requests().is_empty());
}

#[tokio::test]
async fn broker_err_answer_refuses_the_flow_and_audits_it() {
    let connector = Connector::start("ERR 403\n").await;
    let tp = proxy_to(&connector).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    let rec = tp.refused("corporate_refused").await;
    assert_eq!(rec["unmapped"]["moat"]["blame"], "upstream");
    assert_eq!(rec["unmapped"]["moat"]["policy_action"], "corporate");
    assert_eq!(rec["dst_endpoint"]["svc_name"], "git-corp");
    assert_eq!(rec["firewall_rule"]["name"], "corp-git");
    assert_eq!(rec["disposition"], "Blocked");
    let message = rec["message"].as_str().unwrap();
    assert!(message.contains("ERR 403"), "{message}");
    assert_eq!(connector.requests(), ["CONNECT git-corp:22"]);
}

#[tokio::test]
async fn metrics_count_corporate_refusals_by_reason_and_blame() {
    let connector = Connector::start("ERR 502\n").await;
    let tp = proxy_to(&connector).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    tp.refused("corporate_refused").await;
    let body = tp.admin_get("/metrics").await;
    assert!(
        body.contains(
            "moat_egress_flows_ended_total{reason=\"corporate_refused\",blame=\"upstream\"} 1"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn connector_closing_without_an_answer_fails_the_flow() {
    let connector = Connector::start("").await;
    let tp = proxy_to(&connector).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    let rec = failed(&tp, "corporate_unavailable").await;
    assert_eq!(rec["unmapped"]["moat"]["blame"], "proxy");
    let message = rec["message"].as_str().unwrap();
    assert!(message.contains("closed without answering"), "{message}");
}

#[tokio::test]
async fn connector_answering_garbage_fails_the_flow() {
    let connector = Connector::start("HTTP/1.1 200 OK\n").await;
    let tp = proxy_to(&connector).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    let rec = failed(&tp, "corporate_unavailable").await;
    let message = rec["message"].as_str().unwrap();
    assert!(message.contains("not OK or ERR"), "{message}");
}

#[tokio::test]
async fn missing_corporate_socket_fails_the_flow() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("no-such.sock");
    let tp = TestProxy::start_corporate(Some(absent), CORPORATE_RULES).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    let rec = failed(&tp, "corporate_unavailable").await;
    assert_eq!(rec["unmapped"]["moat"]["blame"], "proxy");
    assert_eq!(rec["dst_endpoint"]["svc_name"], "git-corp");
    let message = rec["message"].as_str().unwrap();
    assert!(
        message.contains("cannot connect to the corporate egress socket"),
        "{message}"
    );
}

#[tokio::test]
async fn proxy_without_a_corporate_socket_fails_corporate_flows() {
    let tp = TestProxy::start_corporate(None, CORPORATE_RULES).await;
    assert_closed(tp.named("git.corp.test", 22).await).await;
    let rec = failed(&tp, "corporate_unavailable").await;
    let message = rec["message"].as_str().unwrap();
    assert!(
        message.contains("no corporate egress socket is configured"),
        "{message}"
    );
}

#[tokio::test]
async fn reload_that_removes_the_corporate_rule_cuts_its_live_flow() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = live_git_flow(&tp).await;
    tp.rewrite_profile(&tp.profile_with(""));
    assert_eq!(tp.proxy.reload().unwrap(), 1);
    let mut b = [0u8; 1];
    let read = tokio::time::timeout(WAIT, s.read(&mut b)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let close = tp.wait_record(|r| r["activity_id"] == 2).await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "revoked");
    assert_eq!(close["dst_endpoint"]["svc_name"], "git-corp");
    assert_eq!(close["disposition"], "Blocked");
}

#[tokio::test]
async fn reload_that_changes_the_corporate_service_cuts_its_live_flow() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let _s = live_git_flow(&tp).await;
    let moved = CORPORATE_RULES.replace("service = \"git-corp\"", "service = \"git-corp-2\"");
    tp.rewrite_profile(&tp.profile_with(&moved));
    assert_eq!(tp.proxy.reload().unwrap(), 1);
    let close = tp.wait_record(|r| r["activity_id"] == 2).await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "revoked");
}

#[tokio::test]
async fn reload_that_keeps_the_corporate_rule_keeps_its_live_flow() {
    let connector = Connector::start("OK\n").await;
    let tp = proxy_to(&connector).await;
    let mut s = live_git_flow(&tp).await;
    let renamed = tp
        .profile_with(CORPORATE_RULES)
        .replace("name = \"test\"", "name = \"test-2\"");
    tp.rewrite_profile(&renamed);
    assert_eq!(tp.proxy.reload().unwrap(), 0);
    s.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"y");
}

/// Every record of corporate flows (opened and closed, refused by the broker, failed)
/// validates against the OCSF schema.
#[tokio::test]
async fn corporate_audit_records_validate_against_the_ocsf_schema() {
    let ok = Connector::start("OK\n").await;
    let refusing = Connector::start("ERR 403\n").await;
    let tp = proxy_to(&ok).await;
    let mut s = live_git_flow(&tp).await;
    s.shutdown().await.unwrap();
    read_all(&mut s, WAIT).await;
    tp.wait_record(|r| r["activity_id"] == 2).await;
    let refused = TestProxy::start_corporate(Some(refusing.path.clone()), CORPORATE_RULES).await;
    assert_closed(refused.named("git.corp.test", 22).await).await;
    refused.refused("corporate_refused").await;
    let unconfigured = TestProxy::start_corporate(None, CORPORATE_RULES).await;
    assert_closed(unconfigured.named("git.corp.test", 22).await).await;
    failed(&unconfigured, "corporate_unavailable").await;

    let mut all = Vec::new();
    for p in [&tp, &refused, &unconfigured] {
        all.extend(std::fs::read(&p.audit_path).unwrap());
    }
    let path = tp.dir.path().join("corporate-audit.jsonl");
    std::fs::write(&path, &all).unwrap();
    let stdout = validate_ocsf(&path);
    let records = all.iter().filter(|b| **b == b'\n').count();
    // Four flow records, and each proxy's run start (Event Log Activity).
    assert_eq!(records, 4 + 3);
    assert!(
        stdout.contains(&format!("{records} valid, 0 invalid")),
        "{stdout}"
    );
}
