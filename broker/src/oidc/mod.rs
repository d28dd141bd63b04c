//! OpenID Connect, the broker as a confidential client: discovery, authorization code with PKCE
//! (S256), the token exchange, the device flow and refreshes: everything that talks to the
//! identity provider ([`Provider`]). What is checked without I/O is apart: the ID token
//! ([`id_token`]: no network, no clock of its own, fuzzed) and PKCE ([`pkce`]).
//!
//! Sign-in also asks for a refresh token (scope `offline_access` where the provider lists it),
//! which the broker keeps with the session, in memory only, to ask the provider again during the
//! session whether the person is still entitled ([`Provider::refresh`], `entitlement.rs`). An ID
//! token from a refresh is held to the same rules, except its `nonce` (OpenID Connect Core 12.2,
//! [`NonceRule::Refreshed`]).

pub mod id_token;
pub mod pkce;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use moat_broker_client::https::{self, HttpsError};
use moat_broker_client::unix_now;
use serde::Deserialize;

use crate::config::OidcConfig;

pub use id_token::{AlgorithmRefused, IdTokenValidator, Identity, NonceRule, TokenError};
pub use pkce::{Pkce, random_token};

/// The JWKS is fetched again for an unknown `kid` at most this often (key rotation, without
/// letting forged tokens make the broker hammer the provider).
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);

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
    #[error(transparent)]
    ConfigAlgorithm(#[from] AlgorithmRefused),
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
}
