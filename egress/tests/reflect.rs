//! Secrets never come back: an upstream that echoes the request (the harness's `/reflect/...`
//! endpoints, over real TLS) hands the agent only the placeholder, in the head, the body and
//! the trailers, raw and encoded, over HTTP/1.1 and HTTP/2, whole or split across frames; each
//! reflection is audited as `secret_reflected`, blaming the upstream. Every byte the agents here
//! read also goes through the suite-wide secret scan (harness/leak.rs) when each proxy drops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use base64::Engine as _;
use harness::client::*;
use harness::*;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use serde_json::Value;

const API: &str = "api.inject.test";
/// What the agent sees where the secret was: the placeholder cut to the secret's length.
const SHOWN: &str = "sk-moat-placeholder-a";

/// What came back for one request.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: String,
    trailers: Option<http::HeaderMap>,
}

impl Got {
    /// Everything the agent received, as text (the reason phrase aside).
    fn text(&self) -> String {
        format!("{:?}\n{}\n{:?}", self.headers, self.body, self.trailers)
    }
}

async fn collect(resp: hyper::Response<hyper::body::Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    }
}

/// GET `path` over HTTP/1.1 on `c`, with the placeholder (the proxy injects the secret).
async fn get(c: &mut Sender, path: &str) -> Got {
    let req = Request::get(path)
        .header("host", API)
        .header("authorization", bearer(PLACEHOLDER))
        .header("accept-encoding", "gzip, br")
        .body(Empty::new())
        .unwrap();
    collect(c.send_request(req).await.unwrap()).await
}

/// As [`get`], over HTTP/2.
async fn get_h2(c: &mut H2Sender, path: &str) -> Got {
    let req = Request::get(format!("https://{API}{path}"))
        .header("authorization", bearer(PLACEHOLDER))
        .body(Empty::new())
        .unwrap();
    collect(c.send_request(req).await.unwrap()).await
}

/// The agent got no trace of the secret and the placeholder where it was.
fn assert_clean(got: &Got) {
    let text = got.text();
    assert!(!text.contains(SECRET_VALUE), "{text}");
    assert!(text.contains(SHOWN), "{text}");
}

/// The `secret_reflected` record of the request for `path`: upstream to blame, the secret
/// named (never its value), valid OCSF fields for a corrected response.
async fn reflected_record(tp: &TestProxy, path: &str) -> Value {
    let r = tp
        .wait_record(|r| {
            r["class_uid"] == 4002
                && r["http_request"]["url"]["path"] == path
                && r["unmapped"]["moat"]["reason"] == "secret_reflected"
        })
        .await;
    assert_eq!(r["unmapped"]["moat"]["blame"], "upstream", "{r}");
    assert_eq!(
        r["unmapped"]["moat"]["secrets_reflected"][0]["name"],
        "api-key"
    );
    assert_eq!(
        (&r["action"], &r["disposition"]),
        (&Value::from("Modified"), &Value::from("Corrected"))
    );
    assert!(!r.to_string().contains(SECRET_VALUE));
    r
}

/// The request's own record, written when the response ended: how many hits it carried.
async fn reflected_count(tp: &TestProxy, path: &str) -> u64 {
    let r = tp
        .wait_record(|r| {
            r["class_uid"] == 4002
                && r["http_request"]["url"]["path"] == path
                && r["traffic"].is_object()
        })
        .await;
    r["unmapped"]["moat"]["secrets_reflected"][0]["count"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_trace_like_echo_over_http1_returns_only_the_placeholder() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    let got = get(&mut c, "/reflect/head").await;
    assert_eq!(got.status, 200);
    assert!(
        got.body
            .contains(&format!("authorization: Bearer {SHOWN}\r\n")),
        "{}",
        got.body
    );
    // Same length: the Content-Length the upstream sent still frames the body.
    assert_eq!(
        got.headers["content-length"].to_str().unwrap(),
        got.body.len().to_string()
    );
    assert_clean(&got);
    reflected_record(&tp, "/reflect/head").await;
    assert_eq!(reflected_count(&tp, "/reflect/head").await, 1);
    assert!(
        tp.admin_get("/metrics")
            .await
            .contains("moat_egress_secrets_reflected_total 1")
    );
}

#[tokio::test]
async fn a_headers_endpoint_json_escaping_every_character_returns_only_the_placeholder() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    for escape in ["none", "all"] {
        let path = format!("/reflect/headers?escape={escape}");
        let got = get(&mut c, &path).await;
        let v: Value = serde_json::from_str(&got.body).unwrap();
        assert_eq!(
            v["headers"]["authorization"],
            format!("Bearer {SHOWN}"),
            "{escape}"
        );
        // Asked for identity whatever the agent accepts: only then can the body be read.
        assert_eq!(v["headers"]["accept-encoding"], "identity");
    }
    reflected_record(&tp, "/reflect/headers").await;
}

#[tokio::test]
async fn base64_at_each_alignment_and_alphabet_returns_only_the_placeholder() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    for url in ["0", "1"] {
        for k in 0..3 {
            let got = get(&mut c, &format!("/reflect/base64?k={k}&url={url}")).await;
            let encoded = got.body.strip_prefix("token=").unwrap();
            let engine = if url == "1" {
                &base64::engine::general_purpose::URL_SAFE
            } else {
                &base64::engine::general_purpose::STANDARD
            };
            let decoded = engine.decode(encoded).unwrap();
            let decoded = String::from_utf8_lossy(&decoded);
            assert!(!decoded.contains(SECRET_VALUE), "{decoded}");
            assert!(decoded.contains("moat-placeholder-"), "k={k}: {decoded}");
        }
    }
    reflected_record(&tp, "/reflect/base64").await;
}

