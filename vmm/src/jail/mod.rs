//! The jail, in the manner of Firecracker's jailer, applied to the VMM process itself once every
//! host resource is open (see `vmm::Resources`): the VM then runs from descriptors alone.
//!
//! 1. Refuse symlinks and hard links for every file the VM is given (kernel, initramfs, disks),
//!    and for the jail directory and the vsock socket's directory.
//! 2. With a user namespace (always when the VMM is not root; by choice when it is): a new
//!    user namespace in which the jail uid/gid are the only ids, mapped to the caller's own
//!    effective ids. It owns the namespaces that follow, which is what lets an unprivileged
//!    process create them, mount and pivot_root. Unprivileged, it comes first; root by choice
//!    forks into the PID namespace, then the child switches to the jail ids and maps them to
//!    themselves, so the jailed process is never host root.
//! 3. New PID namespace: fork; the parent waits and reports the child's exit code (and removes
//!    the vsock socket); the child, PID 1 of the namespace, dies with its parent.
//! 4. New mount, IPC, UTS and network namespaces (the VMM needs no network: vsock goes through
//!    Unix sockets in the filesystem).
//! 5. The jail directory becomes the root (pivot_root), read-only, holding only `/vsock`: a
//!    bind mount of the vsock socket's directory, where `<uds>_P` sockets live.
//! 6. rlimits (open files, no core dumps; only ever lowered), non-dumpable, environment
//!    cleared, the capability bounding set emptied, every group dropped (impossible inside an
//!    unprivileged user namespace, where `setgroups` is denied: the caller's own groups stay),
//!    the uid/gid switched to the unprivileged ones given, every capability cleared, and
//!    Landlock on the process.
//!
//! Inherited descriptors are closed at start-up ([`close_inherited_fds`]), before anything is
//! opened. Per-thread seccomp comes after it. Not built: cgroups.

#[allow(unsafe_code)]
mod sys;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetError,
    RulesetStatus, Scope,
};

/// Errors from setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path the jail exposes is a symbolic link.
    #[error("{0} is a symbolic link; the jail refuses links")]
    Symlink(PathBuf),
    /// A file the jail exposes has more than one hard link.
    #[error("{0} has {1} hard links; the jail refuses hard-linked files")]
    HardLink(PathBuf, u64),
    /// A path could not be examined.
    #[error("cannot examine {0}")]
    Stat(PathBuf, #[source] std::io::Error),
    /// The jail directory is unusable.
    #[error("jail directory {0} must be an empty directory")]
    JailDir(PathBuf),
    /// Not root, and no user namespace asked for.
    #[error("an unprivileged jail needs a user namespace (jail user_namespace = auto or on)")]
    NeedsRoot,
    /// A jail step failed.
    #[error("jail step failed: {0}")]
    Step(&'static str, #[source] std::io::Error),
}

/// What to jail into.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The directory that becomes `/` (created if missing; must be empty).
    pub dir: PathBuf,
    /// Unprivileged uid to run as.
    pub uid: u32,
    /// Unprivileged gid to run as.
    pub gid: u32,
    /// The vsock socket, if any; its directory is bind-mounted at `/vsock`.
    pub uds: Option<PathBuf>,
    /// RLIMIT_NOFILE.
    pub max_files: u64,
    /// Create a user namespace first (needed when not root).
    pub user_ns: bool,
}

/// Where things are once inside.
#[derive(Debug, Clone)]
pub struct Inside {
    /// The vsock socket's path inside the jail.
    pub uds: Option<PathBuf>,
}

/// Refuses a symlink at `path` (the path itself, not its parents).
pub fn refuse_symlink(path: &Path) -> Result<std::fs::Metadata, Error> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::Stat(path.to_owned(), e))?;
    if meta.file_type().is_symlink() {
        return Err(Error::Symlink(path.to_owned()));
    }
    Ok(meta)
}

/// Refuses a file the VM will be given if it is a symlink or has more than one hard link.
pub fn check_exposed(path: &Path) -> Result<(), Error> {
    let meta = refuse_symlink(path)?;
    if meta.is_file() && meta.nlink() > 1 {
        return Err(Error::HardLink(path.to_owned(), meta.nlink()));
    }
    Ok(())
}

