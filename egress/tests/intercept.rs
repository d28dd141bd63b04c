//! In-process integration tests of credential injection: a real proxy, the workspace CA, a
//! real HTTPS upstream (hyper + rustls) that records what it received. One behaviour per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::client::*;
use harness::*;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use moat_egress::Limits;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn placeholder_becomes_the_secret_on_its_bound_host() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let (status, body) = send(
        &mut c,
        "api.inject.test",
        "/v1/models",
        &[("authorization", &bearer(PLACEHOLDER))],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "ok /v1/models"));
    assert_eq!(tp.seen()[0].authorization, vec![bearer(SECRET_VALUE)]);
}

#[tokio::test]
async fn agents_own_credentials_for_a_bound_host_are_replaced() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(
        &mut c,
        "api.inject.test",
        "/v1/models",
        &[
            ("authorization", "Bearer agent-own-token"),
            ("x-api-key", "agent-key"),
        ],
    )
    .await;
    let seen = &tp.seen()[0];
    assert_eq!(seen.authorization, vec![bearer(SECRET_VALUE)]);
    assert_eq!(seen.x_api_key, None);
}

#[tokio::test]
async fn secret_is_injected_when_the_agent_sends_no_credential() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/models", &[]).await;
    assert_eq!(tp.seen()[0].authorization, vec![bearer(SECRET_VALUE)]);
}

#[tokio::test]
async fn placeholder_sent_to_an_unbound_intercepted_host_is_refused_and_audited() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "other.inject.test").await;
    let (status, _) = send(
        &mut c,
        "other.inject.test",
        "/collect",
        &[("authorization", &bearer(PLACEHOLDER))],
    )
    .await;
    assert_eq!(status, 403);
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/collect").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "placeholder_unbound");
    assert_eq!(rec["unmapped"]["moat"]["blame"], "agent");
    assert_eq!(rec["disposition"], "Blocked");
    assert_eq!(rec["firewall_rule"]["name"], "other-api");
}

#[tokio::test]
async fn placeholder_hidden_in_the_query_to_an_unbound_host_is_refused() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "other.inject.test").await;
    let path = format!("/collect?k={PLACEHOLDER}");
    let (status, _) = send(&mut c, "other.inject.test", &path, &[]).await;
    assert_eq!(status, 403);
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn placeholder_in_plain_http_to_a_passthrough_host_is_refused() {
    let tp = TestProxy::start().await;
    let mut s = tp.named("allowed.test", tp.plain.port()).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: allowed.test:{}\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n",
        tp.plain.port()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The echo upstream would send the request back had it been forwarded: the proxy's 403
    // comes instead.
    let got = String::from_utf8(read_all(&mut s, WAIT).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{got:?}");
    assert!(!got.contains(PLACEHOLDER), "{got:?}");
    let rec = tp.refused("placeholder_unbound").await;
    assert_eq!(rec["firewall_rule"]["name"], "allowed");
}

#[tokio::test]
async fn placeholder_split_across_body_chunks_to_an_unbound_host_is_refused() {
    let tp = TestProxy::start().await;
    let (a, b) = PLACEHOLDER.split_at(10);
    let req = format!(
        "POST /paste HTTP/1.1\r\nHost: other.inject.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let got = raw(&tp, "other.inject.test", req.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/paste").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "placeholder_unbound");
}

#[tokio::test]
async fn redirect_to_another_host_never_carries_the_secret() {
    let tp = TestProxy::start().await;
    let auth = bearer(PLACEHOLDER);
    let mut c = client(&tp, "api.inject.test").await;
    let (status, _) = send(
        &mut c,
        "api.inject.test",
        "/redirect",
        &[("authorization", &auth)],
    )
    .await;
    // The proxy does not follow the redirect; an agent that follows it with the placeholder
    // opens a new flow to a host the secret is not bound to.
    let mut o = client(&tp, "other.inject.test").await;
    let (followed, _) = send(
        &mut o,
        "other.inject.test",
        "/landed",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!((status, followed), (302, 403));
    let paths: Vec<_> = tp.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/redirect"]);
}

#[tokio::test]
async fn host_switch_on_a_kept_alive_connection_is_refused() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let (first, _) = send(&mut c, "api.inject.test", "/one", &[]).await;
    let (second, _) = send(&mut c, "other.inject.test", "/two", &[]).await;
    assert_eq!((first, second), (200, 421));
    let paths: Vec<_> = tp.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/one"]);
    let rec = http_record(&tp, "/two").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "authority_mismatch");
}

#[tokio::test]
async fn absolute_uri_for_another_host_is_refused() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"GET https://other.inject.test/x HTTP/1.1\r\nHost: api.inject.test\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 421"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn pipelined_requests_each_get_the_secret_in_order() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"GET /a HTTP/1.1\r\nHost: api.inject.test\r\n\r\n\
          GET /b HTTP/1.1\r\nHost: api.inject.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        got.find("ok /a").unwrap() < got.find("ok /b").unwrap(),
        "{got}"
    );
    let seen = tp.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.authorization == vec![bearer(SECRET_VALUE)])
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /first HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 40\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: api.inject.test\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(!got.contains("ok /"), "{got}");
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/first").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "ambiguous_framing");
    assert_eq!(rec["unmapped"]["moat"]["blame"], "agent");
}

