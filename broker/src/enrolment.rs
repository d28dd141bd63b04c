//! A workspace's enrolment directory: everything its host needs to be reached through the
//! broker, written by `moat-broker enrol` and read by `moat run --tunnel DIR`.
//!
//! ```text
//! tunnel.toml                  workspace name, the broker's tunnel address and TLS name
//! workspace.crt, workspace.key the tunnel identity (client certificate of the workspace CA); key 0600
//! broker-ca.pem                the broker's TLS CA, the only anchor the tunnel trusts
//! ssh-user-ca.pub              the broker's SSH user CA, the only key the workspace's sshd trusts
//! ssh_host_ed25519_key(.pub)   the workspace's SSH host key; key 0600
//! ssh_host_ed25519_key-cert.pub  its host certificate from the broker's SSH host CA
//! ```
//!
//! The host key is new at every enrolment, and signed by the broker's SSH host CA for the
//! workspace's name: people trust that CA once (`@cert-authority` in `known_hosts`), not each
//! key, so a re-enrolment, typically after a leak, leaves nothing of the old key worth having.
//! The key stays the same across runs of one enrolment.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::config::WorkspaceName;
use crate::pki::{Enrolment, WORKSPACE_VALIDITY};
use crate::ssh_ca::{SshCa, SshCaError};

/// The account a moat workspace's sshd logs people into (uid 1000 in the workspace).
pub const WORKSPACE_SSH_USER: &str = "agent";

const TUNNEL: &str = "tunnel.toml";
const CERT: &str = "workspace.crt";
const KEY: &str = "workspace.key";
const BROKER_CA: &str = "broker-ca.pem";
const USER_CA: &str = "ssh-user-ca.pub";
const HOST_KEY: &str = "ssh_host_ed25519_key";
const HOST_CERT: &str = "ssh_host_ed25519_key-cert.pub";

/// Errors reading or writing an enrolment directory.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    /// A file could not be read or written.
    #[error("{} {}", .0, .1.display())]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// `tunnel.toml` is malformed.
    #[error("invalid {}", .0.display())]
    Toml(PathBuf, #[source] toml::de::Error),
    /// A key could not be generated or encoded.
    #[error("cannot make the workspace's SSH host key")]
    Key(#[source] ssh_key::Error),
    /// The host key could not be certified.
    #[error("cannot certify the workspace's SSH host key")]
    Certify(#[source] SshCaError),
    /// The private key file is readable by others.
    #[error("{} is readable by others: chmod 600 it", .0.display())]
    Exposed(PathBuf),
}

/// `tunnel.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    /// The workspace's name at the broker (its certificate's CN).
    pub workspace: WorkspaceName,
    /// The broker's tunnel listener, `host:port`.
    pub broker: String,
    /// The name the broker's TLS certificate carries.
    pub server_name: String,
}

/// An enrolment directory, read.
pub struct WorkspaceEnrolment {
    /// Where the broker is and who this workspace is.
    pub tunnel: Tunnel,
    /// The tunnel certificate (PEM).
    pub cert_pem: String,
    /// Its key (PEM). Secret.
    pub key_pem: String,
    /// The broker's TLS CA (PEM).
    pub broker_ca_pem: String,
    /// The broker's SSH user CA (one public key line).
    pub ssh_user_ca: String,
    /// The workspace's SSH host key (OpenSSH private key). Secret.
    pub ssh_host_key: String,
    /// Its public half (one line).
    pub ssh_host_key_pub: String,
    /// Its host certificate from the broker's SSH host CA (one line); none in a directory
    /// enrolled before the broker had one.
    pub ssh_host_certificate: Option<String>,
}

impl std::fmt::Debug for WorkspaceEnrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceEnrolment")
            .field("tunnel", &self.tunnel)
            .field("ssh_host_key_pub", &self.ssh_host_key_pub)
            .finish_non_exhaustive()
    }
}

fn read(dir: &Path, name: &str) -> Result<String, EnrolmentError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| EnrolmentError::Io("cannot read", path, e))
}

