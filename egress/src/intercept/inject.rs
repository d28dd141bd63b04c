//! The rules applied to every intercepted request, before it is forwarded. Pure functions on
//! the request head, so each rule is unit-tested on its own.
//!
//! In order:
//! 1. Authority: at most one Host header and an HTTP/2 `:authority` (absolute target), at
//!    least one of them, each naming the flow's hostname (and port, if it names one). The name was already held to the policy
//!    and to the TLS SNI when the flow opened, and the upstream address is pinned, so a request
//!    that names another host (a switch on a kept-alive connection) is refused, never routed.
//! 2. Placeholders: a placeholder anywhere in the head (method, target, header names or values) for a
//!    host, port or path its secret is not bound to is refused. Fail closed. A request bound to
//!    a secret with `require = true` that carries its placeholder nowhere in the head is refused.
//! 3. Credentials: if any secret is bound to the host, every agent-supplied credential header
//!    (`authorization`, `proxy-authorization`, `x-api-key` and each bound secret's header) is
//!    removed, never forwarded; then each secret bound to the host, port *and path* is set in
//!    its presentation header (the first in profile order wins a header).
//! 4. Hop-by-hop headers are removed (those `Connection` names, `keep-alive`, `upgrade`, ...).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use moat_policy::{HttpAction, HttpRules, Presentation};

use crate::outcome::Reason;
use crate::secrets::{Secrets, contains};

/// Why a request is not forwarded: the status the agent gets, and the audited reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status the agent is answered with.
    pub status: StatusCode,
    /// The audited reason.
    pub reason: Reason,
    /// Human-readable detail (never a header value).
    pub detail: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: Reason, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            detail: detail.into(),
        }
    }
}

/// Headers that carry credentials; an agent's own are never forwarded to a bound host.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "x-api-key"];

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded. `transfer-encoding` stays: the
/// forwarding side frames the body by it.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// The reflecting methods (TRACE, TRACK) are the policy's knowledge: `moat policy test`
/// answers for them as the proxy does.
pub use moat_policy::http_rules::reflecting_method;

/// Splits `host[:port]` (a Host header or URI authority) and normalises the name.
fn parse_authority(value: &str) -> Option<(String, Option<u16>)> {
    if value.contains('@') || value.starts_with('[') {
        return None;
    }
    let (name, port) = match value.rsplit_once(':') {
        Some((n, p)) => (n, Some(p.parse::<u16>().ok()?)),
        None => (value, None),
    };
    Some((moat_policy::normalize(name).ok()?, port))
}

/// Rule 1: the request names the flow's host (and port).
pub fn check_authority(
    headers: &HeaderMap,
    uri: &Uri,
    host: &str,
    port: u16,
) -> Result<(), Refusal> {
    let mismatch = |named: &str| {
        Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            Reason::AuthorityMismatch,
            format!("request names {named}, flow is for {host}:{port}"),
        )
    };
    let mut hosts = headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    // HTTP/1.1 names the authority in Host; HTTP/2 in :authority (the URI), Host optional.
    // Whichever are present must all name the flow's host.
    if second.is_some() || (first.is_none() && uri.authority().is_none()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            Reason::HostMissing,
            "a request needs exactly one Host header (or an HTTP/2 :authority)",
        ));
    }
    let ok = |(name, p): (String, Option<u16>)| name == host && p.is_none_or(|p| p == port);
    if let Some(value) = first {
        let value = value.to_str().map_err(|_| mismatch("an unreadable Host"))?;
        if !parse_authority(value).is_some_and(ok) {
            return Err(mismatch(value));
        }
    }
    if let Some(authority) = uri.authority()
        && !parse_authority(authority.as_str()).is_some_and(ok)
    {
        return Err(mismatch(authority.as_str()));
    }
    if uri.scheme().is_some_and(|s| s != &http::uri::Scheme::HTTPS) {
        return Err(mismatch("a non-https scheme"));
    }
    Ok(())
}

