//! OpenID Connect, the broker as a confidential client: discovery, authorization code with PKCE
//! (S256), the token exchange, and ID token validation against the provider's JWKS.
//!
//! An ID token is accepted only if all of these hold ([`IdTokenValidator::validate`]):
//! its header's `alg` is on the configured allow-list, which admits asymmetric algorithms only
//! (so neither `none` nor an HMAC keyed with a public key can pass); its `kid` names a signing key
//! of the provider's JWKS whose type fits that algorithm; the signature verifies; `iss` is the
//! configured issuer exactly, which the discovery document must also state; `aud` contains our
//! client id (and `azp` is our client id when there are several audiences); `exp` is in the future
//! and `iat` not in the future (30 s leeway); `nonce` equals the one this sign-in sent (the
//! device flow, RFC 8628, has no nonce: its ID token comes straight from the token endpoint to
//! the broker over TLS, so there is nothing to replay it into).
//!
//! Sign-in also asks for a refresh token (scope `offline_access` where the provider lists it),
//! which the broker keeps with the session, in memory only, to ask the provider again during the
//! session whether the person is still entitled ([`Provider::refresh`], `entitlement.rs`). An ID
//! token from a refresh is held to the same rules, except its `nonce` (OpenID Connect Core 12.2,
//! [`NonceRule::Refreshed`]).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::OidcConfig;
use moat_broker_client::https::{self, HttpsError};
use moat_broker_client::unix_now;

/// Clock skew tolerated on `exp` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// The JWKS is fetched again for an unknown `kid` at most this often (key rotation, without
/// letting forged tokens make the broker hammer the provider).
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);

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

/// Errors talking to the provider.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// An HTTPS exchange failed.
    #[error("cannot reach the identity provider")]
    Https(#[source] HttpsError),
    /// The provider answered with an error status.
    #[error("the identity provider answered {status} to {what}")]
    Status {
        /// What was asked.
        what: &'static str,
        /// The HTTP status.
        status: u16,
    },
    /// A document could not be parsed.
    #[error("the identity provider's {what} is not valid")]
    Document {
        /// Which document.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The discovery document names another issuer or a non-https endpoint.
    #[error("the discovery document is inconsistent: {0}")]
    Discovery(String),
    /// The configuration names an algorithm that is unknown or symmetric.
    #[error("algorithm {0:?} is not an allowed ID token algorithm")]
    ConfigAlgorithm(String),
    /// The ID token was refused.
    #[error("ID token refused")]
    Token(#[source] TokenError),
}

/// A refresh token: kept in memory with its session only, wiped when dropped, never logged
/// (`Debug` shows nothing of it), never audited, never sent to a client.
#[derive(Clone)]
pub struct RefreshToken(zeroize::Zeroizing<String>);

impl RefreshToken {
    /// Wraps a token.
    pub fn new(token: String) -> Self {
        RefreshToken(zeroize::Zeroizing::new(token))
    }

    /// The token, for the one request that sends it to the provider.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for RefreshToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(RefreshToken::new)
    }
}

/// A finished sign-in: who, and the refresh token the provider gave for re-checking them (none
/// if it gave none).
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The validated identity.
    pub identity: Identity,
    /// For the entitlement checks during the session.
    pub refresh_token: Option<RefreshToken>,
}

/// Why a refresh did not confirm a session.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The provider refused the refresh token (OAuth `invalid_grant`: revoked, expired, account
    /// disabled, or the grant withdrawn).
    #[error("the identity provider refused the refresh token")]
    Refused,
    /// The provider answered with an ID token that does not pass validation.
    #[error("the refreshed ID token was refused")]
    Token(#[source] TokenError),
    /// The provider answered without an ID token, so the groups are unknown.
    #[error("the identity provider's refresh answer holds no ID token")]
    NoIdToken,
    /// No usable answer: unreachable, an error status other than `invalid_grant`, or garbage.
    #[error("the identity provider gave no usable answer")]
    Unavailable(#[source] OidcError),
}

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

/// The parts of the discovery document the broker uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    /// Must equal the configured issuer.
    pub issuer: String,
    /// Where the browser goes.
    pub authorization_endpoint: String,
    /// Where the code is exchanged.
    pub token_endpoint: String,
    /// The provider's public keys.
    pub jwks_uri: String,
    /// Where a device flow starts (RFC 8628), if the provider offers it.
    pub device_authorization_endpoint: Option<String>,
    /// The scopes it supports; `offline_access` among them means the broker asks for it.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
}