#[tokio::test]
async fn transfer_encoding_before_content_length_is_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /first HTTP/1.1\r\nHost: api.inject.test\r\nTransfer-Encoding: chunked\r\n\
          Content-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn smuggling_request_after_a_clean_one_on_a_kept_alive_connection_is_refused() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /clean HTTP/1.1\r\nHost: api.inject.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          4\r\nbody\r\n0\r\n\r\n\
          POST /smuggler HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 3\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(got.contains("ok /clean"), "{got}");
    assert!(got.contains("HTTP/1.1 400"), "{got}");
    let paths: Vec<_> = tp.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/clean"]);
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /x HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn repeated_equal_content_lengths_are_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /x HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn signed_content_length_is_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /x HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: +3\r\n\r\nabc",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn transfer_encoding_other_than_chunked_is_refused_with_400() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /x HTTP/1.1\r\nHost: api.inject.test\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn oversized_request_head_is_refused_with_431() {
    let tp = TestProxy::start().await;
    let big = "a".repeat(100 * 1024);
    let req = format!("GET /x HTTP/1.1\r\nHost: api.inject.test\r\nX-Big: {big}\r\n\r\n");
    let got = raw(&tp, "api.inject.test", req.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn upgrade_requests_are_not_forwarded() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"GET /ws HTTP/1.1\r\nHost: api.inject.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 501"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn trace_and_track_to_an_intercepted_host_are_refused_and_never_carry_the_secret() {
    let tp = TestProxy::start().await;
    // The upstream would answer with the request it received: the injected secret included.
    for method in ["TRACE", "TRACK", "trace"] {
        let req = format!(
            "{method} /echo-{method} HTTP/1.1\r\nHost: api.inject.test\r\n\
             Authorization: Bearer {PLACEHOLDER}\r\n\r\n"
        );
        let got = raw(&tp, "api.inject.test", req.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 501"), "{method}: {got}");
        assert!(!got.contains(SECRET_VALUE), "{method}: {got}");
        let record = http_record(&tp, &format!("/echo-{method}")).await;
        assert_eq!(
            record["unmapped"]["moat"]["reason"], "request_refused",
            "{record}"
        );
    }
    assert!(tp.seen().is_empty(), "{:?}", tp.seen());
}

/// Restarts `tp`'s profile with its secret bound to the `/v1/` prefix only.
fn bind_secret_to_v1(tp: &TestProxy) {
    let rules = intercept_rules(tp.http.port(), &tp.secret_file).replace(
        "presentation = \"authorization_bearer\"",
        "paths = [\"/v1/\"]\npresentation = \"authorization_bearer\"",
    );
    tp.rewrite_profile(&profile_text(tp.tls.port(), tp.plain.port(), &rules));
    tp.proxy.reload().unwrap();
}

#[tokio::test]
async fn paths_that_walk_out_of_a_secrets_prefix_are_refused_and_never_carry_the_secret() {
    let tp = TestProxy::start().await;
    bind_secret_to_v1(&tp);
    for path in [
        "/v1/..;/admin",
        "/v1/%252e%252e/admin",
        "/v1/..%2fadmin",
        "/v1/%c0%ae%c0%ae/admin",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: api.inject.test\r\n\
             Authorization: Bearer {PLACEHOLDER}\r\n\r\n"
        );
        let got = raw(&tp, "api.inject.test", req.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{path}: {got}");
    }
    assert!(tp.seen().is_empty(), "{:?}", tp.seen());
}

#[tokio::test]
async fn the_upstream_is_sent_the_normalised_path_the_prefix_matched() {
    let tp = TestProxy::start().await;
    bind_secret_to_v1(&tp);
    let mut c = client(&tp, "api.inject.test").await;
    // Dot segments (encoded or not) resolved once, by the proxy: the upstream routes the path
    // the prefix was matched against, never the raw one.
    let (status, _) = send(&mut c, "api.inject.test", "/x/%2E%2e/v1/models", &[]).await;
    assert_eq!(status, 200);
    let (status, _) = send(&mut c, "api.inject.test", "/v1/../admin", &[]).await;
    assert_eq!(status, 200);
    let seen = tp.seen();
    assert_eq!(seen[0].path, "/v1/models");
    assert_eq!(seen[0].authorization, vec![bearer(SECRET_VALUE)]);
    assert_eq!(seen[1].path, "/admin");
    assert!(seen[1].authorization.is_empty(), "{:?}", seen[1]);
}

/// Gives `tp`'s rule "api" HTTP rules: `/v1/admin/**` denied by name, GET under `/v1/` (query
/// keys among `page`) allowed, everything else denied by the default.
fn with_http_rules(tp: &TestProxy) {
    let rules = intercept_rules(tp.http.port(), &tp.secret_file).replace(
        "\n[[rules]]\nname = \"other-api\"",
        "\n[rules.http]\ndefault = \"deny\"\n\n[[rules.http.requests]]\nname = \"no-admin\"\n\
         paths = [\"/v1/admin/**\"]\naction = \"deny\"\n\n[[rules.http.requests]]\n\
         name = \"read-v1\"\nmethods = [\"GET\"]\npaths = [\"/v1/**\"]\nquery = [\"page\"]\n\
         action = \"allow\"\n\n[[rules]]\nname = \"other-api\"",
    );
    tp.rewrite_profile(&profile_text(tp.tls.port(), tp.plain.port(), &rules));
    tp.proxy.reload().unwrap();
}

#[tokio::test]
async fn http_rule_allows_a_matching_get_and_the_record_names_it() {
    let tp = TestProxy::start().await;
    with_http_rules(&tp);
    let mut c = client(&tp, "api.inject.test").await;
    let (status, body) = send(&mut c, "api.inject.test", "/v1/models?page=2", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok /v1/models"));
    assert_eq!(tp.seen()[0].authorization, vec![bearer(SECRET_VALUE)]);
    let rec = http_record(&tp, "/v1/models").await;
    assert_eq!(rec["unmapped"]["moat"]["http_rule"], "read-v1", "{rec}");
    assert_eq!(rec["disposition"], "Allowed");
    assert_eq!(rec["firewall_rule"]["name"], "api");
}

#[tokio::test]
async fn http_rule_default_denies_a_post_with_a_403_that_never_reaches_the_upstream() {
    let tp = TestProxy::start().await;
    with_http_rules(&tp);
    let req = format!(
        "POST /v1/models HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 2\r\n\
         Authorization: Bearer {PLACEHOLDER}\r\n\r\n{{}}"
    );
    let got = raw(&tp, "api.inject.test", req.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(got.contains("text/plain"), "{got}");
    assert!(
        got.contains("http_rule_denied") && got.contains("default of rule \"api\""),
        "{got}"
    );
    assert!(!got.contains(SECRET_VALUE));
    assert!(tp.seen().is_empty(), "{:?}", tp.seen());
    let rec = http_record(&tp, "/v1/models").await;
    let moat = &rec["unmapped"]["moat"];
    assert_eq!(
        (moat["reason"].as_str(), moat["http_rule"].as_str()),
        (Some("http_rule_denied"), Some("default")),
        "{rec}"
    );
    assert_eq!(rec["disposition"], "Blocked");
    assert_eq!(rec["http_response"]["code"], 403);
}

#[tokio::test]
async fn http_rule_that_denies_is_named_in_the_403_and_the_record() {
    let tp = TestProxy::start().await;
    with_http_rules(&tp);
    let mut c = client(&tp, "api.inject.test").await;
    let (status, body) = send(&mut c, "api.inject.test", "/v1/admin/users", &[]).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("HTTP rule \"no-admin\" of rule \"api\""),
        "{body}"
    );
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/v1/admin/users").await;
    assert_eq!(rec["unmapped"]["moat"]["http_rule"], "no-admin", "{rec}");
}

#[tokio::test]
async fn http_rules_match_the_normalised_path_and_listed_query_keys_only() {
    let tp = TestProxy::start().await;
    with_http_rules(&tp);
    for (target, want) in [
        ("/v1/../admin", "403"),
        ("/v1/%2e%2e/admin", "403"),
        ("/v1/x/../admin/users", "403"),
        ("/v1/models?admin=1", "403"),
        ("/v1/..;/admin", "400"),
        ("/v1/%252e%252e/admin", "400"),
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: api.inject.test\r\n\r\n");
        let got = raw(&tp, "api.inject.test", req.as_bytes()).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {want}")),
            "{target}: {got}"
        );
    }
    assert!(tp.seen().is_empty(), "{:?}", tp.seen());
    // Allowed in its normal form, which is what the upstream is sent.
    let mut c = client(&tp, "api.inject.test").await;
    let (status, _) = send(&mut c, "api.inject.test", "/x/%2E%2e/v1/models", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(tp.seen()[0].path, "/v1/models");
}

#[tokio::test]
async fn reloaded_http_rules_decide_the_next_request_on_an_open_connection() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let (status, _) = send(&mut c, "api.inject.test", "/v2/models", &[]).await;
    assert_eq!(status, 200);
    // The rule still allows the flow, so the reload does not cut it; its requests are now
    // decided by the new HTTP rules.
    with_http_rules(&tp);
    let (status, body) = send(&mut c, "api.inject.test", "/v2/models", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(tp.seen().len(), 1);
}

#[tokio::test]
async fn an_open_flow_follows_the_rule_that_decides_it_after_a_reload() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    assert_eq!(send(&mut c, "api.inject.test", "/v1/a", &[]).await.0, 200);
    // Renamed, with HTTP rules: the flow is still intercepted (not cut), and its next request
    // is decided by the renamed rule's HTTP rules.
    let rules = intercept_rules(tp.http.port(), &tp.secret_file).replacen(
        "name = \"api\"\n",
        "name = \"api-renamed\"\n",
        1,
    );
    let rules = rules.replace(
        "\n[[rules]]\nname = \"other-api\"",
        "\n[rules.http]\ndefault = \"deny\"\n\n[[rules]]\nname = \"other-api\"",
    );
    tp.rewrite_profile(&profile_text(tp.tls.port(), tp.plain.port(), &rules));
    tp.proxy.reload().unwrap();
    let (status, body) = send(&mut c, "api.inject.test", "/v1/b", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("default of rule \"api-renamed\""), "{body}");
}

#[tokio::test]
async fn http_rule_records_validate_against_the_ocsf_schema() {
    let tp = TestProxy::start().await;
    with_http_rules(&tp);
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/ok", &[]).await;
    send(&mut c, "api.inject.test", "/v1/admin/x", &[]).await;
    http_record(&tp, "/v1/admin/x").await;
    validate_ocsf(&tp.audit_path);
}

#[tokio::test]
async fn request_body_streams_to_the_upstream() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /up HTTP/1.1\r\nHost: api.inject.test\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(got.contains("ok /up"), "{got}");
    assert_eq!(tp.seen()[0].body, b"hello world");
}

#[tokio::test]
async fn agent_trusting_only_the_test_pki_cannot_complete_an_intercepted_handshake() {
    let tp = TestProxy::start().await;
    // The leaf comes from the workspace CA, not from the upstream's own PKI.
    let stream = tp.named("api.inject.test", tp.http.port()).await;
    assert!(tls_client(stream, name("api.inject.test")).await.is_err());
    let close = tp.wait_record(|r| r["activity_id"] == 2).await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "agent_tls");
}

