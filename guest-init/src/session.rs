//! Remote sessions: the workspace's answer to the broker's `CONNECT 22`.
//!
//! A person reaches a workspace only through the trusted access broker: the broker opens a
//! stream on the workspace's reverse tunnel, and the host side connects it to guest port 22
//! (Firecracker's vsock convention on the workspace's Unix socket: `CONNECT 22\n` ->
//! `OK 22\n`). Here guest-init answers it: each connection becomes one `sshd -i` (OpenSSH, as
//! an inetd-style service on that stream), run as the agent and confined exactly like the
//! agent by moat-guest-sandbox. So a person's session sees what the agent sees (the same home,
//! the same read-only root, the egress proxy as the only way out) and nothing more.
//!
//! sshd trusts one key, the broker's SSH user CA (`TrustedUserCAKeys`), and no authorized
//! keys, passwords or forwarding of any kind: a certificate the broker signed for the live
//! session, naming the workspace's account, is the only way in.
//!
//! sshd runs unprivileged (uid 1000), which OpenSSH supports for logging in its own user: it
//! then skips its root-only privilege separation (`chroot`, the `sshd` user). In the VM the
//! agent's account has that uid; in the namespace backend, which maps one host id only, sshd
//! gets a user namespace of its own in which the workspace's root appears as uid 1000
//! (`SandboxConfig::user_namespace`), so a person's files and the agent's have one owner.
//!
//! The host key is the workspace's, given by the host at start: the agent can read it (it is
//! the same uid as sshd). What it could do with it, impersonate its own workspace's sshd to
//! someone the broker connects to that workspace, gains it nothing it does not have.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::report::Reporter;

/// The guest port of SSH sessions.
pub const SSH_PORT: u32 = 22;
/// The OpenSSH server (the namespace backend's host root, or the root image).
pub const SSHD: &str = "/usr/sbin/sshd";
/// Where guest-init writes sshd's configuration and keys inside the workspace.
pub const SSHD_DIR: &str = "/run/moat/ssh";
/// The uid and gid sessions run as (the agent's account).
pub const SESSION_ID: u32 = 1000;
/// At most this many sessions at once; more are refused (the connection closed).
pub const MAX_SESSIONS: usize = 64;
/// The whole `CONNECT <port>` line must arrive within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many connections wait for their `CONNECT` line at once; more are closed.
const MAX_HANDSHAKES: usize = 16;
/// The longest `CONNECT` line read.
const MAX_LINE: usize = 32;

/// What the host gives the workspace for SSH sessions through the broker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshService {
    /// The account a person logs in as (the principal of the broker's certificates).
    pub user: String,
    /// The workspace's SSH host key (an OpenSSH private key). Secret.
    pub host_key: String,
    /// The broker's SSH user CA: one OpenSSH public key line, the only key sshd trusts.
    pub user_ca: String,
}

impl std::fmt::Debug for SshService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshService")
            .field("user", &self.user)
            .field("user_ca", &self.user_ca)
            .finish_non_exhaustive()
    }
}

/// Why the session service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A field of [`SshService`] is malformed.
    #[error("invalid SSH session service: {0}")]
    Invalid(&'static str),
    /// There is no OpenSSH server to run.
    #[error(
        "{SSHD} is missing: sessions through the broker need OpenSSH's server (openssh-server)"
    )]
    NoSshd,
    /// A file could not be written.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The nested user namespace sessions run in could not be made.
    #[error("cannot make the sessions' user namespace")]
    UserNamespace(#[source] moat_guest_sandbox::SandboxError),
    /// The session service's socket or thread could not be set up.
    #[error("cannot start the session service")]
    Service(#[source] std::io::Error),
}

impl SshService {
    /// Refuses values that could not go into sshd's configuration as one token or line.
    pub fn check(&self) -> Result<(), SessionError> {
        let name_ok = !self.user.is_empty()
            && self.user.len() <= 32
            && self.user.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'-'))
            });
        if !name_ok {
            return Err(SessionError::Invalid(
                "the account name must be a lowercase POSIX user name",
            ));
        }
        let ca = self.user_ca.trim_end();
        if ca.contains('\n') || !(ca.starts_with("ssh-") || ca.starts_with("ecdsa-")) {
            return Err(SessionError::Invalid(
                "the user CA must be one OpenSSH public key line",
            ));
        }
        if !self
            .host_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        {
            return Err(SessionError::Invalid(
                "the host key must be an OpenSSH private key",
            ));
        }
        Ok(())
    }
}

