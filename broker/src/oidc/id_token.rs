//! The pure part of OpenID Connect: checking one ID token against the provider's key set, with
//! no I/O and no clock of its own (the caller passes the time). Apart from the HTTP client
//! (`oidc`'s `Provider`) so that it can be read, tested and fuzzed on its own.
//!
//! An ID token is accepted only if all of these hold ([`IdTokenValidator::validate`]):
//! its header's `alg` is on the configured allow-list, which admits asymmetric algorithms only
//! (so neither `none` nor an HMAC keyed with a public key can pass); its `kid` names a signing key
//! of the provider's JWKS whose type fits that algorithm; the signature verifies; `iss` is the
//! configured issuer exactly, which the discovery document must also state; `aud` contains our
//! client id (and `azp` is our client id when there are several audiences); `exp` is in the future
//! and `iat` not in the future (30 s leeway); `nonce` equals the one this sign-in sent (the
//! device flow, RFC 8628, has no nonce: its ID token comes straight from the token endpoint to
//! the broker over TLS, so there is nothing to replay it into). An ID token from a refresh is held to the same rules,
//! except its `nonce` (OpenID Connect Core 12.2, [`NonceRule::Refreshed`]).

use std::collections::HashSet;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// Why an ID token was refused. Messages never include the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWS compact serialisation with a known algorithm (this includes `alg: none`).
    #[error("the ID token is malformed or names an unknown algorithm")]
    Malformed,
    /// The algorithm is not on the allow-list.
    #[error("the ID token's algorithm {0} is not allowed")]
    Algorithm(String),
    /// No key of the provider's JWKS fits the token's `kid` and algorithm.
    #[error("no signing key of the provider matches the ID token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the ID token's signature does not verify")]
    Signature,
    /// Expired (or `iat` in the future).
    #[error("the ID token has expired or is not yet valid")]
    Expired,
    /// `iss` is not the configured issuer.
    #[error("the ID token is from another issuer")]
    Issuer,
    /// `aud` (or `azp`) is not our client.
    #[error("the ID token is for another audience")]
    Audience,
    /// `nonce` missing or not this sign-in's.
    #[error("the ID token's nonce does not match this sign-in")]
    Nonce,
    /// A required claim is missing or has the wrong type.
    #[error("the ID token lacks a required claim")]
    Claims,
}

/// The configuration names an algorithm that is unknown or symmetric (HS*): never one an ID
/// token may be checked with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("algorithm {0:?} is not an allowed ID token algorithm")]
pub struct AlgorithmRefused(pub String);

/// Who signed in: what the broker keeps of a validated ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The provider's subject identifier.
    pub subject: String,
    /// The email claim, when present (audit only; never used to decide).
    pub email: Option<String>,
    /// The groups claim (strings only).
    pub groups: Vec<String>,
}

/// What an ID token's `nonce` claim must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceRule<'a> {
    /// This sign-in's nonce, exactly (authorization code flow).
    Equals(&'a str),
    /// Not checked: the device flow sends none, and its token comes straight from the token
    /// endpoint.
    Unchecked,
    /// An ID token from a refresh (OpenID Connect Core 12.2): the nonce may be absent; if present
    /// it must be the original sign-in's (`None`: the sign-in had none).
    Refreshed(Option<&'a str>),
}

/// The pure part: checks one ID token against a key set. No I/O, no clock of its own.
#[derive(Debug, Clone)]
pub struct IdTokenValidator {
    issuer: String,
    client_id: String,
    algorithms: Vec<Algorithm>,
    groups_claim: String,
}

/// Parses a configured algorithm name; symmetric (HS*) and unknown names are refused.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, AlgorithmRefused> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(AlgorithmRefused(name.to_owned())),
    };
    Ok(alg)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    // Tried in order: an array first, since anything matches `IgnoredAny`.
    Many(Vec<String>),
    One(serde::de::IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    aud: Audience,
    azp: Option<String>,
    nonce: Option<String>,
    email: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl IdTokenValidator {
    /// A validator for tokens from `issuer` to `client_id`, signed with one of `algorithms`.
    pub fn new(
        issuer: &str,
        client_id: &str,
        algorithms: &[String],
        groups_claim: &str,
    ) -> Result<Self, AlgorithmRefused> {
        let algorithms = algorithms
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(AlgorithmRefused(String::new()));
        }
        Ok(IdTokenValidator {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            algorithms,
            groups_claim: groups_claim.to_owned(),
        })
    }

    /// Validates `token` against `keys`, expecting `nonce` (`None`: device flow), at Unix time
    /// `now`.
    pub fn validate(
        &self,
        token: &str,
        keys: &JwkSet,
        nonce: Option<&str>,
        now: u64,
    ) -> Result<Identity, TokenError> {
        let rule = match nonce {
            Some(n) => NonceRule::Equals(n),
            None => NonceRule::Unchecked,
        };
        self.validate_with(token, keys, rule, now)
    }

    /// Validates `token` against `keys` with `nonce` as its nonce rule, at Unix time `now`.
    pub fn validate_with(
        &self,
        token: &str,
        keys: &JwkSet,
        nonce: NonceRule<'_>,
        now: u64,
    ) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let jwk = find_key(keys, header.kid.as_deref(), header.alg)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| TokenError::UnknownKey)?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.client_id]);
        validation.required_spec_claims = ["exp", "iat", "iss", "aud", "sub"]
            .into_iter()
            .map(String::from)
            .collect::<HashSet<_>>();
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::Signature,
                K::ExpiredSignature | K::ImmatureSignature => TokenError::Expired,
                K::InvalidIssuer => TokenError::Issuer,
                K::InvalidAudience => TokenError::Audience,
                K::InvalidAlgorithm => TokenError::Algorithm(format!("{:?}", header.alg)),
                K::MissingRequiredClaim(_) | K::Json(_) => TokenError::Claims,
                _ => TokenError::Malformed,
            }
        })?;
        let claims = data.claims;
        if claims.iat > now.saturating_add(LEEWAY.as_secs()) {
            return Err(TokenError::Expired);
        }
        // OpenID Connect Core 3.1.3.7: with several audiences, azp must be us.
        let several = matches!(&claims.aud, Audience::Many(v) if v.len() > 1);
        if (several || claims.azp.is_some())
            && claims.azp.as_deref() != Some(self.client_id.as_str())
        {
            return Err(TokenError::Audience);
        }
        let nonce_ok = match nonce {
            NonceRule::Equals(n) => claims.nonce.as_deref() == Some(n),
            NonceRule::Unchecked => true,
            NonceRule::Refreshed(original) => {
                claims.nonce.is_none() || claims.nonce.as_deref() == original
            }
        };
        if !nonce_ok {
            return Err(TokenError::Nonce);
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Claims);
        }
        let groups = match claims.other.get(&self.groups_claim) {
            None => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => return Err(TokenError::Claims),
        };
        Ok(Identity {
            subject: claims.sub,
            email: claims.email,
            groups,
        })
    }
}

