//! The broker's ID token check never panics and never accepts a token the provider did not
//! sign: neither arbitrary text nor a token built from fuzzed header and claims JSON with a
//! fuzzed signature (`alg: none`, HS256 keyed with the public key, unknown or missing `kid`,
//! wrong or missing claims, overlong fields all fall in there).
#![no_main]

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use libfuzzer_sys::fuzz_target;
use moat_broker::oidc::IdTokenValidator;

/// A P-256 public key the fuzzer has no private half for.
static KEYS: LazyLock<JwkSet> = LazyLock::new(|| {
    serde_json::from_value(serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
        "x": "jiNkWlN9jQS8_j6F5GmPz_O9MQ4KGS_DxPExZRiSaMY",
        "y": "xADe7r0zThXCmOt7icZE6TP-PB8KhHfcHaIYzeKnPHg",
    }]}))
    .expect("a valid JWK set")
});

static VALIDATOR: LazyLock<IdTokenValidator> = LazyLock::new(|| {
    IdTokenValidator::new(
        "https://idp.test",
        "moat-broker",
        &["ES256".into(), "RS256".into(), "EdDSA".into()],
        "groups",
    )
    .expect("a valid validator")
});

const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    // As text.
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(VALIDATOR.validate(token, &KEYS, Some("n"), NOW).is_err());
        assert!(VALIDATOR.validate(token, &KEYS, None, NOW).is_err());
    }
    // As header | claims | signature, each base64url-encoded like a real token.
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        return;
    };
    let signature = parts.next().unwrap_or_default();
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims),
        URL_SAFE_NO_PAD.encode(signature)
    );
    assert!(VALIDATOR.validate(&token, &KEYS, Some("n"), NOW).is_err());
});