#[tokio::test]
async fn upstream_that_does_not_verify_is_never_sent_a_request() {
    let tp = TestProxy::start_full(Limits::default(), Vec::new(), false, true).await;
    assert!(tp.intercepted("api.inject.test").await.is_err());
    let close = tp.wait_record(|r| r["activity_id"] == 2).await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "upstream_tls");
    assert_eq!(close["unmapped"]["moat"]["blame"], "upstream");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn query_is_redacted_in_the_http_record() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/search?q=private-words", &[]).await;
    let rec = http_record(&tp, "/v1/search").await;
    assert_eq!(rec["http_request"]["url"]["query_string"], "[redacted]");
    assert_eq!(rec["http_response"]["code"], 200);
    assert_eq!(rec["unmapped"]["moat"]["secrets_injected"][0], "api-key");
    assert!(!rec.to_string().contains("private-words"));
}

#[tokio::test]
async fn reloaded_secret_is_injected_on_the_next_request() {
    let tp = TestProxy::start().await;
    std::fs::write(&tp.secret_file, format!("{}\n", leak::ROTATED_SECRET_VALUE)).unwrap();
    tp.rewrite_profile(&tp.profile_with("\n# rotated\n"));
    tp.proxy.reload().unwrap();
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/models", &[]).await;
    assert_eq!(
        tp.seen()[0].authorization,
        vec![bearer(leak::ROTATED_SECRET_VALUE)]
    );
}