#[tokio::test]
async fn percent_encoding_set_cookie_location_and_the_reason_phrase_are_cleaned() {
    let tp = TestProxy::start().await;
    // A raw client: the reason phrase as the agent reads it.
    let mut tls = tp.intercepted(API).await.unwrap();
    let head = format!(
        "GET /reflect/percent?case=lower HTTP/1.1\r\nHost: {API}\r\n\
         Authorization: Bearer {PLACEHOLDER}\r\nConnection: close\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tls, head.as_bytes())
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_all(&mut tls, WAIT).await).into_owned();
    let lower: String = SECRET_VALUE.bytes().map(|b| format!("%{b:02x}")).collect();
    let shown: String = SHOWN.bytes().map(|b| format!("%{b:02x}")).collect();
    assert!(
        !answer.contains(SECRET_VALUE) && !answer.contains(&lower),
        "{answer}"
    );
    assert!(
        answer.starts_with(&format!("HTTP/1.1 200 OK {SHOWN}\r\n")),
        "{answer}"
    );
    assert!(
        answer.contains(&format!("set-cookie: session={SHOWN}; Secure")),
        "{answer}"
    );
    assert!(
        answer.contains(&format!("location: /cb?token={shown}")),
        "{answer}"
    );
    assert!(answer.ends_with(&format!("/cb?token={shown}")), "{answer}");
    let r = reflected_record(&tp, "/reflect/percent").await;
    assert!(
        r["message"].as_str().unwrap().contains("response headers"),
        "{r}"
    );
    // Three hits in the head (reason, Location, Set-Cookie), one in the body.
    assert_eq!(reflected_count(&tp, "/reflect/percent").await, 4);
}

#[tokio::test]
async fn an_echo_split_across_chunks_at_every_size_returns_only_the_placeholder() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    for n in [1, 7, 16, 64] {
        let got = get(&mut c, &format!("/reflect/split?n={n}")).await;
        assert!(
            got.body
                .contains(&format!("authorization: Bearer {SHOWN}\r\n")),
            "n={n}: {}",
            got.body
        );
        assert_clean(&got);
    }
    reflected_record(&tp, "/reflect/split").await;
}

#[tokio::test]
async fn server_sent_events_cut_mid_secret_return_only_the_placeholder_in_order() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    let got = get(&mut c, "/reflect/sse").await;
    assert_eq!(
        got.body,
        format!("data: start\n\ndata: {{\"echo\":\"{SHOWN}\"}}\n\ndata: end\n\n")
    );
    reflected_record(&tp, "/reflect/sse").await;
}

#[tokio::test]
async fn http2_both_ways_body_and_trailers_return_only_the_placeholder() {
    let tp = TestProxy::start_full(
        moat_egress::Limits::default(),
        vec![pki().ca.clone()],
        true,
        false,
    )
    .await;
    let mut c = h2_client(&tp, API).await;
    let got = get_h2(&mut c, "/reflect/split?n=5").await;
    assert!(got.body.contains(SHOWN), "{}", got.body);
    assert_clean(&got);
    let got = get_h2(&mut c, "/reflect/trailers").await;
    assert_eq!(got.body, "trailers follow");
    assert_eq!(got.trailers.as_ref().unwrap()["x-echo"], SHOWN);
    let r = reflected_record(&tp, "/reflect/trailers").await;
    assert!(
        r["message"].as_str().unwrap().contains("response trailers"),
        "{r}"
    );
}

#[tokio::test]
async fn a_compressed_response_on_a_scanned_connection_is_refused_not_passed_unread() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    let got = get(&mut c, "/reflect/gzip").await;
    assert_eq!(got.status, 502);
    assert!(got.body.contains("response_encoded"), "{}", got.body);
    let r = tp
        .wait_record(|r| r["unmapped"]["moat"]["reason"] == "response_encoded")
        .await;
    assert_eq!(r["unmapped"]["moat"]["blame"], "upstream");
}

#[tokio::test]
async fn a_connection_that_injected_nothing_is_passed_through_as_it_came() {
    let tp = TestProxy::start().await;
    // other.inject.test has no secret bound: nothing was sent, nothing is scanned for.
    let mut c = client(&tp, "other.inject.test").await;
    let req = Request::get("/reflect/headers?escape=none")
        .header("host", "other.inject.test")
        .header("accept-encoding", "gzip")
        .body(Empty::new())
        .unwrap();
    let got = collect(c.send_request(req).await.unwrap()).await;
    let v: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(v["headers"]["accept-encoding"], "gzip");
}

#[tokio::test]
async fn reflection_records_validate_against_the_ocsf_schema() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, API).await;
    get(&mut c, "/reflect/head").await;
    get(&mut c, "/reflect/gzip").await;
    reflected_record(&tp, "/reflect/head").await;
    reflected_count(&tp, "/reflect/head").await;
    validate_ocsf(&tp.audit_path);
}

/// The control: with the scan off, the same echo hands the agent the secret itself (read on a
/// connection the suite's capture does not see). The tests above pass because of the scan.
#[tokio::test]
async fn without_the_scan_the_echo_hands_the_agent_the_secret() {
    let tp = TestProxy::start_with(moat_egress::Limits {
        scan_responses: false,
        ..moat_egress::Limits::default()
    })
    .await;
    let untapped = tp.intercepted(API).await.unwrap().0;
    let (mut c, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(untapped))
            .await
            .unwrap();
    tokio::spawn(conn);
    let got = get(&mut c, "/reflect/head").await;
    assert!(got.body.contains(SECRET_VALUE));
}