/// `name` in `dir`, or `None` if there is no such file.
fn read_optional(dir: &Path, name: &str) -> Result<Option<String>, EnrolmentError> {
    match read(dir, name) {
        Ok(text) => Ok(Some(text)),
        Err(EnrolmentError::Io(_, _, e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_secret(dir: &Path, name: &str) -> Result<String, EnrolmentError> {
    let path = dir.join(name);
    let meta =
        std::fs::metadata(&path).map_err(|e| EnrolmentError::Io("cannot read", path.clone(), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(EnrolmentError::Exposed(path));
    }
    read(dir, name)
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), EnrolmentError> {
    let path = dir.join(name);
    let err = |e| EnrolmentError::Io("cannot write", dir.join(name), e);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        // Never through a link someone left in the directory.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    // An existing file keeps its mode through `open`: set it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Writes the enrolment of `tunnel.workspace` into `dir` (made 0700), with a new SSH host key
/// (never the one already there: re-enrolling is how a leaked key is retired) and its host
/// certificate from `host_ca`, valid as long as the tunnel identity. Returns the `known_hosts`
/// line that trusts it (`@cert-authority <workspace> ssh-ed25519 ...`).
pub fn write_dir(
    dir: &Path,
    tunnel: &Tunnel,
    identity: &Enrolment,
    ssh_user_ca: &str,
    host_ca: &SshCa,
) -> Result<String, EnrolmentError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| EnrolmentError::Io("cannot create", dir.to_owned(), e))?;
    let host_key =
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(EnrolmentError::Key)?;
    let host_cert = host_ca
        .certify_host(
            host_key.public_key(),
            &tunnel.workspace,
            SystemTime::now() + WORKSPACE_VALIDITY,
        )
        .map_err(EnrolmentError::Certify)?;
    let host_pub = host_key
        .public_key()
        .to_openssh()
        .map_err(EnrolmentError::Key)?;
    let host_priv = host_key
        .to_openssh(LineEnding::LF)
        .map_err(EnrolmentError::Key)?;
    let toml = toml::to_string(tunnel).map_err(|e| {
        EnrolmentError::Io("cannot encode", dir.join(TUNNEL), std::io::Error::other(e))
    })?;
    write(dir, KEY, &identity.key_pem, 0o600)?;
    write(dir, HOST_KEY, &host_priv, 0o600)?;
    write(dir, CERT, &identity.cert_pem, 0o644)?;
    write(dir, BROKER_CA, &identity.broker_ca_pem, 0o644)?;
    write(
        dir,
        USER_CA,
        &format!("{}\n", ssh_user_ca.trim_end()),
        0o644,
    )?;
    write(
        dir,
        &format!("{HOST_KEY}.pub"),
        &format!("{host_pub}\n"),
        0o644,
    )?;
    write(dir, HOST_CERT, &format!("{host_cert}\n"), 0o644)?;
    write(dir, TUNNEL, &toml, 0o644)?;
    Ok(known_hosts_line(&tunnel.workspace, host_ca))
}

/// The `known_hosts` line with which people trust `host_ca` for `workspace`, and nothing else:
/// a host certificate must also name the host, but a CA trusted for `*` would be trusted to
/// name any host.
pub fn known_hosts_line(workspace: &WorkspaceName, host_ca: &SshCa) -> String {
    format!("@cert-authority {workspace} {}", host_ca.public_key_line())
}

/// Reads an enrolment directory; refuses private keys others can read.
pub fn read_dir(dir: &Path) -> Result<WorkspaceEnrolment, EnrolmentError> {
    let tunnel_path = dir.join(TUNNEL);
    let tunnel: Tunnel =
        toml::from_str(&read(dir, TUNNEL)?).map_err(|e| EnrolmentError::Toml(tunnel_path, e))?;
    Ok(WorkspaceEnrolment {
        tunnel,
        cert_pem: read(dir, CERT)?,
        key_pem: read_secret(dir, KEY)?,
        broker_ca_pem: read(dir, BROKER_CA)?,
        ssh_user_ca: read(dir, USER_CA)?.trim_end().to_owned(),
        ssh_host_key: read_secret(dir, HOST_KEY)?,
        ssh_host_key_pub: read(dir, &format!("{HOST_KEY}.pub"))?.trim_end().to_owned(),
        ssh_host_certificate: read_optional(dir, HOST_CERT)?.map(|c| c.trim_end().to_owned()),
    })
}

#[cfg(test)]
mod tests {

    use super::*;

    fn tunnel() -> Tunnel {
        Tunnel {
            workspace: WorkspaceName::try_from("ws1").unwrap(),
            broker: "broker.example.com:8444".into(),
            server_name: "broker.example.com".into(),
        }
    }

    fn identity() -> Enrolment {
        Enrolment {
            cert_pem: "CERT\n".into(),
            key_pem: "KEY\n".into(),
            broker_ca_pem: "CA\n".into(),
            serial: crate::pki::Serial::from_be_bytes(&[1]),
        }
    }

    fn host_ca(dir: &Path) -> SshCa {
        SshCa::load_or_create(&dir.join(crate::ssh_ca::HOST_CA_FILE)).unwrap()
    }

    #[test]
    fn a_written_directory_reads_back_with_its_secrets_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = host_ca(dir.path());
        let out = dir.path().join("ws1");
        let known = write_dir(&out, &tunnel(), &identity(), "ssh-ed25519 AAAA ca", &ca).unwrap();
        let read = read_dir(&out).unwrap();
        assert_eq!(read.tunnel, tunnel());
        assert_eq!(
            known,
            format!("@cert-authority ws1 {}", ca.public_key_line())
        );
        assert!(
            read.ssh_host_key
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        );
        assert_eq!(read.ssh_user_ca, "ssh-ed25519 AAAA ca");
        for name in [KEY, HOST_KEY] {
            let mode = std::fs::metadata(out.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn re_enrolment_rotates_the_host_key_and_certifies_the_new_one_for_the_workspace() {
        use ssh_key::Certificate;
        let dir = tempfile::tempdir().unwrap();
        let ca = host_ca(dir.path());
        let out = dir.path().join("ws1");
        write_dir(&out, &tunnel(), &identity(), "ssh-ed25519 AAAA ca", &ca).unwrap();
        let first = read_dir(&out).unwrap();

        write_dir(&out, &tunnel(), &identity(), "ssh-ed25519 AAAA ca", &ca).unwrap();
        let again = read_dir(&out).unwrap();

        assert_ne!(again.ssh_host_key_pub, first.ssh_host_key_pub);
        assert_ne!(again.ssh_host_key, first.ssh_host_key);
        let cert =
            Certificate::from_openssh(again.ssh_host_certificate.as_deref().unwrap()).unwrap();
        let key = ssh_key::PublicKey::from_openssh(&again.ssh_host_key_pub).unwrap();
        assert_eq!(cert.public_key(), key.key_data());
        assert_eq!(cert.cert_type(), ssh_key::certificate::CertType::Host);
        assert_eq!(cert.valid_principals(), ["ws1".to_owned()]);
        let ca_key = ssh_key::PublicKey::from_openssh(&ca.public_key_line()).unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        cert.validate_at(now, [&ca_key.fingerprint(Default::default())])
            .unwrap();
    }

    #[test]
    fn a_directory_enrolled_before_host_certificates_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(
            dir.path(),
            &tunnel(),
            &identity(),
            "ssh-ed25519 AAAA ca",
            &host_ca(dir.path()),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join(HOST_CERT)).unwrap();

        assert_eq!(read_dir(dir.path()).unwrap().ssh_host_certificate, None);
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(
            dir.path(),
            &tunnel(),
            &identity(),
            "ssh-ed25519 AAAA ca",
            &host_ca(dir.path()),
        )
        .unwrap();
        std::fs::set_permissions(
            dir.path().join(HOST_KEY),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            read_dir(dir.path()),
            Err(EnrolmentError::Exposed(_))
        ));
    }
}