#[tokio::test]
async fn unreadable_secret_refuses_the_reload_and_keeps_the_old_one() {
    let tp = TestProxy::start().await;
    std::fs::remove_file(&tp.secret_file).unwrap();
    tp.rewrite_profile(&tp.profile_with("\n# no secret file\n"));
    let err = tp.proxy.reload().unwrap_err();
    assert!(moat_egress::error_chain(&err).contains("secret \"api-key\""));
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/models", &[]).await;
    assert_eq!(tp.seen()[0].authorization, vec![bearer(SECRET_VALUE)]);
}

#[tokio::test]
async fn secret_never_appears_in_audit_records_or_in_what_the_agent_receives() {
    let tp = TestProxy::start().await;
    let mut received = String::new();
    let mut c = client(&tp, "api.inject.test").await;
    for path in ["/v1/a", "/v1/b?x=1"] {
        let (_, body) = send(
            &mut c,
            "api.inject.test",
            path,
            &[("authorization", &bearer(PLACEHOLDER))],
        )
        .await;
        received.push_str(&body);
    }
    let mut o = client(&tp, "other.inject.test").await;
    let (_, body) = send(
        &mut o,
        "other.inject.test",
        "/x",
        &[("x-api-key", PLACEHOLDER)],
    )
    .await;
    received.push_str(&body);
    received.push_str(
        &raw(
            &tp,
            "api.inject.test",
            b"GET /r HTTP/1.1\r\nHost: api.inject.test\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    drop((c, o));
    tp.wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;
    let log = std::fs::read_to_string(&tp.audit_path).unwrap();
    assert!(log.contains("\"class_uid\":4002"));
    assert!(!log.contains(SECRET_VALUE));
    assert!(!received.contains(SECRET_VALUE));
}

#[tokio::test]
async fn http_records_validate_against_the_ocsf_schema() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/a?q=1", &[]).await;
    let (_, _) = send(&mut c, "api.inject.test", "/v1/b", &[("x", "y")]).await;
    let mut o = client(&tp, "other.inject.test").await;
    send(
        &mut o,
        "other.inject.test",
        "/x",
        &[("authorization", &bearer(PLACEHOLDER))],
    )
    .await;
    drop((c, o));
    http_record(&tp, "/x").await;
    tp.wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;

    validate_ocsf(&tp.audit_path);
    let http = tp
        .records()
        .iter()
        .filter(|r| r["class_uid"] == 4002)
        .count();
    assert_eq!(http, 3);
}

#[tokio::test]
async fn http2_request_gets_the_secret() {
    let tp = TestProxy::start().await;
    let authority = format!("api.inject.test:{}", tp.http.port());
    let mut c = h2_client(&tp, "api.inject.test").await;
    let status = h2_send(
        &mut c,
        &authority,
        "/v1/models",
        &[("authorization", &bearer(PLACEHOLDER))],
    )
    .await;
    assert_eq!(status, 200);
    let seen = &tp.seen()[0];
    assert_eq!(seen.authorization, vec![bearer(SECRET_VALUE)]);
    assert_eq!(seen.host.as_deref(), Some(authority.as_str()));
}

#[tokio::test]
async fn http2_authority_switch_on_the_same_connection_is_refused() {
    let tp = TestProxy::start().await;
    let port = tp.http.port();
    let mut c = h2_client(&tp, "api.inject.test").await;
    let first = h2_send(&mut c, &format!("api.inject.test:{port}"), "/one", &[]).await;
    let second = h2_send(&mut c, &format!("other.inject.test:{port}"), "/two", &[]).await;
    assert_eq!((first, second), (200, 421));
    let paths: Vec<_> = tp.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/one"]);
}

#[tokio::test]
async fn http2_placeholder_to_an_unbound_host_is_refused() {
    let tp = TestProxy::start().await;
    let authority = format!("other.inject.test:{}", tp.http.port());
    let mut c = h2_client(&tp, "other.inject.test").await;
    let status = h2_send(&mut c, &authority, "/x", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(status, 403);
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/x").await;
    assert_eq!(rec["http_request"]["version"], "HTTP/2");
}

#[tokio::test]
async fn metrics_count_forwarded_requests_injections_and_refusals() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/v1/a", &[]).await;
    let mut o = client(&tp, "other.inject.test").await;
    send(
        &mut o,
        "other.inject.test",
        "/x",
        &[("x-api-key", PLACEHOLDER)],
    )
    .await;
    let body = tp.admin_get("/metrics").await;
    assert!(
        body.contains("moat_egress_http_requests_forwarded_total 1"),
        "{body}"
    );
    assert!(
        body.contains("moat_egress_secrets_injected_total 1"),
        "{body}"
    );
    assert!(body.contains(
        "moat_egress_http_requests_stopped_total{reason=\"placeholder_unbound\",blame=\"agent\"} 1"
    ));
}

/// An HTTP/1.1 client on an intercepted connection to `host:443` (a routed name).
async fn routed_client(tp: &TestProxy, host: &str) -> Sender {
    let tls = tp.intercepted_at(host, 443, &[b"http/1.1"]).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn routed_name_reaches_its_provider_with_the_providers_secret() {
    let tp = TestProxy::start().await;
    let mut c = routed_client(&tp, "inference.local").await;
    let (status, body) = send(
        &mut c,
        "inference.local",
        "/v1/chat/completions",
        &[("authorization", "Bearer anything")],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "ok /v1/chat/completions"));
    let seen = &tp.seen()[0];
    assert_eq!(seen.authorization, vec![bearer(SECRET_VALUE)]);
    assert_eq!(
        seen.host.as_deref(),
        Some(format!("api.inject.test:{}", tp.http.port()).as_str())
    );
    let rec = http_record(&tp, "/v1/chat/completions").await;
    assert_eq!(rec["unmapped"]["moat"]["routed_from"], "inference.local");
    assert_eq!(rec["firewall_rule"]["name"], "inference");
}

#[tokio::test]
async fn routed_request_drops_the_agents_own_credentials() {
    let tp = TestProxy::start().await;
    let mut c = routed_client(&tp, "models.local").await;
    send(
        &mut c,
        "models.local",
        "/v1/models",
        &[
            ("authorization", "Bearer agent-own"),
            ("x-api-key", "agent-key"),
        ],
    )
    .await;
    let seen = &tp.seen()[0];
    assert!(seen.authorization.is_empty());
    assert_eq!(seen.x_api_key, None);
}

#[tokio::test]
async fn routed_name_holds_requests_to_the_name_the_agent_used() {
    let tp = TestProxy::start().await;
    let mut c = routed_client(&tp, "inference.local").await;
    let host = format!("api.inject.test:{}", tp.http.port());
    let (status, _) = send(&mut c, &host, "/v1/models", &[]).await;
    assert_eq!(status, 421);
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn streamed_response_reaches_the_agent_before_it_ends() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let req = Request::get("/stream")
        .header("host", "api.inject.test")
        .body(Empty::new())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    // The second event comes 3 s later: the first must arrive long before that.
    let first = tokio::time::timeout(Duration::from_secs(1), body.frame())
        .await
        .expect("first event was held back")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"data: 1\n\n");
}

