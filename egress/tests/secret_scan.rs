//! The suite-wide secret scan: every audit record and every byte the guest side received
//! during the suite is scanned for every secret value, and none is found.
//!
//! Every test binary built on the harness captures what its guests read and what its proxies
//! audit (harness/leak.rs), and each proxy's drop scans the whole capture so far. This binary
//! runs every attack of the intercept suite in sequence through one capture, scans it once at
//! the end, and proves the scanner can fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use harness::client::*;
use harness::leak::{self, Leak, SECRET_VALUES};
use harness::*;
use tokio::io::AsyncWriteExt;

#[test]
fn scanner_finds_a_secret_value_leaked_into_an_audit_line() {
    let line = format!(r#"{{"class_uid":4002,"message":"Bearer {SECRET_VALUE}"}}"#);
    let leaks = leak::scan("audit", line.as_bytes(), SECRET_VALUES);
    assert_eq!(
        leaks,
        vec![Leak {
            place: "audit",
            secret: 0,
            encoding: "raw",
            offset: line.find(SECRET_VALUE).unwrap(),
        }]
    );
}

#[test]
fn scanner_finds_a_secret_value_leaked_base64_encoded_at_any_alignment() {
    // As Authorization: Basic carries it, after prefixes of every length modulo 3.
    for prefix in ["", "u:", "us:", "use:"] {
        let encoded = STANDARD.encode(format!("{prefix}{SECRET_VALUE}").as_bytes());
        let body = format!("HTTP/1.1 200 OK\r\n\r\nAuthorization: Basic {encoded}");
        let leaks = leak::scan("guest", body.as_bytes(), SECRET_VALUES);
        assert!(
            leaks.iter().any(|l| l.encoding == "base64"),
            "prefix {prefix:?}: {leaks:?}"
        );
    }
}

#[test]
fn scanner_finds_nothing_in_placeholders_names_and_near_misses() {
    let near = &SECRET_VALUE[..SECRET_VALUE.len() - 1];
    let text = format!("{PLACEHOLDER} api-key secrets_injected {near}");
    assert_eq!(leak::scan("audit", text.as_bytes(), SECRET_VALUES), vec![]);
}

/// Every attack of the intercept suite, one after the other on one proxy (and one with an
/// HTTP/2 upstream), then one scan of everything the guests received and the proxies audited.
#[tokio::test]
async fn attacks_in_sequence_leave_no_secret_with_the_guest_or_in_the_audit_log() {
    let tp = TestProxy::start_unwatched().await;
    let auth = bearer(PLACEHOLDER);
    let api = "api.inject.test";
    let other = "other.inject.test";

    // Injection on the bound host, kept alive and on a pooled upstream connection.
    let mut c = client(&tp, api).await;
    for path in ["/v1/a", "/v1/b?q=1", "/redirect"] {
        send(&mut c, api, path, &[("authorization", &auth)]).await;
    }
    let (status, _) = send(&mut c, other, "/switch", &[]).await;
    assert_eq!(status, 421);
    drop(c);
    let mut c = client(&tp, api).await;
    send(&mut c, api, "/v1/again", &[("x-api-key", PLACEHOLDER)]).await;
    drop(c);

    // The placeholder sent off its host: header, query, body (split, and after the answer).
    let mut o = client(&tp, other).await;
    send(&mut o, other, "/landed", &[("authorization", &auth)]).await;
    drop(o);
    let mut o = client(&tp, other).await;
    send(&mut o, other, &format!("/q?k={PLACEHOLDER}"), &[]).await;
    drop(o);
    let (a, b) = PLACEHOLDER.split_at(7);
    raw(
        &tp,
        other,
        format!(
            "POST /paste HTTP/1.1\r\nHost: {other}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .as_bytes(),
    )
    .await;
    let mut late = tp.intercepted(other).await.unwrap();
    late.write_all(
        format!(
            "POST /early HTTP/1.1\r\nHost: {other}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{PLACEHOLDER}\r\n0\r\n\r\n",
            PLACEHOLDER.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_all(&mut late, WAIT).await;

    // Smuggling shapes, pipelining, absolute targets, upgrades, oversized heads.
    for bytes in [
        format!(
            "POST /cl-te HTTP/1.1\r\nHost: {api}\r\nContent-Length: 40\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {api}\r\n\r\n"
        ),
        format!(
            "POST /cl-cl HTTP/1.1\r\nHost: {api}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
        ),
        format!(
            "GET /p1 HTTP/1.1\r\nHost: {api}\r\n\r\nGET /p2 HTTP/1.1\r\nHost: {api}\r\n\
             Connection: close\r\n\r\n"
        ),
        format!("GET https://{other}/abs HTTP/1.1\r\nHost: {api}\r\n\r\n"),
        format!(
            "GET /ws HTTP/1.1\r\nHost: {api}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ),
        format!(
            "GET /big HTTP/1.1\r\nHost: {api}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        ),
    ] {
        raw(&tp, api, bytes.as_bytes()).await;
    }

    // HTTP/2 from the agent: injection, an :authority switch, a placeholder off its host.
    let mut h2 = h2_client(&tp, api).await;
    h2_send(&mut h2, api, "/h2/ok", &[("authorization", &auth)]).await;
    assert_eq!(h2_send(&mut h2, other, "/h2/switch", &[]).await, 421);
    drop(h2);
    let mut h2 = h2_client(&tp, other).await;
    h2_send(&mut h2, other, "/h2/off", &[("x-api-key", PLACEHOLDER)]).await;
    drop(h2);

    // Routed inference: the provider's secret, the agent's own credential dropped.
    let tls = tp
        .intercepted_at("inference.local", 443, &[b"http/1.1"])
        .await;
    let mut routed = sender_over(tls.unwrap()).await;
    send(
        &mut routed,
        "inference.local",
        "/v1/chat",
        &[("authorization", &auth)],
    )
    .await;
    drop(routed);

    // A rotated secret after a reload.
    std::fs::write(&tp.secret_file, format!("{}\n", leak::ROTATED_SECRET_VALUE)).unwrap();
    tp.rewrite_profile(&tp.profile_with("\n# rotated\n"));
    tp.proxy.reload().unwrap();
    let mut c = client(&tp, api).await;
    send(&mut c, api, "/v1/rotated", &[("authorization", &auth)]).await;
    drop(c);

    // The same attacks' HTTP/2 upstream path, on a proxy of its own.
    let h2_up = TestProxy::start_full(
        moat_egress::Limits::default(),
        vec![pki().ca.clone()],
        true,
        false,
    )
    .await;
    let mut c = client(&h2_up, api).await;
    send(&mut c, api, "/h2-upstream", &[("authorization", &auth)]).await;
    send(&mut c, api, &format!("/h2-upstream?k={PLACEHOLDER}"), &[]).await;
    drop(c);

    // Every flow closed, so every record is written.
    let seen: Vec<_> = tp.seen().into_iter().chain(h2_up.seen()).collect();
    assert!(
        seen.iter()
            .any(|s| s.authorization == vec![bearer(SECRET_VALUE)]),
        "the secret was never injected: the scan would prove nothing"
    );
    assert!(
        seen.iter()
            .any(|s| s.authorization == vec![bearer(leak::ROTATED_SECRET_VALUE)])
    );
    for p in [&tp, &h2_up] {
        wait_closed(p).await;
    }
    let (guest, audit) = leak::captured();
    assert!(
        guest > 1000 && audit > 10_000,
        "{guest} guest, {audit} audit bytes"
    );
    leak::assert_no_leak();
}

/// An HTTP/1.1 client on an intercepted TLS connection.
async fn sender_over(tls: GuestTls) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Waits until every flow the proxy opened has its Close record.
async fn wait_closed(tp: &TestProxy) {
    for _ in 0..200 {
        let records = tp.records();
        let opened = records.iter().filter(|r| r["activity_id"] == 1).count();
        let closed = records
            .iter()
            .filter(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
            .count();
        if opened == closed && tp.proxy.live_flows() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("flows still open");
}