/// The provider's answer to a device authorization request.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    /// The broker's secret for polling; never leaves the broker.
    pub device_code: String,
    /// What the person types at `verification_uri`.
    pub user_code: String,
    /// Where the person goes, on any device.
    pub verification_uri: String,
    /// The same, with the code filled in.
    pub verification_uri_complete: Option<String>,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Seconds between polls.
    #[serde(default = "default_interval")]
    pub interval: u64,
}

fn default_interval() -> u64 {
    5
}

/// One poll's outcome.
#[derive(Debug, Clone)]
pub enum DevicePoll {
    /// Not approved yet.
    Pending,
    /// Poll less often (RFC 8628 section 3.5: add 5 seconds).
    SlowDown,
    /// Approved: the validated identity (and a refresh token, if the provider gave one).
    Done(SignedIn),
}

/// PKCE (RFC 7636) with S256.
#[derive(Debug)]
pub struct Pkce {
    /// Sent with the token request; never leaves the broker otherwise.
    pub verifier: String,
    /// Sent in the authorization request.
    pub challenge: String,
}

impl Pkce {
    /// A fresh verifier (32 random bytes, 43 characters) and its challenge.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        Ok(Self::from_verifier(random_token()?))
    }

    /// The S256 challenge of `verifier`.
    pub fn from_verifier(verifier: String) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
        Pkce {
            challenge: URL_SAFE_NO_PAD.encode(digest.as_ref()),
            verifier,
        }
    }
}

/// 32 bytes from the system's CSPRNG, base64url (no padding).
pub fn random_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
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
pub fn parse_algorithm(name: &str) -> Result<Algorithm, OidcError> {
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
        _ => return Err(OidcError::ConfigAlgorithm(name.to_owned())),
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
    ) -> Result<Self, OidcError> {
        let algorithms = algorithms
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(OidcError::ConfigAlgorithm(String::new()));
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

/// The provider, discovered: endpoints, current keys and the validator.
#[derive(Debug)]
pub struct Provider {
    config: OidcConfig,
    client_secret: String,
    http: https::Client,
    discovery: Discovery,
    validator: IdTokenValidator,
    jwks: Mutex<(JwkSet, Instant)>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: String,
    refresh_token: Option<RefreshToken>,
}

#[derive(Debug, Deserialize)]
struct RefreshResponse {
    id_token: Option<String>,
    refresh_token: Option<RefreshToken>,
}

/// Reads the token endpoint's answer to a refresh: the ID token and the rotated refresh token,
/// if any. An OAuth `invalid_grant` is a refusal; any other error status or an unreadable body
/// is no answer.
fn parse_refresh_response(
    status: u16,
    body: &[u8],
) -> Result<(String, Option<RefreshToken>), RefreshError> {
    if (200..300).contains(&status) {
        let tokens: RefreshResponse = serde_json::from_slice(body).map_err(|source| {
            RefreshError::Unavailable(OidcError::Document {
                what: "refresh response",
                source,
            })
        })?;
        let id_token = tokens.id_token.ok_or(RefreshError::NoIdToken)?;
        return Ok((id_token, tokens.refresh_token));
    }
    #[derive(Deserialize)]
    struct ErrorResponse {
        error: String,
    }
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) if (400..500).contains(&status) && e.error == "invalid_grant" => {
            Err(RefreshError::Refused)
        }
        _ => Err(RefreshError::Unavailable(OidcError::Status {
            what: "the refresh request",
            status,
        })),
    }
}

impl Provider {
    /// Fetches the discovery document and the JWKS and checks that they belong to `config.issuer`.
    pub async fn discover(
        config: OidcConfig,
        client_secret: String,
        http: https::Client,
    ) -> Result<Self, OidcError> {
        let validator = IdTokenValidator::new(
            &config.issuer,
            &config.client_id,
            &config.algorithms,
            &config.groups_claim,
        )?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = get_json(&http, &url, "discovery document").await?;
        if discovery.issuer != config.issuer {
            return Err(OidcError::Discovery(format!(
                "it names issuer {:?}",
                discovery.issuer
            )));
        }
        for endpoint in [
            Some(&discovery.authorization_endpoint),
            Some(&discovery.token_endpoint),
            Some(&discovery.jwks_uri),
            discovery.device_authorization_endpoint.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !endpoint.starts_with("https://") {
                return Err(OidcError::Discovery(format!("{endpoint:?} is not https")));
            }
        }
        let jwks: JwkSet = get_json(&http, &discovery.jwks_uri, "JWKS").await?;
        Ok(Provider {
            config,
            client_secret,
            http,
            discovery,
            validator,
            jwks: Mutex::new((jwks, Instant::now())),
        })
    }