#[tokio::test]
async fn placeholder_split_across_http2_data_frames_to_an_unbound_host_is_refused() {
    let tp = TestProxy::start().await;
    let tls = tp
        .intercepted_alpn("other.inject.test", &[b"h2"])
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (mut tx, body) = http_body_util::Channel::<bytes::Bytes>::new(4);
    let url = format!("https://other.inject.test:{}/paste", tp.http.port());
    let req = Request::post(url).body(body).unwrap();
    let response = tokio::spawn(async move { sender.send_request(req).await });
    let (a, b) = PLACEHOLDER.split_at(12);
    tx.send_data(bytes::Bytes::from(a)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = tx.send_data(bytes::Bytes::from(b)).await;
    drop(tx);
    let status = response.await.unwrap().unwrap().status().as_u16();
    assert_eq!(status, 403);
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn reload_that_drops_an_intercepted_host_cuts_its_connection() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let (first, _) = send(&mut c, "api.inject.test", "/one", &[]).await;
    let without = tp.profile_with("").replace(
        "hosts = [\"api.inject.test\"]\nports",
        "hosts = [\"other.inject.test\"]\nports",
    );
    tp.rewrite_profile(&without);
    tp.proxy.reload().unwrap();
    let close = tp
        .wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;
    assert_eq!(first, 200);
    assert_eq!(close["unmapped"]["moat"]["reason"], "revoked");
    assert!(c.ready().await.is_err());
}

#[tokio::test]
async fn http2_streamed_response_reaches_the_agent_before_it_ends() {
    let tp = TestProxy::start().await;
    let mut c = h2_client(&tp, "api.inject.test").await;
    let url = format!("https://api.inject.test:{}/stream", tp.http.port());
    let resp = c
        .send_request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(1), body.frame())
        .await
        .expect("first event was held back")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"data: 1\n\n");
}