/// sshd's configuration: the broker's CA alone, the one account, a terminal or a command, and
/// nothing that would open a network path or hand anything to the workspace.
fn sshd_config(dir: &Path, user: &str, env: &[(String, String)]) -> String {
    let mut config = format!(
        "# Written by moat guest-init: sessions through the trusted access broker only.\n\
         HostKey {dir}/ssh_host_key\n\
         TrustedUserCAKeys {dir}/user_ca.pub\n\
         AuthorizedKeysFile none\n\
         AuthorizedPrincipalsFile none\n\
         AllowUsers {user}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         HostbasedAuthentication no\n\
         PermitRootLogin no\n\
         PermitEmptyPasswords no\n\
         DisableForwarding yes\n\
         AllowTcpForwarding no\n\
         AllowStreamLocalForwarding no\n\
         AllowAgentForwarding no\n\
         X11Forwarding no\n\
         PermitTunnel no\n\
         PermitUserEnvironment no\n\
         PermitUserRC no\n\
         UsePAM no\n\
         PidFile none\n\
         PrintMotd no\n\
         LogLevel VERBOSE\n\
         Subsystem sftp internal-sftp\n",
        dir = dir.display()
    );
    for (key, value) in env {
        // Names and values of our own making (the trust store variables), never the agent's.
        if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && value.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
        {
            config.push_str(&format!("SetEnv {key}={value}\n"));
        }
    }
    config
}

/// Writes sshd's configuration, host key and trusted CA under [`SSHD_DIR`] (0700, the key
/// 0600), owned by `owner` when given (the VM's root writes them for uid 1000). Returns the
/// configuration's path.
pub(crate) fn prepare(
    service: &SshService,
    env: &[(String, String)],
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, SessionError> {
    service.check()?;
    if !Path::new(SSHD).is_file() {
        return Err(SessionError::NoSshd);
    }
    let dir = Path::new(SSHD_DIR);
    let err = |p: &Path| {
        let p = p.to_owned();
        move |e| SessionError::Write(p, e)
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err(dir))?;
    let mut host_key = service.host_key.clone();
    if !host_key.ends_with('\n') {
        host_key.push('\n');
    }
    let files = [
        ("ssh_host_key", host_key, 0o600),
        (
            "user_ca.pub",
            format!("{}\n", service.user_ca.trim_end()),
            0o644,
        ),
        ("sshd_config", sshd_config(dir, &service.user, env), 0o644),
    ];
    for (name, text, mode) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(err(&path))?;
    }
    if let Some((uid, gid)) = owner {
        for name in ["", "ssh_host_key", "user_ca.pub", "sshd_config"] {
            let path = dir.join(name);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(err(&path))?;
        }
    }
    Ok(dir.join("sshd_config"))
}

/// How sessions are started: sshd's configuration, its confinement, its log.
pub(crate) struct Sessions {
    /// sshd's configuration file.
    pub config: PathBuf,
    /// The agent's home (sshd's working directory before the session sets its own).
    pub home: PathBuf,
    /// How sshd is confined (the agent's configuration, run as uid 1000).
    pub sandbox: moat_guest_sandbox::SandboxConfig,
    /// Where sshd's log goes (its standard error); none: nowhere.
    pub log: Option<OwnedFd>,
    /// Process events to the host; the reaper reports each session's end.
    pub report: Arc<Reporter>,
}

impl Sessions {
    /// Starts `sshd -i` on `stream`, confined. Returns its pid.
    fn start(&self, stream: OwnedFd) -> std::io::Result<u32> {
        if !self.report.reserve(MAX_SESSIONS) {
            return Err(std::io::Error::other(format!(
                "{MAX_SESSIONS} sessions are already open"
            )));
        }
        let started = self.spawn(stream);
        match started {
            Ok(pid) => self.report.started(pid),
            Err(_) => self.report.release(),
        }
        started
    }

    fn spawn(&self, stream: OwnedFd) -> std::io::Result<u32> {
        let sandbox = moat_guest_sandbox::Sandbox::new(&self.sandbox)
            .map_err(|e| std::io::Error::other(format!("cannot prepare the sandbox: {e}")))?;
        let stderr = match &self.log {
            Some(log) => Stdio::from(log.try_clone()?),
            None => Stdio::null(),
        };
        // The sandbox stacks new mounts over the home: enter it afterwards, as the agent does.
        let home = std::ffi::CString::new(self.home.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let argv = ["sshd", "-i", "-e", "-f"];
        let mut cmd = Command::new(SSHD);
        cmd.arg0(argv[0])
            .args(&argv[1..])
            .arg(&self.config)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::from(stream.try_clone()?))
            .stdout(Stdio::from(stream))
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec. `Sandbox::apply` makes no
        // allocation and only issues system calls, and `chdir` and `_exit` are system calls:
        // safe although PID 1 has other threads at fork time. A child that cannot be confined
        // exits at once rather than report back: std would then wait for it, racing PID 1's
        // reaper (which reports its exit status instead).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                // As for the agent (`launch.rs`): no inherited descriptor beyond the stream,
                // and a session and process group of its own, out of reach of `kill(0, ...)`.
                if crate::launch::close_on_exec_above_stderr().is_err()
                    || libc::setsid() < 0
                    || sandbox.apply().is_err()
                    || libc::chdir(home.as_ptr()) != 0
                {
                    libc::_exit(126);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        let cmd_line = format!("{SSHD} {} {}", argv[1..].join(" "), self.config.display());
        self.report.launch(pid, &[cmd_line]);
        // PID 1's reaper waits for it (`run_agent`), and reports its end.
        Ok(pid)
    }
}

/// Reads the `CONNECT <port>\n` line of Firecracker's vsock convention from the host side and
/// answers `OK <port>\n` for [`SSH_PORT`]; anything else is refused (the connection closed).
fn handshake(stream: &mut std::os::unix::net::UnixStream) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut byte = [0u8; 1];
    // One byte at a time: whatever follows the newline is the client's, for sshd.
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        stream.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        if line.len() == MAX_LINE {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        line.push(byte[0]);
    }
    if line != format!("CONNECT {SSH_PORT}").as_bytes() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "only port 22 is served",
        ));
    }
    stream.set_read_timeout(None)?;
    stream.write_all(format!("OK {SSH_PORT}\n").as_bytes())
}

