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
//! This side reads it (`moat run --tunnel DIR`); the broker writes it (`moat-broker`'s
//! `enrolment` module).
//!
//! The host key is new at every enrolment, and signed by the broker's SSH host CA for the
//! workspace's name: people trust that CA once (`@cert-authority` in `known_hosts`), not each
//! key, so a re-enrolment, typically after a leak, leaves nothing of the old key worth having.
//! The key stays the same across runs of one enrolment.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::WorkspaceName;

/// The account a moat workspace's sshd logs people into (uid 1000 in the workspace).
pub const WORKSPACE_SSH_USER: &str = "agent";

/// The workspace's name and where its broker is.
pub const TUNNEL_FILE: &str = "tunnel.toml";
/// The tunnel certificate (PEM).
pub const CERT_FILE: &str = "workspace.crt";
/// Its key (PEM); 0600.
pub const KEY_FILE: &str = "workspace.key";
/// The broker's TLS CA (PEM).
pub const BROKER_CA_FILE: &str = "broker-ca.pem";
/// The broker's SSH user CA (one public key line).
pub const SSH_USER_CA_FILE: &str = "ssh-user-ca.pub";
/// The workspace's SSH host key (OpenSSH private key); 0600. Its public half is beside it, with
/// `.pub` appended.
pub const SSH_HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// The host key's certificate from the broker's SSH host CA.
pub const SSH_HOST_CERT_FILE: &str = "ssh_host_ed25519_key-cert.pub";

/// Errors reading an enrolment directory.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    /// A file could not be read.
    #[error("{} {}", .0, .1.display())]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// `tunnel.toml` is malformed.
    #[error("invalid {}", .0.display())]
    Toml(PathBuf, #[source] toml::de::Error),
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

/// Reads an enrolment directory; refuses private keys others can read.
pub fn read_dir(dir: &Path) -> Result<WorkspaceEnrolment, EnrolmentError> {
    let tunnel_path = dir.join(TUNNEL_FILE);
    let tunnel: Tunnel = toml::from_str(&read(dir, TUNNEL_FILE)?)
        .map_err(|e| EnrolmentError::Toml(tunnel_path, e))?;
    Ok(WorkspaceEnrolment {
        tunnel,
        cert_pem: read(dir, CERT_FILE)?,
        key_pem: read_secret(dir, KEY_FILE)?,
        broker_ca_pem: read(dir, BROKER_CA_FILE)?,
        ssh_user_ca: read(dir, SSH_USER_CA_FILE)?.trim_end().to_owned(),
        ssh_host_key: read_secret(dir, SSH_HOST_KEY_FILE)?,
        ssh_host_key_pub: read(dir, &format!("{SSH_HOST_KEY_FILE}.pub"))?
            .trim_end()
            .to_owned(),
        ssh_host_certificate: read_optional(dir, SSH_HOST_CERT_FILE)?
            .map(|c| c.trim_end().to_owned()),
    })
}