#[tokio::test]
async fn routed_json_request_gets_the_configured_model() {
    let tp = TestProxy::start().await;
    let body = r#"{"model":"gpt-anything","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tls = tp
        .intercepted_at("inference.local", 443, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(req.as_bytes()).await.unwrap();
    let got = String::from_utf8_lossy(&read_all(&mut tls, WAIT).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let sent: serde_json::Value = serde_json::from_slice(&tp.seen()[0].body).unwrap();
    assert_eq!(sent["model"], "served-model");
    assert_eq!(sent["messages"][0]["content"], "hi");
}

#[tokio::test]
async fn placeholder_split_across_reads_of_the_request_head_is_refused() {
    let tp = TestProxy::start().await;
    let mut tls = tp.intercepted("other.inject.test").await.unwrap();
    let head =
        format!("GET /x HTTP/1.1\r\nHost: other.inject.test\r\nX-Key: {PLACEHOLDER}\r\n\r\n");
    // One TLS record per byte: the proxy sees the placeholder arrive over many reads.
    for byte in head.as_bytes() {
        tls.write_all(std::slice::from_ref(byte)).await.unwrap();
        tls.flush().await.unwrap();
    }
    let got = String::from_utf8_lossy(&read_all(&mut tls, WAIT).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(tp.seen().is_empty());
}

#[tokio::test]
async fn upstream_offering_http2_is_spoken_to_in_http2_with_the_secret() {
    let tp = TestProxy::start_full(Limits::default(), vec![pki().ca.clone()], true, true).await;
    let mut c = client(&tp, "api.inject.test").await;
    let (status, body) = send(&mut c, "api.inject.test", "/v1/models", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok /v1/models"));
    let seen = &tp.seen()[0];
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.authorization, vec![bearer(SECRET_VALUE)]);
}

#[tokio::test]
async fn concurrent_http2_streams_all_reach_an_http2_upstream() {
    let tp = TestProxy::start_full(Limits::default(), vec![pki().ca.clone()], true, true).await;
    let authority = format!("api.inject.test:{}", tp.http.port());
    let c = h2_client(&tp, "api.inject.test").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (mut c, authority) = (c.clone(), authority.clone());
        tasks.push(tokio::spawn(async move {
            h2_send(&mut c, &authority, &format!("/v1/{i}"), &[]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(tp.seen().len(), 8);
}

#[tokio::test]
async fn http_record_counts_body_bytes_both_ways() {
    let tp = TestProxy::start().await;
    let got = raw(
        &tp,
        "api.inject.test",
        b"POST /count HTTP/1.1\r\nHost: api.inject.test\r\nContent-Length: 11\r\n\
          Connection: close\r\n\r\nhello world",
    )
    .await;
    assert!(got.contains("ok /count"), "{got}");
    let rec = http_record(&tp, "/count").await;
    assert_eq!(rec["traffic"]["bytes_out"], 11);
    assert_eq!(rec["traffic"]["bytes_in"], "ok /count".len());
}

#[tokio::test]
async fn upstream_closing_its_connection_is_redialled_for_the_next_request() {
    let tp = TestProxy::start().await;
    let mut c = client(&tp, "api.inject.test").await;
    let (first, _) = send(&mut c, "api.inject.test", "/close", &[]).await;
    let (second, _) = send(&mut c, "api.inject.test", "/after", &[]).await;
    assert_eq!((first, second), (200, 200));
    let seen = tp.seen();
    assert_eq!(seen[1].authorization, vec![bearer(SECRET_VALUE)]);
}

#[tokio::test]
async fn bytes_that_are_not_http_close_the_intercepted_flow() {
    let tp = TestProxy::start().await;
    let got = raw(&tp, "api.inject.test", b"\x00\x01 not http at all\r\n\r\n").await;
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 400"), "{got}");
    let close = tp
        .wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;
    assert_eq!(close["unmapped"]["moat"]["reason"], "http_malformed");
    assert!(tp.seen().is_empty());
}

/// Waits until the proxy holds `n` idle upstream connections.
async fn pooled(tp: &TestProxy, n: usize) {
    for _ in 0..200 {
        if tp.proxy.pooled_upstreams() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} pooled upstream connections, not {n}",
        tp.proxy.pooled_upstreams()
    );
}

/// One request on a new intercepted connection to `host`, which is then closed.
async fn one_request(tp: &TestProxy, host: &str, path: &str) -> u16 {
    let mut c = client(tp, host).await;
    let (status, _) = send(&mut c, host, path, &[("connection", "close")]).await;
    status
}

#[tokio::test]
async fn new_agent_connection_reuses_the_idle_verified_upstream_connection() {
    let tp = TestProxy::start().await;
    assert_eq!(one_request(&tp, "api.inject.test", "/first").await, 200);
    pooled(&tp, 1).await;
    assert_eq!(one_request(&tp, "api.inject.test", "/second").await, 200);
    let seen = tp.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].conn, seen[1].conn);
    assert!(
        seen.iter()
            .all(|s| s.authorization == vec![bearer(SECRET_VALUE)])
    );
    assert_eq!(
        tp.proxy
            .metrics()
            .upstream_reused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn pooled_upstream_connection_never_carries_a_request_for_another_host() {
    let tp = TestProxy::start().await;
    one_request(&tp, "api.inject.test", "/a").await;
    pooled(&tp, 1).await;
    // Same upstream address, another name: a connection of its own, opened with its own SNI.
    one_request(&tp, "other.inject.test", "/b").await;
    pooled(&tp, 2).await;
    one_request(&tp, "api.inject.test", "/c").await;
    let seen = tp.seen();
    assert_eq!(seen.len(), 3);
    assert_ne!(seen[0].conn, seen[1].conn);
    assert_eq!(seen[0].conn, seen[2].conn);
    for s in &seen {
        assert_eq!(s.named_host(), s.sni, "{} on connection {}", s.path, s.conn);
    }
    assert!(seen[1].authorization.is_empty());
}

#[tokio::test]
async fn reload_closes_the_pooled_upstream_connections() {
    let tp = TestProxy::start_unwatched().await;
    one_request(&tp, "api.inject.test", "/before").await;
    pooled(&tp, 1).await;
    tp.rewrite_profile(&tp.profile_with("\n# reloaded\n"));
    tp.proxy.reload().unwrap();
    assert_eq!(tp.proxy.pooled_upstreams(), 0);
    one_request(&tp, "api.inject.test", "/after").await;
    let seen = tp.seen();
    assert_ne!(seen[0].conn, seen[1].conn);
}

#[tokio::test]
async fn flow_open_across_a_reload_does_not_return_its_connection_to_the_pool() {
    let tp = TestProxy::start_unwatched().await;
    let mut c = client(&tp, "api.inject.test").await;
    send(&mut c, "api.inject.test", "/during", &[]).await;
    tp.rewrite_profile(&tp.profile_with("\n# reloaded\n"));
    tp.proxy.reload().unwrap();
    drop(c);
    tp.wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tp.proxy.pooled_upstreams(), 0);
}

#[tokio::test]
async fn upstream_connection_the_upstream_closes_is_not_pooled() {
    let tp = TestProxy::start().await;
    assert_eq!(one_request(&tp, "api.inject.test", "/close").await, 200);
    tp.wait_record(|r| r["class_uid"] == 4001 && r["activity_id"] == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tp.proxy.pooled_upstreams(), 0);
    assert_eq!(one_request(&tp, "api.inject.test", "/next").await, 200);
    let seen = tp.seen();
    assert_ne!(seen[0].conn, seen[1].conn);
}

#[tokio::test]
async fn placeholder_in_the_body_after_the_upstream_answered_is_refused_and_audited() {
    let tp = TestProxy::start().await;
    let mut tls = tp.intercepted("other.inject.test").await.unwrap();
    tls.write_all(
        b"POST /early HTTP/1.1\r\nHost: other.inject.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nclean\r\n",
    )
    .await
    .unwrap();
    // The upstream answers before the body is whole.
    let mut head = Vec::new();
    while !head.ends_with(b"ok /early") {
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut tls, &mut byte)
            .await
            .unwrap();
        head.push(byte[0]);
    }
    let rest = format!("{:x}\r\n{PLACEHOLDER}\r\n0\r\n\r\n", PLACEHOLDER.len());
    tls.write_all(rest.as_bytes()).await.unwrap();
    let rec = tp
        .wait_record(|r| {
            r["class_uid"] == 4002 && r["unmapped"]["moat"]["reason"] == "placeholder_unbound"
        })
        .await;
    assert_eq!(rec["http_request"]["url"]["path"], "/early");
    assert_eq!(rec["unmapped"]["moat"]["blame"], "agent");
    assert_eq!(rec["disposition"], "Blocked");
    assert_eq!(rec["http_response"]["code"], 200);
    assert_eq!(
        tp.proxy
            .metrics()
            .http_stopped_count(moat_egress::outcome::Reason::PlaceholderUnbound),
        1
    );
}

#[tokio::test]
async fn reload_intercepting_a_host_outside_the_ca_name_constraints_is_refused() {
    let tp = TestProxy::start_unwatched().await;
    let wider = tp.profile_with("").replace(
        "hosts = [\"api.inject.test\"]\nports",
        "hosts = [\"api.inject.test\", \"bank.example\"]\nports",
    );
    tp.rewrite_profile(&wider);
    let err = tp.proxy.reload().unwrap_err();
    assert!(
        moat_egress::error_chain(&err).contains("bank.example"),
        "{err}"
    );
    // The policy in force is kept.
    let mut c = client(&tp, "api.inject.test").await;
    assert_eq!(send(&mut c, "api.inject.test", "/still", &[]).await.0, 200);
}

#[tokio::test]
async fn reload_intercepting_a_host_inside_the_ca_name_constraints_is_applied() {
    let tp = TestProxy::start_unwatched().await;
    // models.local is intercepted from the start (routed); a second rule naming it is in scope.
    let same = tp.profile_with("").replace(
        "hosts = [\"other.inject.test\"]\nports",
        "hosts = [\"other.inject.test\", \"models.local\"]\nports",
    );
    tp.rewrite_profile(&same);
    tp.proxy.reload().unwrap();
}

/// The test profile plus a secret with a per-workspace placeholder that requests to
/// other.inject.test must carry.
fn with_required_auto_secret(tp: &TestProxy) -> String {
    tp.profile_with(&format!(
        r#"
[[secrets]]
name = "auto-key"
source = {{ file = "{}" }}
placeholder = "auto"
env = "AUTO_KEY"
require = true
hosts = ["other.inject.test"]
ports = [{}]
presentation = "x_api_key"
"#,
        tp.secret_file.display(),
        tp.http.port()
    ))
}

/// The placeholder the proxy hands the agent in `var`.
fn agent_placeholder(tp: &TestProxy, var: &str) -> String {
    let env = tp.proxy.agent_env();
    env.into_iter()
        .find_map(|(k, v)| (k == var).then_some(v))
        .unwrap_or_else(|| panic!("{var} not in the agent's environment"))
}

#[tokio::test]
async fn auto_placeholder_is_drawn_per_workspace_kept_across_reloads_and_injected() {
    let tp = TestProxy::start().await;
    tp.rewrite_profile(&with_required_auto_secret(&tp));
    tp.proxy.reload().unwrap();
    let placeholder = agent_placeholder(&tp, "AUTO_KEY");
    assert!(placeholder.starts_with("sk-moat-"), "{placeholder}");
    // A reload keeps it: the agent was given it once.
    tp.proxy.reload().unwrap();
    assert_eq!(agent_placeholder(&tp, "AUTO_KEY"), placeholder);
    // Another workspace draws another.
    let other = TestProxy::start().await;
    other.rewrite_profile(&with_required_auto_secret(&other));
    other.proxy.reload().unwrap();
    assert_ne!(agent_placeholder(&other, "AUTO_KEY"), placeholder);
    // The fixed placeholder is not exported: that secret names no env.
    assert_eq!(tp.proxy.agent_env().len(), 1);

    let mut c = client(&tp, "other.inject.test").await;
    let (status, _) = send(
        &mut c,
        "other.inject.test",
        "/v1/x",
        &[("x-api-key", &placeholder)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(tp.seen()[0].x_api_key.as_deref(), Some(SECRET_VALUE));
}

#[tokio::test]
async fn required_placeholder_missing_is_refused_and_audited() {
    let tp = TestProxy::start().await;
    tp.rewrite_profile(&with_required_auto_secret(&tp));
    tp.proxy.reload().unwrap();
    let mut c = client(&tp, "other.inject.test").await;
    let (status, _) = send(&mut c, "other.inject.test", "/silent", &[]).await;
    assert_eq!(status, 403);
    assert!(tp.seen().is_empty());
    let rec = http_record(&tp, "/silent").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "placeholder_required");
    assert_eq!(rec["unmapped"]["moat"]["blame"], "agent");
}

/// Gives the intercepted api.inject.test MCP rules on `path`: every method, the tool `echo`,
/// never `delete_everything`.
fn with_mcp_rules(tp: &TestProxy, path: &str) {
    let rules = intercept_rules(tp.http.port(), &tp.secret_file).replace(
        "\n[[rules]]\nname = \"other-api\"",
        &format!(
            "\n[rules.mcp]\npath = \"{path}\"\nmethods = {{ default = \"allow\" }}\n\
             tools = {{ default = \"deny\", allow = [\"echo\"], deny = [\"delete_everything\"] }}\n\
             \n[[rules]]\nname = \"other-api\""
        ),
    );
    tp.rewrite_profile(&profile_text(tp.tls.port(), tp.plain.port(), &rules));
    tp.proxy.reload().unwrap();
}

fn tool_call(path: &str, tool: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
    );
    format!(
        "POST {path} HTTP/1.1\r\nHost: api.inject.test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn mcp_rules_refuse_a_denied_tool_call_with_a_json_rpc_error_before_the_upstream() {
    let tp = TestProxy::start().await;
    with_mcp_rules(&tp, "/mcp");
    let got = raw(
        &tp,
        "api.inject.test",
        &tool_call("/mcp", "delete_everything"),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(got.contains("application/json"), "{got}");
    assert!(
        got.contains(r#""id":7"#) && got.contains("-32001") && got.contains("tools.deny"),
        "{got}"
    );
    assert!(tp.seen().is_empty(), "{:?}", tp.seen());
    let rec = http_record(&tp, "/mcp").await;
    assert_eq!(rec["unmapped"]["moat"]["reason"], "mcp_denied", "{rec}");
    assert_eq!(
        rec["unmapped"]["moat"]["mcp"]["messages"][0]["tool"],
        "delete_everything"
    );
    // Another path of the host is not the endpoint: not read as MCP.
    let got = raw(
        &tp,
        "api.inject.test",
        &tool_call("/other", "delete_everything"),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// Fail closed: an allowed call is forwarded, but an answer that is not JSON-RPC (here the
/// test upstream's text) is refused, never shown to the agent.
#[tokio::test]
async fn mcp_answer_that_is_not_json_rpc_is_refused_with_a_502() {
    let tp = TestProxy::start().await;
    with_mcp_rules(&tp, "/mcp");
    let got = raw(&tp, "api.inject.test", &tool_call("/mcp", "echo")).await;
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    assert!(!got.contains("ok /mcp"), "{got}");
    assert_eq!(tp.seen().len(), 1, "the allowed call was forwarded");
    let rec = http_record(&tp, "/mcp").await;
    assert_eq!(
        rec["unmapped"]["moat"]["reason"], "mcp_response_refused",
        "{rec}"
    );
    assert_eq!(rec["unmapped"]["moat"]["blame"], "upstream");
}

/// The SSE answer of an MCP endpoint is read event by event: an event that is not JSON-RPC
/// (`data: 1`) cuts the stream before any of it reaches the agent, and the record says so.
#[tokio::test]
async fn mcp_sse_stream_is_cut_at_an_event_that_is_not_json_rpc() {
    let tp = TestProxy::start().await;
    with_mcp_rules(&tp, "/stream");
    let got = raw(
        &tp,
        "api.inject.test",
        b"GET /stream HTTP/1.1\r\nHost: api.inject.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(!got.contains("data: 1"), "{got}");
    let rec = http_record(&tp, "/stream").await;
    assert_eq!(
        rec["unmapped"]["moat"]["reason"], "mcp_response_refused",
        "{rec}"
    );
    assert!(
        rec["message"]
            .as_str()
            .unwrap()
            .contains("the stream was cut"),
        "{rec}"
    );
}
