//! The broker's OpenSSH CAs, two keys of one kind ([`SshCa`]):
//!
//! - The user CA ([`USER_CA_FILE`]) signs short-lived user certificates for live sessions. A
//!   workspace's sshd trusts this CA's public key alone (`TrustedUserCAKeys`). A certificate
//!   names exactly one principal, the workspace's SSH account *on that workspace*
//!   ([`workspace_principal`]: `agent@ws1`), which only that workspace's sshd accepts
//!   (`AuthorizedPrincipalsFile`), so a certificate issued for one workspace opens no other. It
//!   ends with its session, and permits a terminal only: no agent, port or X11 forwarding, so an
//!   SSH session cannot become a network path around the egress proxy or hand the person's agent
//!   to the workspace. The certificate alone reaches nothing: the only way to the workspace's
//!   sshd is a broker stream, which needs the live session.
//! - The host CA ([`HOST_CA_FILE`]) signs each workspace's SSH host key at enrolment, for the
//!   workspace's name as the only principal. People trust it once (`@cert-authority` in
//!   `known_hosts`) instead of pinning every workspace's key, so a workspace's host key can be
//!   new at every enrolment.

use std::path::Path;
use std::time::{Duration, SystemTime};

use moat_broker_client::protocol::workspace_principal;
use ssh_key::certificate::{Builder, CertType, Certificate};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use crate::config::WorkspaceName;

/// Certificates are valid from this long before issue (clock skew between broker and workspace).
pub const BACKDATE: Duration = Duration::from_secs(60);
/// The longest public key line accepted.
const MAX_KEY_LINE: usize = 16 * 1024;
/// The user CA's key in the state directory.
pub const USER_CA_FILE: &str = "ssh-user-ca";
/// The host CA's key in the state directory.
pub const HOST_CA_FILE: &str = "ssh-host-ca";

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
    #[error("invalid SSH CA key")]
    Key(#[source] ssh_key::Error),
    /// The person's public key is not an OpenSSH public key line of an accepted type.
    #[error("not an acceptable OpenSSH public key")]
    PublicKey,
    /// Signing failed.
    #[error("cannot sign the certificate")]
    Sign(#[source] ssh_key::Error),
}

/// One CA key: the user CA or the host CA.
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

/// What goes into one user certificate.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The account on the workspace.
    pub account: &'a str,
    /// The workspace, the only one whose sshd accepts the certificate.
    pub workspace: &'a WorkspaceName,
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

    /// The CA's public key as one `authorized_keys`-style line, for `TrustedUserCAKeys` (user
    /// CA) or `@cert-authority` in `known_hosts` (host CA).
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
        let principal = workspace_principal(grant.account, grant.workspace);
        let mut builder = self.builder(&subject, grant.valid_before)?;
        builder
            .cert_type(CertType::User)
            .and_then(|b| b.key_id(grant.key_id.clone()))
            .and_then(|b| b.valid_principal(principal))
            .and_then(|b| b.extension("permit-pty", ""))
            .map_err(SshCaError::Sign)?;
        let cert: Certificate = builder.sign(&self.key).map_err(SshCaError::Sign)?;
        cert.to_openssh().map_err(SshCaError::Sign)
    }

    /// Signs `workspace`'s SSH host key, for its name as the only principal, until
    /// `valid_before`; returns the certificate line (sshd's `HostCertificate`).
    pub fn certify_host(
        &self,
        host_key: &PublicKey,
        workspace: &WorkspaceName,
        valid_before: SystemTime,
    ) -> Result<String, SshCaError> {
        let mut builder = self.builder(host_key, valid_before)?;
        builder
            .cert_type(CertType::Host)
            .and_then(|b| b.key_id(format!("moat workspace {workspace}")))
            .and_then(|b| b.valid_principal(workspace.as_str()))
            .map_err(SshCaError::Sign)?;
        let cert: Certificate = builder.sign(&self.key).map_err(SshCaError::Sign)?;
        cert.to_openssh().map_err(SshCaError::Sign)
    }

    /// A certificate for `subject`, valid from [`BACKDATE`] ago until `valid_before`, with a
    /// random nonce and serial.
    fn builder(
        &self,
        subject: &PublicKey,
        valid_before: SystemTime,
    ) -> Result<Builder, SshCaError> {
        let now = SystemTime::now();
        let valid_after = now.checked_sub(BACKDATE).unwrap_or(now);
        let mut builder = Builder::new_with_validity_times(
            random_nonce(),
            subject.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(SshCaError::Sign)?;
        builder.serial(random_serial()).map_err(SshCaError::Sign)?;
        Ok(builder)
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

    fn ws(name: &str) -> WorkspaceName {
        WorkspaceName::try_from(name).unwrap()
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
                    account: "agent",
                    workspace: &ws("ws1"),
                    key_id: "moat:s1:alice".into(),
                    valid_before: end,
                },
            )
            .unwrap();
        let cert = Certificate::from_openssh(&line).unwrap();
        // The account on that workspace only: no other workspace's sshd lists it.
        assert_eq!(cert.valid_principals(), ["agent@ws1".to_owned()]);
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
    fn a_host_certificate_names_the_workspace_alone_and_verifies_against_the_host_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(&dir.path().join(HOST_CA_FILE)).unwrap();
        let host = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let end = SystemTime::now() + Duration::from_secs(600);

        let line = ca.certify_host(host.public_key(), &ws("ws1"), end).unwrap();

        let cert = Certificate::from_openssh(&line).unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), ["ws1".to_owned()]);
        assert_eq!(cert.public_key(), host.public_key().key_data());
        assert!(cert.extensions().is_empty() && cert.critical_options().is_empty());
        let fingerprint = ca.key.public_key().fingerprint(Default::default());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        cert.validate_at(now, [&fingerprint]).unwrap();
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
            account: "agent",
            workspace: &ws("ws1"),
            key_id: "k".into(),
            valid_before: SystemTime::now() + Duration::from_secs(60),
        };
        assert!(matches!(
            ca.certify("not a key", &grant),
            Err(SshCaError::PublicKey)
        ));
    }
}