    /// The scopes asked for at sign-in: `openid email groups`, and `offline_access` (for a
    /// refresh token) when the provider lists it.
    pub fn scope(&self) -> &'static str {
        scope_for(&self.discovery.scopes_supported)
    }

    /// The browser's destination for one sign-in.
    pub fn authorize_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        pkce_challenge: &str,
    ) -> String {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", self.scope())
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", pkce_challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if self.discovery.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}{query}", self.discovery.authorization_endpoint)
    }

    /// Exchanges `code` (with the PKCE verifier) and validates the ID token it yields.
    pub async fn sign_in(
        &self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
        nonce: &str,
    ) -> Result<SignedIn, OidcError> {
        let response = self
            .http
            .post_form(
                &self.discovery.token_endpoint,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                    ("code_verifier", verifier),
                ],
                Some((&self.config.client_id, &self.client_secret)),
            )
            .await
            .map_err(OidcError::Https)?;
        if !response.status().is_success() {
            return Err(OidcError::Status {
                what: "the token request",
                status: response.status().as_u16(),
            });
        }
        let tokens: TokenResponse =
            serde_json::from_slice(response.body()).map_err(|source| OidcError::Document {
                what: "token response",
                source,
            })?;
        let identity = self.validate(&tokens.id_token, Some(nonce)).await?;
        Ok(SignedIn {
            identity,
            refresh_token: tokens.refresh_token,
        })
    }

    /// Uses `refresh_token` at the token endpoint (client authentication as for the code) and
    /// validates the ID token of the answer; `nonce` is the sign-in's rule for the refreshed
    /// token's nonce. Returns the identity the provider vouches for now and the rotated refresh
    /// token, if it rotated it.
    pub async fn refresh(
        &self,
        refresh_token: &RefreshToken,
        nonce: NonceRule<'_>,
    ) -> Result<SignedIn, RefreshError> {
        let response = self
            .http
            .post_form(
                &self.discovery.token_endpoint,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose()),
                ],
                Some((&self.config.client_id, &self.client_secret)),
            )
            .await
            .map_err(|e| RefreshError::Unavailable(OidcError::Https(e)))?;
        let (id_token, rotated) =
            parse_refresh_response(response.status().as_u16(), response.body())?;
        let identity = self
            .validate_rule(&id_token, nonce)
            .await
            .map_err(|e| match e {
                OidcError::Token(t) => RefreshError::Token(t),
                other => RefreshError::Unavailable(other),
            })?;
        Ok(SignedIn {
            identity,
            refresh_token: rotated,
        })
    }

    /// Starts a device authorization (RFC 8628) at the provider.
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, OidcError> {
        let endpoint = self
            .discovery
            .device_authorization_endpoint
            .as_deref()
            .ok_or_else(|| OidcError::Discovery("no device_authorization_endpoint".into()))?;
        let response = self
            .http
            .post_form(
                endpoint,
                &[("scope", self.scope())],
                Some((&self.config.client_id, &self.client_secret)),
            )
            .await
            .map_err(OidcError::Https)?;
        if !response.status().is_success() {
            return Err(OidcError::Status {
                what: "the device authorization request",
                status: response.status().as_u16(),
            });
        }
        serde_json::from_slice(response.body()).map_err(|source| OidcError::Document {
            what: "device authorization response",
            source,
        })
    }

    /// Asks the token endpoint once whether the person has approved `device_code`.
    pub async fn device_poll(&self, device_code: &str) -> Result<DevicePoll, OidcError> {
        let response = self
            .http
            .post_form(
                &self.discovery.token_endpoint,
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", device_code),
                ],
                Some((&self.config.client_id, &self.client_secret)),
            )
            .await
            .map_err(OidcError::Https)?;
        if response.status().is_success() {
            let tokens: TokenResponse =
                serde_json::from_slice(response.body()).map_err(|source| OidcError::Document {
                    what: "token response",
                    source,
                })?;
            let identity = self.validate(&tokens.id_token, None).await?;
            return Ok(DevicePoll::Done(SignedIn {
                identity,
                refresh_token: tokens.refresh_token,
            }));
        }
        #[derive(Deserialize)]
        struct ErrorResponse {
            error: String,
        }
        let error = serde_json::from_slice::<ErrorResponse>(response.body())
            .map(|e| e.error)
            .unwrap_or_default();
        match error.as_str() {
            "authorization_pending" => Ok(DevicePoll::Pending),
            "slow_down" => Ok(DevicePoll::SlowDown),
            _ => Err(OidcError::Status {
                what: "the device token request",
                status: response.status().as_u16(),
            }),
        }
    }

    /// Validates an ID token, fetching the JWKS again (rate-limited) if its key is unknown.
    pub async fn validate(&self, token: &str, nonce: Option<&str>) -> Result<Identity, OidcError> {
        let rule = match nonce {
            Some(n) => NonceRule::Equals(n),
            None => NonceRule::Unchecked,
        };
        self.validate_rule(token, rule).await
    }

    async fn validate_rule(
        &self,
        token: &str,
        nonce: NonceRule<'_>,
    ) -> Result<Identity, OidcError> {
        let now = unix_now();
        let first = {
            let jwks = self.lock_jwks();
            self.validator.validate_with(token, &jwks.0, nonce, now)
        };
        match first {
            Err(TokenError::UnknownKey) if self.may_refresh() => {
                let fresh: JwkSet = get_json(&self.http, &self.discovery.jwks_uri, "JWKS").await?;
                let result = self.validator.validate_with(token, &fresh, nonce, now);
                *self.lock_jwks() = (fresh, Instant::now());
                result.map_err(OidcError::Token)
            }
            other => other.map_err(OidcError::Token),
        }
    }

    fn may_refresh(&self) -> bool {
        self.lock_jwks().1.elapsed() >= JWKS_REFRESH_MIN
    }

    fn lock_jwks(&self) -> std::sync::MutexGuard<'_, (JwkSet, Instant)> {
        self.jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &https::Client,
    url: &str,
    what: &'static str,
) -> Result<T, OidcError> {
    let response = http.get(url).await.map_err(OidcError::Https)?;
    if !response.status().is_success() {
        return Err(OidcError::Status {
            what,
            status: response.status().as_u16(),
        });
    }
    serde_json::from_slice(response.body()).map_err(|source| OidcError::Document { what, source })
}

