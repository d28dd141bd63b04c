//! The broker's OpenSSH user CA: signs short-lived user certificates for live sessions. A
//! workspace's sshd trusts this CA's public key alone (`TrustedUserCAKeys`).
//!
//! A certificate names exactly one principal (the workspace's SSH account), ends with its session,
//! and permits a terminal only: no agent, port or X11 forwarding, so an SSH session cannot become
//! a network path around the egress proxy or hand the person's agent to the workspace. The
//! certificate alone reaches nothing: the only way to the workspace's sshd is a broker stream,
//! which needs the live session.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ssh_key::certificate::{Builder, CertType, Certificate};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

/// Certificates are valid from this long before issue (clock skew between broker and workspace).
pub const BACKDATE: Duration = Duration::from_secs(60);
/// The longest public key line accepted.
const MAX_KEY_LINE: usize = 16 * 1024;

/// Errors of the SSH CA.
#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    /// The CA key file could not be read or written.
    #[error("cannot use the SSH user CA key {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA key could not be generated or parsed.
    #[error("invalid SSH user CA key")]
    Key(#[source] ssh_key::Error),
    /// The person's public key is not an OpenSSH public key line of an accepted type.
    #[error("not an acceptable OpenSSH public key")]
    PublicKey,
    /// Signing failed.
    #[error("cannot sign the certificate")]
    Sign(#[source] ssh_key::Error),
}

/// The CA.
pub struct SshCa {
    key: PrivateKey,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("public", &self.public_key_line())
            .finish()
    }
}

/// What goes into one certificate.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The account on the workspace.
    pub principal: &'a str,
    /// Recorded by sshd in its log: session id and subject.
    pub key_id: String,
    /// The session's end.
    pub valid_before: SystemTime,
}

impl SshCa {
    /// Loads the Ed25519 CA key at `path`, creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, SshCaError> {
        let io = |source| SshCaError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(SshCa {
                key: PrivateKey::from_openssh(text).map_err(SshCaError::Key)?,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key =
                    PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(SshCaError::Key)?;
                let text = key.to_openssh(LineEnding::LF).map_err(SshCaError::Key)?;
                write_private(path, text.as_bytes()).map_err(io)?;
                Ok(SshCa { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The CA's public key as one `authorized_keys`-style line, for `TrustedUserCAKeys`.
    pub fn public_key_line(&self) -> String {
        self.key
            .public_key()
            .to_openssh()
            .unwrap_or_else(|_| String::from("(unencodable key)"))
    }

    /// Signs `public_key` (one OpenSSH public key line) for `grant`; returns the certificate
    /// line (`...-cert-v01@openssh.com ...`).
    pub fn certify(&self, public_key: &str, grant: &Grant<'_>) -> Result<String, SshCaError> {
        if public_key.len() > MAX_KEY_LINE {
            return Err(SshCaError::PublicKey);
        }
        let subject =
            PublicKey::from_openssh(public_key.trim()).map_err(|_| SshCaError::PublicKey)?;
        if !matches!(
            subject.algorithm(),
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. }
        ) {
            return Err(SshCaError::PublicKey);
        }
        let now = SystemTime::now();
        let valid_after = now.checked_sub(BACKDATE).unwrap_or(now);
        let mut builder = Builder::new_with_validity_times(
            random_nonce(),
            subject.key_data().clone(),
            valid_after,
            grant.valid_before,
        )
        .map_err(SshCaError::Sign)?;
        builder
            .serial(random_serial())
            .and_then(|b| b.cert_type(CertType::User))
            .and_then(|b| b.key_id(grant.key_id.clone()))
            .and_then(|b| b.valid_principal(grant.principal))
            .and_then(|b| b.extension("permit-pty", ""))
            .map_err(SshCaError::Sign)?;
        let cert: Certificate = builder.sign(&self.key).map_err(SshCaError::Sign)?;
        cert.to_openssh().map_err(SshCaError::Sign)
    }
}

fn random_nonce() -> Vec<u8> {
    use ssh_key::rand_core::RngCore;
    let mut nonce = vec![0u8; Builder::RECOMMENDED_NONCE_SIZE];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

fn random_serial() -> u64 {
    use ssh_key::rand_core::RngCore;
    OsRng.next_u64()
}

/// Writes a secret file with mode 0600 (refusing to follow an existing one).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {

    use super::*;

    fn user_key() -> String {
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .unwrap()
            .public_key()
            .to_openssh()
            .unwrap()
    }

    #[test]
    fn a_certificate_names_one_principal_permits_a_pty_only_and_ends_with_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(&dir.path().join("ca")).unwrap();
        let end = SystemTime::now() + Duration::from_secs(600);
        let line = ca
            .certify(
                &user_key(),
                &Grant {
                    principal: "agent",
                    key_id: "moat:s1:alice".into(),
                    valid_before: end,
                },
            )
            .unwrap();
        let cert = Certificate::from_openssh(&line).unwrap();
        assert_eq!(cert.valid_principals(), ["agent".to_owned()]);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(
            cert.extensions().keys().collect::<Vec<_>>(),
            vec!["permit-pty"]
        );
        assert!(cert.critical_options().is_empty());
        let before = end
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(cert.valid_before(), before);
        assert_eq!(cert.signature_key(), ca.key.public_key().key_data());
    }

    #[test]
    fn the_ca_key_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca");
        let first = SshCa::load_or_create(&path).unwrap().public_key_line();
        let again = SshCa::load_or_create(&path).unwrap().public_key_line();
        assert_eq!(first, again);
    }

    #[test]
    fn a_non_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(&dir.path().join("ca")).unwrap();
        let grant = Grant {
            principal: "agent",
            key_id: "k".into(),
            valid_before: SystemTime::now() + Duration::from_secs(60),
        };
        assert!(matches!(
            ca.certify("not a key", &grant),
            Err(SshCaError::PublicKey)
        ));
    }
}