/// Closes every descriptor above stderr; call first thing in `main` when jailing.
pub fn close_inherited_fds() -> Result<(), Error> {
    sys::close_inherited_fds().map_err(|e| Error::Step("close inherited descriptors", e))
}

fn prepare_dir(dir: &Path) -> Result<(), Error> {
    match refuse_symlink(dir) {
        Ok(meta) => {
            let empty = std::fs::read_dir(dir)
                .map_err(|e| Error::Stat(dir.to_owned(), e))?
                .next()
                .is_none();
            if !meta.is_dir() || !empty {
                return Err(Error::JailDir(dir.to_owned()));
            }
            Ok(())
        }
        Err(Error::Stat(..)) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::Step("create the jail directory", e))
        }
        Err(e) => Err(e),
    }
}

/// Enters the jail. Returns in the jailed child only; the parent waits for the child and
/// exits the process with the child's exit code.
pub fn enter(spec: &JailSpec) -> Result<Inside, Error> {
    prepare_dir(&spec.dir)?;
    let uds_dir = match &spec.uds {
        Some(uds) => {
            let dir = uds.parent().unwrap_or(Path::new("/")).to_owned();
            refuse_symlink(&dir)?;
            Some(dir)
        }
        None => None,
    };
    let (euid, egid) = sys::effective_ids();
    let root = euid == 0;
    if !root && !spec.user_ns {
        return Err(Error::NeedsRoot);
    }
    if root {
        sys::clear_groups().map_err(|e| Error::Step("drop supplementary groups", e))?;
        if spec.user_ns {
            // The child sets the jail up as the jail uid: the root must be its own.
            std::os::unix::fs::chown(&spec.dir, Some(spec.uid), Some(spec.gid))
                .map_err(|e| Error::Step("hand the jail directory to the jail uid", e))?;
        }
    } else {
        // Unprivileged: the user namespace comes first, so that it owns the PID namespace.
        enter_user_ns(spec, euid, egid)?;
    }
    sys::unshare(libc::CLONE_NEWPID).map_err(|e| Error::Step("new PID namespace", e))?;
    match sys::fork().map_err(|e| Error::Step("fork into the PID namespace", e))? {
        sys::Fork::Parent(pid) => {
            // The parent only waits: it takes the exit signals (which restore a raw terminal)
            // like any main thread.
            let _ = crate::terminal::unblock_exit_signals();
            let code = sys::wait(pid).unwrap_or(1);
            crate::terminal::restore();
            if let Some(uds) = &spec.uds {
                let _ = std::fs::remove_file(uds);
            }
            let _ = std::fs::remove_dir(spec.dir.join("vsock"));
            std::process::exit(code);
        }
        sys::Fork::Child => {}
    }
    sys::die_with_parent().map_err(|e| Error::Step("die with the parent", e))?;
    if root && spec.user_ns {
        // Root by choice: become the jail uid first (the kernel clears every capability), then
        // map it to itself in a user namespace, as an unprivileged caller would. The parent
        // stays root to clean up after the child.
        sys::switch_ids(spec.uid, spec.gid)
            .map_err(|e| Error::Step("drop to the jail uid and gid", e))?;
        // A credential change makes the process non-dumpable, which hands /proc/self/*_map
        // to root; and clears the parent-death signal.
        sys::set_dumpable(true).map_err(|e| Error::Step("reclaim /proc/self", e))?;
        sys::die_with_parent().map_err(|e| Error::Step("die with the parent", e))?;
        enter_user_ns(spec, spec.uid, spec.gid)?;
    }
    sys::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET)
        .map_err(|e| Error::Step("new mount, IPC, UTS and network namespaces", e))?;
    let _ = sys::set_hostname("moat-vmm");
    sys::mount(None, Path::new("/"), libc::MS_REC | libc::MS_PRIVATE)
        .map_err(|e| Error::Step("make mounts private", e))?;
    sys::mount(Some(&spec.dir), &spec.dir, libc::MS_BIND | libc::MS_REC)
        .map_err(|e| Error::Step("bind the jail directory", e))?;
    let mut inside = Inside { uds: None };
    if let (Some(dir), Some(uds)) = (&uds_dir, &spec.uds) {
        let target = spec.dir.join("vsock");
        std::fs::create_dir_all(&target).map_err(|e| Error::Step("create /vsock", e))?;
        sys::mount(Some(dir), &target, libc::MS_BIND)
            .map_err(|e| Error::Step("bind the vsock directory", e))?;
        inside.uds = uds.file_name().map(|n| Path::new("/vsock").join(n));
    }
    std::env::set_current_dir(&spec.dir).map_err(|e| Error::Step("enter the jail directory", e))?;
    sys::pivot_root(Path::new("."), Path::new(".")).map_err(|e| Error::Step("pivot_root", e))?;
    sys::detach(Path::new(".")).map_err(|e| Error::Step("detach the old root", e))?;
    std::env::set_current_dir("/").map_err(|e| Error::Step("chdir /", e))?;
    sys::mount(
        None,
        Path::new("/"),
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
    )
    .map_err(|e| Error::Step("make the root read-only", e))?;
    sys::lower_rlimit(libc::RLIMIT_NOFILE, spec.max_files)
        .map_err(|e| Error::Step("limit open files", e))?;
    sys::lower_rlimit(libc::RLIMIT_CORE, 0).map_err(|e| Error::Step("forbid core dumps", e))?;
    sys::not_dumpable().map_err(|e| Error::Step("make the process non-dumpable", e))?;
    sys::clear_env();
    sys::drop_bounding_set().map_err(|e| Error::Step("empty the capability bounding set", e))?;
    sys::switch_ids(spec.uid, spec.gid)
        .map_err(|e| Error::Step("drop to the jail uid and gid", e))?;
    moat_guest_sandbox::drop_capabilities()
        .map_err(|e| Error::Step("clear capabilities", std::io::Error::other(e)))?;
    // A credential change clears the parent-death signal: set it again.
    sys::die_with_parent().map_err(|e| Error::Step("die with the parent", e))?;
    landlock_deny_all().map_err(|e| Error::Step("Landlock", e))?;
    Ok(inside)
}