/// The namespace backend: accepts the host side's connections on the workspace's Unix socket
/// (bound by the host before the workspace started), each with the `CONNECT 22` handshake, on
/// a thread of its own. Runs until the listener fails.
pub(crate) fn serve_unix(listener: std::os::unix::net::UnixListener, sessions: Sessions) {
    let sessions = Arc::new(sessions);
    let waiting = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // Out of descriptors, most likely: let some go before trying again.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if waiting.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
            waiting.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (sessions, done) = (Arc::clone(&sessions), Arc::clone(&waiting));
        // The handshake on a thread of its own: a slow peer holds up nobody else.
        let spawned = std::thread::Builder::new()
            .name("session".into())
            .spawn(move || {
                let shaken = handshake(&mut stream);
                done.fetch_sub(1, Ordering::AcqRel);
                if shaken.is_ok()
                    && let Err(e) = sessions.start(OwnedFd::from(stream))
                {
                    eprintln!("moat guest-init: cannot start an SSH session: {e}");
                }
            });
        if spawned.is_err() {
            waiting.fetch_sub(1, Ordering::AcqRel);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The VM: accepts on vsock port 22 (moat-vmm did the host side's handshake).
pub(crate) fn serve_vsock(listener: moat_netstack::VsockListener, sessions: Sessions) {
    loop {
        match listener.accept() {
            Ok(stream) => {
                if let Err(e) = sessions.start(OwnedFd::from(stream)) {
                    eprintln!("moat guest-init: cannot start an SSH session: {e}");
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn service() -> SshService {
        SshService {
            user: "agent".into(),
            host_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n"
                .into(),
            user_ca: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA moat-broker".into(),
        }
    }

    #[test]
    fn names_and_keys_that_could_bend_the_configuration_are_refused() {
        assert!(service().check().is_ok());
        for user in [
            "",
            "Agent",
            "1agent",
            "agent\nPermitRootLogin yes",
            "a b",
            "-x",
        ] {
            let s = SshService {
                user: user.into(),
                ..service()
            };
            assert!(s.check().is_err(), "{user:?}");
        }
        let s = SshService {
            user_ca: "ssh-ed25519 AAAA\nAuthorizedKeysFile /tmp/k".into(),
            ..service()
        };
        assert!(s.check().is_err());
        let s = SshService {
            host_key: "ssh-ed25519 AAAA".into(),
            ..service()
        };
        assert!(s.check().is_err());
    }

    #[test]
    fn the_configuration_trusts_the_broker_alone_and_forwards_nothing() {
        let env = vec![
            (
                "SSL_CERT_FILE".to_owned(),
                "/etc/ssl/certs/x.crt".to_owned(),
            ),
            ("BAD".to_owned(), "a b".to_owned()),
            ("X\nY".to_owned(), "1".to_owned()),
        ];
        let c = sshd_config(Path::new("/run/moat/ssh"), "agent", &env);
        for line in [
            "TrustedUserCAKeys /run/moat/ssh/user_ca.pub",
            "AuthorizedKeysFile none",
            "AllowUsers agent",
            "PasswordAuthentication no",
            "DisableForwarding yes",
            "PermitTunnel no",
            "PermitUserEnvironment no",
            "SetEnv SSL_CERT_FILE=/etc/ssl/certs/x.crt",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} missing from\n{c}");
        }
        assert!(!c.contains("BAD"), "a value with a space was written");
        assert!(!c.contains("X\nY"), "a name with a newline was written");
    }

    #[test]
    fn only_connect_22_is_answered_and_the_bytes_after_it_stay_in_the_stream() {
        let (mut host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.write_all(b"CONNECT 22\nSSH-2.0-client\r\n").unwrap();
        handshake(&mut guest).unwrap();
        let mut ok = [0u8; 6];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK 22\n");
        let mut banner = [0u8; 16];
        guest.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0-client\r\n");

        for line in [&b"CONNECT 23\n"[..], b"CONNECT 22 \n", b"connect 22\n"] {
            let (mut host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
            host.write_all(line).unwrap();
            assert!(handshake(&mut guest).is_err(), "{line:?}");
        }
        let (mut host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.write_all(&[b'C'; 64]).unwrap();
        assert!(handshake(&mut guest).is_err(), "an endless line");
    }
}
