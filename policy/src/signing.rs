//! Signatures over profiles: minisign (Ed25519), the format of `minisign -Vm` and OpenBSD
//! signify's successor, so security teams can sign and check profiles with tools they know.
//!
//! A profile is enforced only after [`load_verified`] checks its detached signature against a
//! trusted public key. Only prehashed (current minisign) signatures are accepted.

use std::io::Cursor;

/// A trusted minisign public key.
pub use minisign::PublicKey;
use minisign::{KeyPair, PublicKeyBox, SecretKeyBox, SignatureBox};

use crate::Policy;
use crate::profile::{self, ProfileError};

/// Why signing or verification failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The public key file is not a minisign public key.
    #[error("public key is not a minisign public key")]
    PublicKey(#[source] minisign::PError),
    /// The secret key file is not a minisign secret key, or the password is wrong.
    #[error("secret key is not a usable minisign secret key")]
    SecretKey(#[source] minisign::PError),
    /// The signature file is not a minisign signature.
    #[error("signature is not a minisign signature")]
    SignatureFormat(#[source] minisign::PError),
    /// The signature does not verify against the trusted key (wrong key, or altered profile).
    #[error("signature does not verify against the trusted key")]
    BadSignature(#[source] minisign::PError),
    /// Generating a key or a signature failed.
    #[error("could not create key or signature")]
    Create(#[source] minisign::PError),
    /// The signature is good but the profile itself is invalid.
    #[error("signed profile is invalid")]
    Profile(#[source] ProfileError),
}

/// A freshly generated key pair, as the text of its two files.
#[derive(Debug)]
pub struct GeneratedKey {
    /// The public key file (`.pub`): give this to every proxy that enforces the profiles.
    pub public: String,
    /// The secret key file (`.key`): keep it with whoever signs profiles.
    pub secret: String,
}

/// Generates a key pair. An empty `password` leaves the secret key unencrypted.
pub fn generate(password: &str) -> Result<GeneratedKey, SignError> {
    let kp = KeyPair::generate_encrypted_keypair(Some(password.to_owned()))
        .map_err(SignError::Create)?;
    let public = kp.pk.to_box().map_err(SignError::Create)?.into_string();
    let secret = kp
        .sk
        .to_box(Some("moat policy signing key"))
        .map_err(SignError::Create)?
        .into_string();
    Ok(GeneratedKey { public, secret })
}

/// Parses a public key from its file text (or a bare base64 line).
pub fn parse_public_key(text: &str) -> Result<PublicKey, SignError> {
    let trimmed = text.trim();
    if trimmed.lines().count() == 1 {
        return PublicKey::from_base64(trimmed).map_err(SignError::PublicKey);
    }
    PublicKeyBox::from_string(trimmed)
        .and_then(PublicKeyBox::into_public_key)
        .map_err(SignError::PublicKey)
}

/// Signs `profile` with the secret key file text, returning the detached signature file text.
/// The profile must parse: nobody should be able to sign a profile the proxy would refuse.
pub fn sign(profile: &[u8], secret_key: &str, password: &str) -> Result<String, SignError> {
    let text = std::str::from_utf8(profile).map_err(|_| {
        SignError::Profile(ProfileError::Syntax(serde::de::Error::custom(
            "profile is not UTF-8",
        )))
    })?;
    let policy = profile::parse(text).map_err(SignError::Profile)?;
    let sk = SecretKeyBox::from_string(secret_key)
        .and_then(|b| b.into_secret_key(Some(password.to_owned())))
        .map_err(SignError::SecretKey)?;
    let trusted = format!("moat policy profile {:?}", policy.name);
    let sig = minisign::sign(None, &sk, Cursor::new(profile), Some(&trusted), None)
        .map_err(SignError::Create)?;
    Ok(sig.into_string())
}

/// Verifies `profile` against its detached `signature` and the trusted `key`, then compiles it.
/// Nothing of the profile is parsed before the signature is good.
pub fn load_verified(
    profile: &[u8],
    signature: &str,
    key: &PublicKey,
) -> Result<Policy, SignError> {
    let sig = SignatureBox::from_string(signature).map_err(SignError::SignatureFormat)?;
    minisign::verify(key, &sig, Cursor::new(profile), true, false, false)
        .map_err(SignError::BadSignature)?;
    let text = std::str::from_utf8(profile).map_err(|_| {
        SignError::Profile(ProfileError::Syntax(serde::de::Error::custom(
            "profile is not UTF-8",
        )))
    })?;
    profile::parse(text).map_err(SignError::Profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` signed with a fresh key by plain minisign (as any signer would, where `sign`
    /// refuses it), then loaded: the load's error, with its cause.
    fn load_error_of_validly_signed(text: &str) -> String {
        let key = generate("").unwrap();
        assert!(sign(text.as_bytes(), &key.secret, "").is_err());
        let sk = SecretKeyBox::from_string(&key.secret)
            .and_then(|b| b.into_secret_key(Some(String::new())))
            .unwrap();
        let sig = minisign::sign(None, &sk, Cursor::new(text.as_bytes()), None, None)
            .unwrap()
            .into_string();
        let pk = parse_public_key(&key.public).unwrap();
        let err = load_verified(text.as_bytes(), &sig, &pk).unwrap_err();
        format!(
            "{err}: {}",
            std::error::Error::source(&err).map_or(String::new(), ToString::to_string)
        )
    }

    /// `sign` refuses a profile that does not compile, but any minisign signer would sign it:
    /// loading must refuse it all the same, naming what is wrong (a reload keeps the policy in
    /// force).
    #[test]
    fn a_validly_signed_profile_with_a_bad_http_rule_is_refused_on_load() {
        let chain = load_error_of_validly_signed(
            "version = 1\nname = \"t\"\n[[rules]]\nname = \"api\"\nhosts = [\"a.test\"]\n\
             ports = [443]\naction = \"intercept\"\n[rules.http]\ndefault = \"deny\"\n\
             [[rules.http.requests]]\nname = \"x\"\nmethods = [\"FETCH\"]\n\
             paths = [\"/\"]\naction = \"allow\"\n",
        );
        assert!(
            chain.contains("FETCH") && chain.contains("\"api\""),
            "{chain}"
        );
    }

    #[test]
    fn a_validly_signed_profile_with_bad_mcp_rules_is_refused_on_load() {
        let chain = load_error_of_validly_signed(
            "version = 1\nname = \"t\"\n[[rules]]\nname = \"tools\"\nhosts = [\"a.test\"]\n\
             ports = [443]\naction = \"intercept\"\n[rules.mcp]\n\
             methods = { default = \"allow\" }\n\
             tools = { default = \"deny\", allow = [\"x\"], deny = [\"x\"] }\n",
        );
        assert!(
            chain.contains("listed twice") && chain.contains("\"tools\""),
            "{chain}"
        );
    }
}
