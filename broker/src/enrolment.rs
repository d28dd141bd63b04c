//! Writing a workspace's enrolment directory (`moat-broker enrol`): its tunnel identity, the
//! broker's CAs, and a new SSH host key certified by the broker's SSH host CA. The layout, and
//! reading it on the workspace host, are [`moat_broker_client::enrolment`]'s.
//!
//! The host key is new at every enrolment, and signed by the broker's SSH host CA for the
//! workspace's name: people trust that CA once (`@cert-authority` in `known_hosts`), not each
//! key, so a re-enrolment, typically after a leak, leaves nothing of the old key worth having.
//! The key stays the same across runs of one enrolment.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use moat_broker_client::enrolment::{
    BROKER_CA_FILE, CERT_FILE, KEY_FILE, SSH_HOST_CERT_FILE, SSH_HOST_KEY_FILE, SSH_USER_CA_FILE,
    TUNNEL_FILE, Tunnel,
};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::config::WorkspaceName;
use crate::pki::{Enrolment, WORKSPACE_VALIDITY};
use crate::ssh_ca::{SshCa, SshCaError};

/// Errors writing an enrolment directory.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A file could not be written.
    #[error("{} {}", .0, .1.display())]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// A key could not be generated or encoded.
    #[error("cannot make the workspace's SSH host key")]
    Key(#[source] ssh_key::Error),
    /// The host key could not be certified.
    #[error("cannot certify the workspace's SSH host key")]
    Certify(#[source] SshCaError),
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), WriteError> {
    let path = dir.join(name);
    let err = |e| WriteError::Io("cannot write", dir.join(name), e);
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
) -> Result<String, WriteError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| WriteError::Io("cannot create", dir.to_owned(), e))?;
    let host_key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(WriteError::Key)?;
    let host_cert = host_ca
        .certify_host(
            host_key.public_key(),
            &tunnel.workspace,
            SystemTime::now() + WORKSPACE_VALIDITY,
        )
        .map_err(WriteError::Certify)?;
    let host_pub = host_key
        .public_key()
        .to_openssh()
        .map_err(WriteError::Key)?;
    let host_priv = host_key
        .to_openssh(LineEnding::LF)
        .map_err(WriteError::Key)?;
    let toml = toml::to_string(tunnel).map_err(|e| {
        WriteError::Io(
            "cannot encode",
            dir.join(TUNNEL_FILE),
            std::io::Error::other(e),
        )
    })?;
    write(dir, KEY_FILE, &identity.key_pem, 0o600)?;
    write(dir, SSH_HOST_KEY_FILE, &host_priv, 0o600)?;
    write(dir, CERT_FILE, &identity.cert_pem, 0o644)?;
    write(dir, BROKER_CA_FILE, &identity.broker_ca_pem, 0o644)?;
    write(
        dir,
        SSH_USER_CA_FILE,
        &format!("{}\n", ssh_user_ca.trim_end()),
        0o644,
    )?;
    write(
        dir,
        &format!("{SSH_HOST_KEY_FILE}.pub"),
        &format!("{host_pub}\n"),
        0o644,
    )?;
    write(dir, SSH_HOST_CERT_FILE, &format!("{host_cert}\n"), 0o644)?;
    write(dir, TUNNEL_FILE, &toml, 0o644)?;
    Ok(known_hosts_line(&tunnel.workspace, host_ca))
}

/// The `known_hosts` line with which people trust `host_ca` for `workspace`, and nothing else:
/// a host certificate must also name the host, but a CA trusted for `*` would be trusted to
/// name any host.
pub fn known_hosts_line(workspace: &WorkspaceName, host_ca: &SshCa) -> String {
    format!("@cert-authority {workspace} {}", host_ca.public_key_line())
}

#[cfg(test)]
mod tests {

    use super::*;
    use moat_broker_client::enrolment::{EnrolmentError, read_dir};

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
        for name in [KEY_FILE, SSH_HOST_KEY_FILE] {
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
        std::fs::remove_file(dir.path().join(SSH_HOST_CERT_FILE)).unwrap();

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
            dir.path().join(SSH_HOST_KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            read_dir(dir.path()),
            Err(EnrolmentError::Exposed(_))
        ));
    }
}