/// Rule 1b: where a secret bound to this host has path prefixes, replaces the request's path
/// by its normal form ([`moat_policy::normalize_path`]), query kept, or refuses the request
/// when it has none. Other requests are left as they are (their path decides nothing).
pub fn normalize_for_prefixes(
    uri: &mut Uri,
    secrets: &Secrets,
    host: &str,
    port: u16,
) -> Result<(), Refusal> {
    let decides = secrets
        .iter()
        .any(|(spec, _)| spec.has_paths() && spec.binds_host(host, port));
    if !decides {
        return Ok(());
    }
    let refuse = |why: String| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            Reason::RequestRefused,
            format!(
                "the request path cannot be normalised for this host's secret path prefixes: {why}"
            ),
        )
    };
    set_normal_path(uri, refuse)
}

/// Replaces `uri`'s path by its normal form ([`moat_policy::normalize_path`]), query kept, or
/// refuses with `refuse(why)` when it has none.
pub(crate) fn set_normal_path(
    uri: &mut Uri,
    refuse: impl Fn(String) -> Refusal,
) -> Result<(), Refusal> {
    let path = moat_policy::normalize_path(uri.path()).map_err(|e| refuse(e.to_string()))?;
    if path == uri.path() {
        return Ok(());
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|_| refuse("the normalised path is not a valid target".into()))?,
    );
    *uri =
        Uri::from_parts(parts).map_err(|_| refuse("the normalised target is not valid".into()))?;
    Ok(())
}

/// Rule 1c: where the flow's intercept rule (`rule`) has HTTP rules, the request's path is
/// normalised once (the upstream is then sent that form, so it routes exactly what was
/// matched; a path with none is refused, 400) and the first matching HTTP rule, or the rule's
/// default, decides. Returns the deciding HTTP rule's name ([`moat_policy::http_rules::
/// DEFAULT_NAME`] for the default); a denial is a 403 naming it, with the name when there is one.
pub fn check_http_rules(
    uri: &mut Uri,
    method: &str,
    rule: &str,
    http: &HttpRules,
) -> Result<String, (Option<String>, Refusal)> {
    let refuse = |why: String| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            Reason::RequestRefused,
            format!("the request path cannot be normalised for rule {rule:?}'s HTTP rules: {why}"),
        )
    };
    set_normal_path(uri, refuse).map_err(|r| (None, r))?;
    let verdict = http.decide(method, uri.path(), uri.query());
    let name = verdict.rule_name().to_owned();
    if verdict.action == HttpAction::Allow {
        return Ok(name);
    }
    let by = match verdict.rule {
        Some(r) => format!("HTTP rule {:?} of rule {rule:?}", r.name),
        None => format!("the default of rule {rule:?} (no HTTP rule matched)"),
    };
    let detail = format!("{method} {} is denied by {by}", uri.path());
    Err((
        Some(name),
        Refusal::new(StatusCode::FORBIDDEN, Reason::HttpRuleDenied, detail),
    ))
}

