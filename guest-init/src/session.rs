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
//! session, naming the workspace's account *on this workspace* (`agent@<workspace>`, the one
//! line of `AuthorizedPrincipalsFile`), is the only way in. A certificate the broker issued for
//! another workspace names another principal and is refused here.
//!
//! sshd presents the workspace's host certificate from the broker's SSH host CA, when the
//! enrolment has one, so that people trust the CA rather than pin each workspace's key.
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

use moat_flow_header::vsock::{self, LineBuf};
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

/// What the host gives the workspace for SSH sessions through the broker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshService {
    /// The account a person logs in as.
    pub user: String,
    /// The one principal a certificate must name to log in here: the account on this
    /// workspace (`agent@ws1`), so that a certificate for another workspace is refused.
    pub principal: String,
    /// The workspace's SSH host key (an OpenSSH private key). Secret.
    pub host_key: String,
    /// Its host certificate from the broker's SSH host CA (one line), if the enrolment has one.
    #[serde(default)]
    pub host_certificate: Option<String>,
    /// The broker's SSH user CA: one OpenSSH public key line, the only key sshd trusts.
    pub user_ca: String,
}

impl std::fmt::Debug for SshService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshService")
            .field("user", &self.user)
            .field("principal", &self.principal)
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
        // One token of the principals file: no space (options), '#' or line break.
        let principal_ok = !self.principal.is_empty()
            && self.principal.len() <= 128
            && self
                .principal
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_@.".contains(&b));
        if !principal_ok {
            return Err(SessionError::Invalid(
                "the principal must be one token of a-z, 0-9, '-', '_', '@', '.'",
            ));
        }
        let ca = self.user_ca.trim_end();
        if ca.contains('\n') || !(ca.starts_with("ssh-") || ca.starts_with("ecdsa-")) {
            return Err(SessionError::Invalid(
                "the user CA must be one OpenSSH public key line",
            ));
        }
        if let Some(cert) = &self.host_certificate {
            let cert = cert.trim_end();
            if cert.contains('\n') || !cert.contains("-cert-v01@openssh.com ") {
                return Err(SessionError::Invalid(
                    "the host certificate must be one OpenSSH certificate line",
                ));
            }
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

/// sshd's configuration: the broker's CA alone, for this workspace's principal alone, the one
/// account, a terminal or a command, and nothing that would open a network path or hand
/// anything to the workspace.
///
/// `StrictModes no`: the only file it would check is the principals file, written here, in a
/// directory only the sessions' uid can write; and in the namespace backend the directories
/// above it belong to ids the sessions' user namespace does not map, which would refuse every
/// login.
fn sshd_config(dir: &Path, user: &str, host_certificate: bool, env: &[(String, String)]) -> String {
    let mut config = format!(
        "# Written by moat guest-init: sessions through the trusted access broker only.\n\
         HostKey {dir}/ssh_host_key\n\
         TrustedUserCAKeys {dir}/user_ca.pub\n\
         AuthorizedKeysFile none\n\
         AuthorizedPrincipalsFile {dir}/principals\n\
         StrictModes no\n\
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
    if host_certificate {
        config.push_str(&format!("HostCertificate {}/{HOST_CERT}\n", dir.display()));
    }
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

/// The host certificate's file name beside the host key (sshd's `HostCertificate`).
const HOST_CERT: &str = "ssh_host_key-cert.pub";

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
    write_config(Path::new(SSHD_DIR), service, env, owner)
}

/// [`prepare`]'s files, in `dir`.
fn write_config(
    dir: &Path,
    service: &SshService,
    env: &[(String, String)],
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, SessionError> {
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
    let line = |text: &str| format!("{}\n", text.trim_end());
    let mut files = vec![
        ("ssh_host_key", host_key, 0o600),
        ("user_ca.pub", line(&service.user_ca), 0o644),
        ("principals", line(&service.principal), 0o644),
        (
            "sshd_config",
            sshd_config(dir, &service.user, service.host_certificate.is_some(), env),
            0o644,
        ),
    ];
    if let Some(cert) = &service.host_certificate {
        files.push((HOST_CERT, line(cert), 0o644));
    }
    for (name, text, mode) in &files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(err(&path))?;
    }
    if let Some((uid, gid)) = owner {
        let names = files.iter().map(|(name, _, _)| *name);
        for path in std::iter::once(dir.to_owned()).chain(names.map(|n| dir.join(n))) {
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
    let mut line = LineBuf::new();
    let mut byte = [0u8; 1];
    // One byte at a time: whatever follows the newline is the client's, for sshd.
    let port = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        stream.read_exact(&mut byte)?;
        let bad =
            |e: vsock::HandshakeError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        if let Some(line) = line.push(byte[0]).map_err(bad)? {
            break vsock::parse_connect(line).map_err(bad)?;
        }
    };
    if port != SSH_PORT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "only port 22 is served",
        ));
    }
    stream.set_read_timeout(None)?;
    stream.write_all(vsock::ok_line(SSH_PORT).as_bytes())
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
            principal: "agent@ws1".into(),
            host_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n"
                .into(),
            host_certificate: Some("ssh-ed25519-cert-v01@openssh.com AAAA ws1".into()),
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
        for principal in [
            "",
            "agent@ws1 agent",
            "agent@ws1\nagent",
            "#agent",
            "Agent@ws1",
        ] {
            let s = SshService {
                principal: principal.into(),
                ..service()
            };
            assert!(s.check().is_err(), "{principal:?}");
        }
        for cert in [
            "ssh-ed25519 AAAA",
            "ssh-ed25519-cert-v01@openssh.com AAAA\nHostKey /x",
        ] {
            let s = SshService {
                host_certificate: Some(cert.into()),
                ..service()
            };
            assert!(s.check().is_err(), "{cert:?}");
        }
        let s = SshService {
            host_certificate: None,
            ..service()
        };
        assert!(s.check().is_ok());
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
        let c = sshd_config(Path::new("/run/moat/ssh"), "agent", true, &env);
        for line in [
            "TrustedUserCAKeys /run/moat/ssh/user_ca.pub",
            "AuthorizedPrincipalsFile /run/moat/ssh/principals",
            "HostCertificate /run/moat/ssh/ssh_host_key-cert.pub",
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

    /// Runs `program` with `args`; asserts it succeeded.
    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Real OpenSSH against the files [`write_config`] writes: `sshd -i` unprivileged, logging
    /// in its own account as the workspace's sshd does (here `agent`, uid 65534, from a
    /// passwd file bound over /etc/passwd in a mount namespace of its own), reached by `ssh`
    /// through a pipe, trusting the host CA (`@cert-authority`) instead of a host key. A
    /// certificate for this workspace's principal gets in; one for another workspace's, or for
    /// the bare account, does not. Needs root (for the namespace and to become uid 65534), sshd,
    /// ssh, ssh-keygen, unshare and setpriv.
    #[test]
    fn sshd_takes_a_certificate_for_its_own_workspace_only() {
        let tools = [
            SSHD,
            "/usr/bin/ssh",
            "/usr/bin/ssh-keygen",
            "/usr/bin/setpriv",
        ];
        if !nix::unistd::Uid::effective().is_root() || !tools.iter().all(|t| Path::new(t).exists())
        {
            eprintln!("skipped: needs root and {tools:?}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("moat-sshd-principals-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = |name: &str| dir.join(name).display().to_string();
        for key in ["user_ca", "host_ca", "host", "person"] {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-f", &path(key)],
            );
        }
        run(
            "ssh-keygen",
            &[
                "-q",
                "-s",
                &path("host_ca"),
                "-h",
                "-I",
                "ws1",
                "-n",
                "ws1",
                "-V",
                "-1m:+5m",
                &path("host.pub"),
            ],
        );
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        std::fs::write(dir.join("passwd"), "agent:x:65534:65534::/tmp:/bin/sh\n").unwrap();
        std::fs::write(dir.join("shadow"), "agent:unusable:19000::::::\n").unwrap();
        let service = SshService {
            user: "agent".into(),
            principal: "agent@ws1".into(),
            host_key: read("host"),
            host_certificate: Some(read("host-cert.pub")),
            user_ca: read("user_ca.pub"),
        };
        service.check().unwrap();
        let config = write_config(&dir.join("ssh"), &service, &[], Some((65534, 65534))).unwrap();
        std::fs::write(
            dir.join("known_hosts"),
            format!("@cert-authority ws1 {}", read("host_ca.pub")),
        )
        .unwrap();
        let login_with = |principal: &str| {
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-s",
                    &path("user_ca"),
                    "-I",
                    "test",
                    "-n",
                    principal,
                    "-V",
                    "-1m:+5m",
                    &path("person.pub"),
                ],
            );
            let out = Command::new("ssh")
                .args([
                    "-F",
                    "/dev/null",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                ])
                .args(["-i", &path("person"), "-o"])
                .arg(format!("CertificateFile={}", path("person-cert.pub")))
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", path("known_hosts")))
                .args([
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-o",
                    "HostKeyAlias=ws1",
                    "-o",
                ])
                .arg(format!(
                    "ProxyCommand=unshare --mount --propagation private sh -c '\
                     mount --bind {passwd} /etc/passwd && mount --bind {shadow} /etc/shadow && \
                     exec setpriv --reuid=65534 --regid=65534 --clear-groups \
                     {SSHD} -i -e -f {config}'",
                    passwd = path("passwd"),
                    shadow = path("shadow"),
                    config = config.display()
                ))
                .args(["agent@ws1", "echo in"])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            (said, String::from_utf8_lossy(&out.stderr).into_owned())
        };

        let own = login_with("agent@ws1");
        let other = login_with("agent@ws2");
        let bare = login_with("agent");

        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(own.0, "in\n", "{}", own.1);
        for (said, log) in [&other, &bare] {
            assert!(said.is_empty(), "{said}");
            assert!(
                log.contains("Certificate does not contain an authorized principal"),
                "{log}"
            );
            assert!(!log.contains("Accepted publickey"), "{log}");
        }
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

        for line in [
            &b"CONNECT 23\n"[..],
            b"CONNECT 22 \n",
            b"connect 22\n",
            b"CONNECT 022\n",
            b"CONNECT 22\r\n",
        ] {
            let (mut host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
            host.write_all(line).unwrap();
            assert!(handshake(&mut guest).is_err(), "{line:?}");
        }
        let (mut host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.write_all(&[b'C'; 64]).unwrap();
        assert!(handshake(&mut guest).is_err(), "an endless line");
    }
}
