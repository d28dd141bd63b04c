//! The per-host audit key (Ed25519) that signs checkpoints: made on first use (mode 0600,
//! never overwritten), its public half printed by `moat audit pubkey` and given to
//! `moat audit verify --pubkey`.
//!
//! A checkpoint's signature is over `SIGNED_PREFIX` followed by the checkpoint record's hash,
//! which covers every field of the record, its `seq` and `prev` (and so, through `prev`, every
//! record before it in the run).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use crate::chain::{self, Hash};

/// Domain separation: these signatures mean "a moat audit checkpoint", nothing else.
const SIGNED_PREFIX: &[u8] = b"moat audit checkpoint v1\n";

/// Domain separation for a bundle's manifest.
const MANIFEST_PREFIX: &[u8] = b"moat audit bundle manifest v1\n";

/// The first word of a public key file.
const PUBLIC_TAG: &str = "moat-audit-ed25519";

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or created.
    #[error("cannot use audit key file {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Others may read the key file: anyone who can read it can forge checkpoints.
    #[error("audit key file {} is readable by others (mode {mode:o}); make it 0600", .path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The file does not hold an Ed25519 key.
    #[error("audit key file {} is not an Ed25519 PKCS#8 key", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
    },
    /// Generating a key failed.
    #[error("cannot generate an audit key")]
    Generate,
    /// A public key is not `moat-audit-ed25519 <base64 of 32 bytes>`.
    #[error("not a moat audit public key (expected `{PUBLIC_TAG} <base64>`)")]
    PublicKey,
}

/// The signing key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("fingerprint", &self.public().fingerprint())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A fresh key held only in memory: a log it signs is checked only against the key the log
    /// itself names (for tests, and writers given no key file).
    pub fn ephemeral() -> Result<AuditKey, KeyError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| KeyError::Generate)?;
        Ok(AuditKey { pair })
    }

    /// Loads the key at `path`, or makes it there (0600, exclusively: two first runs at once
    /// never leave two keys) if there is none. A key file others may read is refused.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let io_err = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(pkcs8.as_ref())
                    .and_then(|()| f.sync_all())
                    .map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e)),
        }
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.mode() & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_owned(),
                mode: meta.mode() & 0o7777,
            });
        }
        let bytes = std::fs::read(path).map_err(io_err)?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_owned(),
        })?;
        Ok(AuditKey { pair })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs a checkpoint record's hash.
    pub fn sign(&self, record_hash: &Hash) -> String {
        let mut msg = SIGNED_PREFIX.to_vec();
        msg.extend_from_slice(record_hash);
        B64.encode(self.pair.sign(&msg).as_ref())
    }

    /// Signs an evidence bundle's manifest (its bytes, as stored in the bundle).
    pub fn sign_manifest(&self, manifest: &[u8]) -> String {
        let mut msg = MANIFEST_PREFIX.to_vec();
        msg.extend_from_slice(&chain::sha256(manifest));
        B64.encode(self.pair.sign(&msg).as_ref())
    }
}

/// An audit public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses `moat-audit-ed25519 <base64>` (the `moat audit pubkey` line), or the bare base64.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let text = text.trim();
        let b64 = text.strip_prefix(PUBLIC_TAG).map_or(text, str::trim_start);
        let bytes = B64.decode(b64).map_err(|_| KeyError::PublicKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::PublicKey)?;
        Ok(PublicKey(bytes))
    }

    /// The base64 of the key.
    pub fn base64(&self) -> String {
        B64.encode(self.0)
    }

    /// The key file's line: `moat-audit-ed25519 <base64>`.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_TAG} {}", self.base64())
    }

    /// `SHA256:` and the hex of the key's SHA-256: what records name it by.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        format!("SHA256:{}", chain::hex(d.as_ref()))
    }

    /// Does `signature` (base64) sign `record_hash`?
    pub fn verify(&self, record_hash: &Hash, signature: &str) -> bool {
        self.verify_prefixed(SIGNED_PREFIX, record_hash, signature)
    }

    /// Does `signature` (base64) sign the bundle manifest `manifest`?
    pub fn verify_manifest(&self, manifest: &[u8], signature: &str) -> bool {
        self.verify_prefixed(MANIFEST_PREFIX, &chain::sha256(manifest), signature)
    }

    fn verify_prefixed(&self, prefix: &[u8], hash: &Hash, signature: &str) -> bool {
        let Ok(sig) = B64.decode(signature.trim()) else {
            return false;
        };
        let mut msg = prefix.to_vec();
        msg.extend_from_slice(hash);
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(&msg, &sig)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_is_made_once_0600_and_read_back_the_same() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let a = AuditKey::load_or_create(&path).unwrap();
        let b = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        AuditKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            AuditKey::load_or_create(&path),
            Err(KeyError::Exposed { .. })
        ));
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_hash() {
        let key = AuditKey::ephemeral().unwrap();
        let other = AuditKey::ephemeral().unwrap();
        let h = [7; 32];
        let sig = key.sign(&h);
        assert!(key.public().verify(&h, &sig));
        assert!(!key.public().verify(&[8; 32], &sig));
        assert!(!other.public().verify(&h, &sig));
        let line = key.public().to_line();
        assert_eq!(PublicKey::parse(&line).unwrap(), key.public());
    }
}