/// Rules 2 and 3: refuses misplaced placeholders, then replaces credentials. `host` and `port`
/// are the upstream's (a routed rule's route). `strip_always` drops the agent's credential
/// headers even when no secret is bound (routed inference). Returns the names of the secrets
/// injected.
pub fn apply_secrets(
    headers: &mut HeaderMap,
    method: &str,
    uri: &Uri,
    secrets: &Secrets,
    host: &str,
    port: u16,
    strip_always: bool,
) -> Result<Vec<String>, Refusal> {
    let path = uri.path();
    // The whole target, authority included (an absolute-form target can carry one there).
    let target = uri.to_string();
    let target = target.as_bytes();
    for (spec, _) in secrets.iter() {
        let needle = spec.placeholder.as_bytes();
        let present = contains(target, needle)
            || contains(method.as_bytes(), needle)
            || headers.iter().any(|(n, v)| {
                contains(n.as_str().as_bytes(), needle) || contains(v.as_bytes(), needle)
            });
        if present && !spec.binds(host, port, path) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Reason::PlaceholderUnbound,
                format!(
                    "placeholder of secret {:?} is not bound to this request",
                    spec.name
                ),
            ));
        }
        // `require = true`: the agent must ask for the secret, never get it silently.
        if spec.require && !present && spec.binds(host, port, path) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Reason::PlaceholderRequired,
                format!(
                    "request bound to secret {:?} does not carry its placeholder",
                    spec.name
                ),
            ));
        }
    }
    let bound: Vec<_> = secrets
        .iter()
        .filter(|(spec, _)| spec.binds_host(host, port))
        .collect();
    if bound.is_empty() && !strip_always {
        return Ok(Vec::new());
    }
    for name in CREDENTIAL_HEADERS {
        headers.remove(*name);
    }
    for (spec, _) in &bound {
        headers.remove(spec.presentation.header_name().as_str());
    }
    let mut injected = Vec::new();
    for (spec, value) in bound {
        if !spec.binds(host, port, path) {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(spec.presentation.header_name().as_bytes()) else {
            continue;
        };
        if headers.contains_key(&name) {
            continue;
        }
        let text = match spec.presentation {
            Presentation::AuthorizationBearer => format!("Bearer {}", value.expose()),
            Presentation::AuthorizationBasic => {
                format!("Basic {}", STANDARD.encode(value.expose().as_bytes()))
            }
            Presentation::XApiKey | Presentation::Header(_) => value.expose().to_owned(),
        };
        let Ok(mut v) = HeaderValue::from_str(&text) else {
            continue;
        };
        v.set_sensitive(true);
        headers.insert(name, v);
        injected.push(spec.name.clone());
    }
    Ok(injected)
}