/// The sign-in scope for a provider that supports `scopes_supported`.
fn scope_for(scopes_supported: &[String]) -> &'static str {
    if scopes_supported.iter().any(|s| s == "offline_access") {
        "openid email groups offline_access"
    } else {
        "openid email groups"
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
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
            assert!(matches!(err, Err(OidcError::ConfigAlgorithm(_))), "{alg}");
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

    #[test]
    fn a_refresh_answer_is_read_as_tokens_a_refusal_or_no_answer() {
        let (id, rotated) = parse_refresh_response(
            200,
            br#"{"id_token":"h.p.s","refresh_token":"rt2","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(id, "h.p.s");
        assert_eq!(rotated.unwrap().expose(), "rt2");
        let (_, kept) = parse_refresh_response(200, br#"{"id_token":"h.p.s"}"#).unwrap();
        assert!(kept.is_none(), "no rotation: the old token stays");

        let refused = |status, body: &[u8]| parse_refresh_response(status, body).unwrap_err();
        assert!(matches!(
            refused(
                400,
                br#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#
            ),
            RefreshError::Refused
        ));
        assert!(matches!(
            refused(200, br#"{"access_token":"at"}"#),
            RefreshError::NoIdToken
        ));
        // Not about the person: no answer, which fails closed at the interval's end.
        for (status, body) in [
            (401, &br#"{"error":"invalid_client"}"#[..]),
            (500, br#"{"error":"server_error"}"#),
            (503, b"<html>down</html>"),
            (200, b"garbage"),
            (500, br#"{"error":"invalid_grant"}"#),
        ] {
            assert!(
                matches!(refused(status, body), RefreshError::Unavailable(_)),
                "{status} {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn offline_access_is_asked_for_only_where_the_provider_lists_it() {
        let listed = ["openid".to_owned(), "offline_access".to_owned()];
        assert_eq!(scope_for(&listed), "openid email groups offline_access");
        assert_eq!(scope_for(&listed[..1]), "openid email groups");
        assert_eq!(scope_for(&[]), "openid email groups");
    }

    #[test]
    fn a_refresh_token_shows_nothing_of_itself() {
        let token = RefreshToken::new("rt-secret-value".into());
        assert_eq!(format!("{token:?}"), "RefreshToken(<redacted>)");
        let response: TokenResponse =
            serde_json::from_str(r#"{"id_token":"x","refresh_token":"rt-secret-value"}"#).unwrap();
        assert!(!format!("{response:?}").contains("rt-secret-value"));
    }

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        let pkce = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(
            pkce.challenge,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(Pkce::generate().unwrap().verifier.len(), 43);
    }
}