/// Creates a user namespace in which the jail ids are the only ids, mapped to `outer_uid` and
/// `outer_gid` (the caller's own effective ids: all an unprivileged process may map).
fn enter_user_ns(spec: &JailSpec, outer_uid: u32, outer_gid: u32) -> Result<(), Error> {
    sys::unshare(libc::CLONE_NEWUSER).map_err(|e| Error::Step("new user namespace", e))?;
    write_id_maps(spec.uid, outer_uid, spec.gid, outer_gid)
        .map_err(|e| Error::Step("map the jail uid and gid", e))
}

/// Makes `inside_uid`/`inside_gid` the only ids of the new user namespace, mapped to the
/// outer ids. `setgroups` is denied first: the kernel requires it before an unprivileged
/// process may write its gid map, and the jail never needs it afterwards.
fn write_id_maps(
    inside_uid: u32,
    outer_uid: u32,
    inside_gid: u32,
    outer_gid: u32,
) -> std::io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write(
        "/proc/self/gid_map",
        format!("{inside_gid} {outer_gid} 1\n"),
    )?;
    std::fs::write(
        "/proc/self/uid_map",
        format!("{inside_uid} {outer_uid} 1\n"),
    )
}

/// Whether this process is root (the jail then needs no user namespace).
pub fn is_root() -> bool {
    sys::effective_ids().0 == 0
}

/// The newest Landlock ABI whose rights the jail handles deliberately: every filesystem right
/// up to `IOCTL_DEV` (ABI 5), TCP bind and connect (ABI 4), abstract Unix sockets and signals
/// (ABI 6). A newer kernel is used at this ABI until the jail is reviewed for its rights.
const NEWEST_VETTED_ABI: u32 = 6;