/// Rule 4: removes hop-by-hop headers, and any header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        // Never let `Connection` remove the framing of the message.
        if name != header::TRANSFER_ENCODING && name != header::CONTENT_LENGTH {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Rewrites the `model` field of a JSON object body to `model`. `None` when the body is not a
/// JSON object with a string `model` (it is then forwarded as it is).
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = value.as_object_mut()?.get_mut("model")?;
    if !field.is_string() {
        return None;
    }
    *field = serde_json::Value::String(model.to_owned());
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn trace_and_track_are_reflecting_methods_in_any_case() {
        for m in ["TRACE", "trace", "Trace", "TRACK", "track"] {
            assert!(reflecting_method(m).is_some(), "{m}");
        }
        for m in ["GET", "POST", "OPTIONS", "PUT", "TRACES", "TRAC"] {
            assert_eq!(reflecting_method(m), None, "{m}");
        }
    }

    fn secrets(profile_secrets: &str) -> std::sync::Arc<Secrets> {
        let text = format!("version = 1\nname = \"t\"\n{profile_secrets}");
        let policy = moat_policy::profile::parse(&text).unwrap();
        Secrets::load(&policy.secrets).unwrap()
    }

    const BEARER: &str = r#"
[[secrets]]
name = "api"
source = { command = ["printf", "sk-real-api"] }
placeholder = "sk-moat-placeholder-api"
hosts = ["api.test"]
presentation = "authorization_bearer"
"#;

    #[test]
    fn model_field_is_rewritten_and_everything_else_kept() {
        let out = rewrite_model(br#"{"model":"gpt-x","stream":true}"#, "served").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "served");
        assert_eq!(v["stream"], true);
    }

    #[test]
    fn body_without_a_model_string_is_left_alone() {
        assert!(rewrite_model(br#"{"messages":[]}"#, "served").is_none());
        assert!(rewrite_model(br#"[1,2]"#, "served").is_none());
        assert!(rewrite_model(b"not json", "served").is_none());
    }

    #[test]
    fn host_naming_the_flow_passes_with_or_without_its_port() {
        let uri: Uri = "/x".parse().unwrap();
        assert!(check_authority(&headers(&[("host", "API.test")]), &uri, "api.test", 443).is_ok());
        assert!(
            check_authority(&headers(&[("host", "api.test:443")]), &uri, "api.test", 443).is_ok()
        );
    }

    #[test]
    fn host_naming_another_host_or_port_is_misdirected() {
        let uri: Uri = "/x".parse().unwrap();
        for host in [
            "other.test",
            "api.test:8443",
            "api.test.evil.test",
            "user@api.test",
        ] {
            let err =
                check_authority(&headers(&[("host", host)]), &uri, "api.test", 443).unwrap_err();
            assert_eq!(err.reason, Reason::AuthorityMismatch, "{host}");
        }
    }

    #[test]
    fn two_host_headers_are_refused() {
        let uri: Uri = "/x".parse().unwrap();
        let h = headers(&[("host", "api.test"), ("host", "api.test")]);
        assert_eq!(
            check_authority(&h, &uri, "api.test", 443)
                .unwrap_err()
                .reason,
            Reason::HostMissing
        );
    }

    #[test]
    fn http2_authority_alone_names_the_host() {
        let uri: Uri = "https://api.test/x".parse().unwrap();
        assert!(check_authority(&HeaderMap::new(), &uri, "api.test", 443).is_ok());
        let other: Uri = "https://other.test/x".parse().unwrap();
        assert!(check_authority(&HeaderMap::new(), &other, "api.test", 443).is_err());
    }

    #[test]
    fn request_without_any_authority_is_refused() {
        let uri: Uri = "/x".parse().unwrap();
        let err = check_authority(&HeaderMap::new(), &uri, "api.test", 443).unwrap_err();
        assert_eq!(err.reason, Reason::HostMissing);
    }

    #[test]
    fn absolute_target_for_another_host_is_misdirected() {
        let uri: Uri = "https://other.test/x".parse().unwrap();
        let err =
            check_authority(&headers(&[("host", "api.test")]), &uri, "api.test", 443).unwrap_err();
        assert_eq!(err.reason, Reason::AuthorityMismatch);
    }

    #[test]
    fn bound_request_gets_the_secret_in_place_of_the_agents_credentials() {
        let s = secrets(BEARER);
        let mut h = headers(&[
            ("authorization", "Bearer sk-moat-placeholder-api"),
            ("x-api-key", "mine"),
        ]);
        let injected = apply_secrets(
            &mut h,
            "GET",
            &"/v1".parse().unwrap(),
            &s,
            "api.test",
            443,
            false,
        )
        .unwrap();
        assert_eq!(injected, vec!["api".to_owned()]);
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer sk-real-api");
        assert!(h.get("x-api-key").is_none());
    }

    #[test]
    fn placeholder_for_an_unbound_host_is_refused() {
        let s = secrets(BEARER);
        let mut h = headers(&[("x-note", "key=sk-moat-placeholder-api")]);
        let err = apply_secrets(
            &mut h,
            "GET",
            &"/".parse().unwrap(),
            &s,
            "other.test",
            443,
            false,
        )
        .unwrap_err();
        assert_eq!(err.reason, Reason::PlaceholderUnbound);
        assert_eq!(err.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn placeholder_in_the_query_for_an_unbound_host_is_refused() {
        let s = secrets(BEARER);
        let uri: Uri = "/?k=sk-moat-placeholder-api".parse().unwrap();
        let err = apply_secrets(
            &mut HeaderMap::new(),
            "GET",
            &uri,
            &s,
            "other.test",
            443,
            false,
        )
        .unwrap_err();
        assert_eq!(err.reason, Reason::PlaceholderUnbound);
    }

    #[test]
    fn placeholder_in_the_method_or_an_absolute_authority_is_refused() {
        let s = secrets(BEARER);
        let plain: Uri = "/".parse().unwrap();
        let method = "POSTsk-moat-placeholder-api";
        let err = apply_secrets(
            &mut HeaderMap::new(),
            method,
            &plain,
            &s,
            "other.test",
            443,
            false,
        );
        assert_eq!(err.unwrap_err().reason, Reason::PlaceholderUnbound);
        let absolute: Uri = "https://sk-moat-placeholder-api.other.test/"
            .parse()
            .unwrap();
        let err = apply_secrets(
            &mut HeaderMap::new(),
            "GET",
            &absolute,
            &s,
            "other.test",
            443,
            false,
        );
        assert_eq!(err.unwrap_err().reason, Reason::PlaceholderUnbound);
    }

    #[test]
    fn unbound_host_keeps_its_own_credentials() {
        let s = secrets(BEARER);
        let mut h = headers(&[("authorization", "Bearer theirs")]);
        apply_secrets(
            &mut h,
            "GET",
            &"/".parse().unwrap(),
            &s,
            "other.test",
            443,
            false,
        )
        .unwrap();
        assert_eq!(h["authorization"], "Bearer theirs");
    }

    #[test]
    fn basic_presentation_encodes_user_and_password() {
        let s = secrets(
            &BEARER
                .replace("authorization_bearer", "authorization_basic")
                .replace("sk-real-api", "u:p"),
        );
        let mut h = HeaderMap::new();
        apply_secrets(
            &mut h,
            "GET",
            &"/".parse().unwrap(),
            &s,
            "api.test",
            443,
            false,
        )
        .unwrap();
        assert_eq!(h["authorization"], "Basic dTpw");
    }

    #[test]
    fn path_outside_the_prefix_gets_no_secret_and_loses_the_agents_credential() {
        let s = secrets(&BEARER.replace("presentation", "paths = [\"/v1/\"]\npresentation"));
        let mut h = headers(&[("authorization", "Bearer mine")]);
        let injected = apply_secrets(
            &mut h,
            "GET",
            &"/admin".parse().unwrap(),
            &s,
            "api.test",
            443,
            false,
        )
        .unwrap();
        assert!(injected.is_empty());
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn connection_named_and_hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-private").is_none()
                && h.get("upgrade").is_none()
                && h.get("connection").is_none()
        );
        assert!(h.get("transfer-encoding").is_some() && h.get("x-kept").is_some());
    }

    fn http_rules(text: &str) -> HttpRules {
        let profile = format!(
            "version = 1\nname = \"t\"\n[[rules]]\nname = \"api\"\nhosts = [\"api.test\"]\n\
             ports = [443]\naction = \"intercept\"\n{text}"
        );
        let policy = moat_policy::profile::parse(&profile).unwrap();
        policy.rules[0].http.clone().unwrap()
    }

    const HTTP: &str = "[rules.http]\ndefault = \"deny\"\n[[rules.http.requests]]\n\
                        name = \"read\"\nmethods = [\"GET\"]\npaths = [\"/v1/**\"]\n\
                        action = \"allow\"\n";

    #[test]
    fn http_rules_allow_by_name_and_send_the_normalised_path() {
        let mut uri: Uri = "/v1/a/../%62?x=1".parse().unwrap();
        let name = check_http_rules(&mut uri, "GET", "api", &http_rules(HTTP)).unwrap();
        assert_eq!(name, "read");
        assert_eq!(uri.to_string(), "/v1/b?x=1");
    }

    #[test]
    fn http_rules_deny_with_a_403_naming_the_rule() {
        let mut uri: Uri = "/v1/x".parse().unwrap();
        let (name, r) = check_http_rules(&mut uri, "POST", "api", &http_rules(HTTP)).unwrap_err();
        assert_eq!(name.as_deref(), Some("default"));
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::FORBIDDEN, Reason::HttpRuleDenied)
        );
        assert!(r.detail.contains("default of rule \"api\""), "{}", r.detail);
        let mut uri: Uri = "/v1/../admin".parse().unwrap();
        let (_, r) = check_http_rules(&mut uri, "GET", "api", &http_rules(HTTP)).unwrap_err();
        assert_eq!(r.reason, Reason::HttpRuleDenied);
    }

    #[test]
    fn http_rules_refuse_a_path_without_a_normal_form() {
        let mut uri: Uri = "/v1/..;/admin".parse().unwrap();
        let (name, r) = check_http_rules(&mut uri, "GET", "api", &http_rules(HTTP)).unwrap_err();
        assert_eq!(name, None);
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::BAD_REQUEST, Reason::RequestRefused)
        );
    }
}
