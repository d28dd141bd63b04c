//! PKCE (RFC 7636, S256) and the random tokens the broker hands out (login handles, states,
//! nonces, session tokens): pure, apart from the HTTP client.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

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

#[cfg(test)]
mod tests {
    use super::*;

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
