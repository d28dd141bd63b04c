//! A Unix socket only its owner (and root) can ever connect to: the egress proxy's and the
//! broker's admin sockets, and the workspace host's corporate egress socket (`moat-broker
//! connect --egress-uds`), which its egress proxy, running as the same user, dials; moat-vmm's
//! control socket and `moat pool`'s claim socket (the blocking listener, without the `tokio`
//! feature).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Binds a Unix socket at `path` that is never reachable by anyone but its owner (and root),
/// not even for an instant: the socket is created in a private directory (0700) beside `path`,
/// given mode 0600 there, and only then renamed into place (same file system: atomic). Neither
/// the umask (process-wide, so it cannot be narrowed for this bind alone) nor a chmod after
/// bind decides who can connect meanwhile. A socket already at `path` (a stale one) is
/// replaced. Blocking; [`bind`] is the same for tokio.
pub fn bind_std(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no socket file", path.display()),
        )
    })?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot create the private directory {}: {e}",
                    private.display()
                ),
            )
        })?;
    let inside = private.join("socket");
    let bound = std::os::unix::net::UnixListener::bind(&inside).and_then(|listener| {
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// [`bind_std`], for tokio.
#[cfg(feature = "tokio")]
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let listener = bind_std(path)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

#[cfg(feature = "tokio")]
/// Whether the peer of a connection may use it: the uid this process runs as, or root.
/// Refused with the reason otherwise (a socket a mistake left open still answers no one else).
pub fn peer_allowed(stream: &tokio::net::UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    match cred.uid() {
        0 => Ok(()),
        uid if uid == own => Ok(()),
        uid => Err(format!(
            "peer uid {uid} is neither this process's ({own}) nor root"
        )),
    }
}
