//! The per-request rules of intercepted flows (authority, placeholders, credential injection)
//! on arbitrary request heads: never a panic; a secret is only ever written into a request for
//! its bound host, exactly once, in its presentation header; a placeholder for an unbound host
//! is always refused.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use moat_egress::intercept::inject;
use moat_egress::secrets::Secrets;

const SECRET: &str = "sk-real-fuzz-7c1d";
const PLACEHOLDER: &str = "sk-moat-placeholder-fuzz";

fn secrets() -> &'static Arc<Secrets> {
    static S: OnceLock<Arc<Secrets>> = OnceLock::new();
    S.get_or_init(|| {
        let text = format!(
            "version = 1\nname = \"fuzz\"\n[[secrets]]\nname = \"api\"\n\
             source = {{ command = [\"printf\", \"{SECRET}\"] }}\nplaceholder = \"{PLACEHOLDER}\"\n\
             hosts = [\"api.test\"]\npaths = [\"/v1/\"]\npresentation = \"authorization_bearer\"\n"
        );
        let policy = moat_policy::profile::parse(&text).expect("fuzz profile");
        Secrets::load(&policy.secrets).expect("fuzz secret")
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = req.parse(data) else {
        return;
    };
    // Only the head is looked at here (bodies are scanned by intercept/scan.rs).
    let head = &data[..head_len];
    let Some(Ok(uri)) = req.path.map(|p| p.parse::<http::Uri>()) else {
        return;
    };
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        map.append(n, v);
    }
    // What would be forwarded: the method, the target as parsed (a fragment is dropped), the
    // header names (lowercased) and values.
    let mut forwarded = Vec::new();
    forwarded.extend_from_slice(req.method.unwrap_or("").as_bytes());
    forwarded.push(b' ');
    forwarded.extend_from_slice(uri.to_string().as_bytes());
    for (n, v) in &map {
        forwarded.push(b'\n');
        forwarded.extend_from_slice(n.as_str().as_bytes());
        forwarded.push(b':');
        forwarded.extend_from_slice(v.as_bytes());
    }
    let had_secret = contains(head, SECRET.as_bytes());
    let had_placeholder = contains(&forwarded, PLACEHOLDER.as_bytes());
    let may_refuse = had_placeholder;
    for host in ["api.test", "other.test"] {
        let _ = inject::check_authority(&map, &uri, host, 443);
        let mut h = map.clone();
        match inject::apply_secrets(
            &mut h,
            req.method.unwrap_or(""),
            &uri,
            secrets(),
            host,
            443,
            false,
        ) {
            Ok(injected) => {
                let values: Vec<&[u8]> = h.iter().map(|(_, v)| v.as_bytes()).collect();
                let carrying = values
                    .iter()
                    .filter(|v| contains(v, SECRET.as_bytes()))
                    .count();
                if injected.is_empty() {
                    assert!(
                        had_secret || carrying == 0,
                        "secret written without a binding"
                    );
                    assert!(
                        host == "api.test" || !had_placeholder,
                        "unbound placeholder passed"
                    );
                } else {
                    assert_eq!(host, "api.test");
                    assert_eq!(h.get_all("authorization").iter().count(), 1);
                    assert_eq!(h["authorization"], format!("Bearer {SECRET}").as_str());
                }
                inject::strip_hop_by_hop(&mut h);
            }
            Err(refusal) => assert!(may_refuse, "refused without a placeholder: {refusal:?}"),
        }
    }
});