/// The JWKS key for `kid` that may verify `alg`.
fn find_key<'a>(
    keys: &'a JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'a Jwk, TokenError> {
    let fits = |k: &&Jwk| {
        let usable = !matches!(
            k.common.public_key_use,
            Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
        );
        let alg_ok = k
            .common
            .key_algorithm
            .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"));
        let family_ok = DecodingKey::from_jwk(k).is_ok_and(|_| key_family_fits(k, alg));
        usable && alg_ok && family_ok
    };
    let mut candidates = keys.keys.iter().filter(fits);
    match kid {
        Some(kid) => candidates
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .ok_or(TokenError::UnknownKey),
        // Without a kid, only an unambiguous key set will do.
        None => match (candidates.next(), candidates.next()) {
            (Some(k), None) => Ok(k),
            _ => Err(TokenError::UnknownKey),
        },
    }
}

fn key_family_fits(k: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    matches!(
        (&k.algorithm, alg),
        (
            P::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
        ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
            | (P::OctetKeyPair(_), Algorithm::EdDSA)
    )
}

#[cfg(test)]
mod tests {

    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use moat_broker_client::unix_now;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    const ISSUER: &str = "https://idp.test";
    const CLIENT: &str = "moat-broker";
    const NONCE: &str = "n-0S6_WzA2Mj";

    /// An ES256 key: its PKCS#8 (to sign) and its JWK set (to verify).
    struct Key {
        pkcs8: Vec<u8>,
        jwks: JwkSet,
        x: String,
    }

    fn key(kid: &str) -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
        let jwks = serde_json::from_value(json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"
        }]}))
        .unwrap();
        Key {
            pkcs8: pkcs8.as_ref().to_vec(),
            jwks,
            x,
        }
    }

    fn claims(now: u64) -> serde_json::Value {
        json!({
            "iss": ISSUER, "aud": CLIENT, "sub": "alice", "email": "alice@example.test",
            "iat": now, "exp": now + 300, "nonce": NONCE, "groups": ["eng", 7]
        })
    }

    fn sign(key: &Key, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&key.pkcs8)).unwrap()
    }

    fn validator() -> IdTokenValidator {
        IdTokenValidator::new(ISSUER, CLIENT, &["ES256".into(), "RS256".into()], "groups").unwrap()
    }

    #[test]
    fn a_well_formed_token_yields_subject_email_and_string_groups() {
        let k = key("k1");
        let now = unix_now();
        let id = validator()
            .validate(&sign(&k, "k1", &claims(now)), &k.jwks, Some(NONCE), now)
            .unwrap();
        assert_eq!(
            id,
            Identity {
                subject: "alice".into(),
                email: Some("alice@example.test".into()),
                groups: vec!["eng".into()],
            }
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let mut c = claims(now - 3600);
        c["exp"] = json!(now - 60);
        let err = validator().validate(&sign(&k, "k1", &c), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Expired));
    }

    #[test]
    fn a_token_signed_by_another_key_with_the_providers_kid_is_refused() {
        let provider = key("k1");
        let forger = key("k1");
        let now = unix_now();
        let forged = sign(&forger, "k1", &claims(now));
        let err = validator().validate(&forged, &provider.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Signature));
    }

    #[test]
    fn a_token_with_a_tampered_payload_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let token = sign(&k, "k1", &claims(now));
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = claims(now);
        c["groups"] = json!(["admins"]);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
        let err = validator().validate(&tampered, &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Signature));
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let mut c = claims(now);
        c["aud"] = json!("another-client");
        let err = validator().validate(&sign(&k, "k1", &c), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Audience));
    }

    #[test]
    fn a_token_for_several_audiences_without_our_azp_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let mut c = claims(now);
        c["aud"] = json!([CLIENT, "another-client"]);
        let err = validator().validate(&sign(&k, "k1", &c), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Audience));
    }

    #[test]
    fn a_token_from_another_issuer_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let mut c = claims(now);
        c["iss"] = json!("https://evil.test");
        let err = validator().validate(&sign(&k, "k1", &c), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Issuer));
    }

    #[test]
    fn a_token_with_another_sign_ins_nonce_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let err = validator().validate(&sign(&k, "k1", &claims(now)), &k.jwks, Some("other"), now);
        assert_eq!(err, Err(TokenError::Nonce));
    }

    #[test]
    fn a_device_flow_token_is_checked_without_a_nonce() {
        let k = key("k1");
        let now = unix_now();
        let mut c = claims(now);
        c.as_object_mut().unwrap().remove("nonce");
        let id = validator().validate(&sign(&k, "k1", &c), &k.jwks, None, now);
        assert_eq!(id.unwrap().subject, "alice");
    }

    #[test]
    fn an_unsigned_alg_none_token_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(now)).unwrap());
        let err = validator().validate(&format!("{header}.{payload}."), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Malformed));
    }

    #[test]
    fn an_hs256_token_keyed_with_the_public_key_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims(now),
            &EncodingKey::from_secret(k.x.as_bytes()),
        )
        .unwrap();
        let err = validator().validate(&token, &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::Algorithm("HS256".into())));
    }

    #[test]
    fn a_token_whose_kid_is_not_in_the_jwks_is_refused() {
        let k = key("k1");
        let now = unix_now();
        let err = validator().validate(&sign(&k, "k2", &claims(now)), &k.jwks, Some(NONCE), now);
        assert_eq!(err, Err(TokenError::UnknownKey));
    }

    #[test]
    fn symmetric_algorithms_cannot_be_configured() {
        for alg in ["HS256", "none", "hs256"] {
            let err = IdTokenValidator::new(ISSUER, CLIENT, &[alg.into()], "groups");
            assert!(matches!(err, Err(AlgorithmRefused(_))), "{alg}");
        }
    }

    #[test]
    fn a_refreshed_token_may_carry_the_original_nonce_or_none_but_no_other() {
        let k = key("k1");
        let now = unix_now();
        let rule = NonceRule::Refreshed(Some(NONCE));
        let with_original = sign(&k, "k1", &claims(now));
        let mut c = claims(now);
        c.as_object_mut().unwrap().remove("nonce");
        let without = sign(&k, "k1", &c);
        c["nonce"] = json!("another");
        let with_other = sign(&k, "k1", &c);

        let v = validator();
        assert_eq!(
            v.validate_with(&with_original, &k.jwks, rule, now)
                .unwrap()
                .subject,
            "alice"
        );
        assert_eq!(
            v.validate_with(&without, &k.jwks, rule, now)
                .unwrap()
                .subject,
            "alice"
        );
        assert_eq!(
            v.validate_with(&with_other, &k.jwks, rule, now),
            Err(TokenError::Nonce)
        );
        // A sign-in without a nonce: a refreshed token must not bring one.
        assert_eq!(
            v.validate_with(&with_original, &k.jwks, NonceRule::Refreshed(None), now),
            Err(TokenError::Nonce)
        );
    }

    #[test]
    fn a_refreshed_token_is_otherwise_held_to_the_sign_in_rules() {
        let k = key("k1");
        let now = unix_now();
        let rule = NonceRule::Refreshed(Some(NONCE));
        let mut c = claims(now);
        c["aud"] = json!("another-client");
        assert_eq!(
            validator().validate_with(&sign(&k, "k1", &c), &k.jwks, rule, now),
            Err(TokenError::Audience)
        );
        let mut c = claims(now - 3600);
        c["exp"] = json!(now - 60);
        assert_eq!(
            validator().validate_with(&sign(&k, "k1", &c), &k.jwks, rule, now),
            Err(TokenError::Expired)
        );
        let forger = key("k1");
        assert_eq!(
            validator().validate_with(&sign(&forger, "k1", &claims(now)), &k.jwks, rule, now),
            Err(TokenError::Signature)
        );
    }
}