/// Landlock on the calling thread and every thread it starts afterwards: no filesystem access
/// at all (every file the VM needs is already open; connecting to `<uds>_P` is not a Landlock
/// filesystem right), no TCP bind or connect (ABI 4+), no abstract Unix sockets and no signals
/// to processes outside the domain (ABI 6+). A kernel without Landlock is logged, not fatal:
/// seccomp and the empty root still hold. The ruleset has no rules, so every handled access
/// is denied; `no_new_privs` is set first, as Landlock requires.
pub fn landlock_deny_all() -> std::io::Result<()> {
    let kernel_abi = moat_host_probe::landlock_abi();
    if kernel_abi < 1 {
        tracing::warn!("Landlock is not available on this kernel; continuing without it");
        return Ok(());
    }
    let abi = ABI::from(i32::try_from(kernel_abi.min(NEWEST_VETTED_ABI)).unwrap_or(1));
    let landlock = |e: RulesetError| std::io::Error::other(e);
    // Exactly the rights of `abi`, which the kernel offers: anything less is an error.
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(landlock)?;
    if abi >= ABI::V4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(landlock)?;
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(landlock)?;
    }
    let status = ruleset
        .create()
        .and_then(|r| r.restrict_self())
        .map_err(landlock)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(std::io::Error::other(format!(
            "Landlock ABI {kernel_abi}: the ruleset was not fully enforced ({:?})",
            status.ruleset
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-jail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn landlock_denies_every_file_open_to_the_restricted_thread() {
        let path = std::env::temp_dir().join(format!("moat-landlock-{}", std::process::id()));
        std::fs::write(&path, b"secret").unwrap();
        let p = path.clone();
        // Landlock binds the calling thread (and its later children) only.
        let (restricted, opened) = std::thread::spawn(move || {
            let r = landlock_deny_all();
            (r.is_ok(), std::fs::read(&p).map_err(|e| e.kind()))
        })
        .join()
        .unwrap();
        assert!(restricted);
        if moat_host_probe::landlock_abi() >= 1 {
            assert_eq!(opened, Err(std::io::ErrorKind::PermissionDenied));
        }
        // Other threads are untouched.
        assert!(std::fs::read(&path).is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn landlock_rights_grow_with_the_abi() {
        // The filesystem rights the jail denies: 1 has bits 0..=12, 2 adds REFER, 3 TRUNCATE,
        // 5 IOCTL_DEV; nothing newer before the vetted ABI.
        let fs = |abi: u32| AccessFs::from_all(ABI::from(i32::try_from(abi).unwrap())).bits();
        assert_eq!(fs(1), 0x1fff);
        assert_eq!(fs(3), 0x7fff);
        assert_eq!(fs(NEWEST_VETTED_ABI), 0xffff);
        let net = AccessNet::from_all(ABI::V4).bits();
        assert_eq!(net, 0b11);
        assert_eq!(Scope::from_all(ABI::V6).bits(), 0b11);
    }

    #[test]
    fn symlinked_file_is_refused() {
        let d = tmp("symlink");
        std::fs::write(d.join("real"), b"k").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        assert!(matches!(
            check_exposed(&d.join("link")),
            Err(Error::Symlink(_))
        ));
        assert!(check_exposed(&d.join("real")).is_ok());
    }

    #[test]
    fn hard_linked_file_is_refused() {
        let d = tmp("hardlink");
        std::fs::write(d.join("a"), b"k").unwrap();
        std::fs::hard_link(d.join("a"), d.join("b")).unwrap();
        assert!(matches!(
            check_exposed(&d.join("a")),
            Err(Error::HardLink(_, 2))
        ));
    }

    #[test]
    fn non_empty_jail_directory_is_refused() {
        let d = tmp("nonempty");
        std::fs::write(d.join("x"), b"").unwrap();
        assert!(matches!(prepare_dir(&d), Err(Error::JailDir(_))));
    }

    #[test]
    fn symlinked_jail_directory_is_refused() {
        let d = tmp("dirlink");
        std::fs::create_dir_all(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        assert!(matches!(
            prepare_dir(&d.join("link")),
            Err(Error::Symlink(_))
        ));
    }

    #[test]
    fn missing_jail_directory_is_created() {
        let d = tmp("create");
        assert!(prepare_dir(&d.join("new")).is_ok());
        assert!(d.join("new").is_dir());
    }
}
