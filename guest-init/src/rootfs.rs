//! The workspace's root file system, as both backends build it: what the agent's root holds
//! and how each piece is mounted, in small steps that [`crate::namespace`] and [`crate::vm`]
//! call in their own order.
//!
//! Shared by both: the agent's home at [`AGENT_HOME`]; a fresh tmpfs on /tmp (sticky, world
//! writable) and /run ([`fresh_tmpfs`]); the virtual DNS over /etc/resolv.conf
//! ([`resolv_conf`], [`bind_resolv_conf`]); a trust store holding the system's certificates
//! and the workspace's CA over the system one ([`write_trust_store`], [`bind_trust_store`])
//! with the variables that point TLS clients at it ([`ca_env`]); /dev, /proc and /sys of the
//! workspace's own ([`REPLACED`]), with a devpts of its own and the descriptor links
//! ([`mount_devpts`], [`link_fds`]), a fresh proc ([`mount_proc`]), sysfs ([`mount_sysfs`])
//! and a read-only cgroup2 tree ([`mount_cgroup2`]); every mount nosuid and nodev where
//! nothing needs otherwise.
//!
//! What differs, and why, stays in each backend:
//!
//! - Where the root comes from. The namespace backend binds a directory of the host (the root
//!   image, or `/` under `--host-root`) and makes the whole tree read-only; the VM mounts its
//!   root disk (ext4) read-only. Only the namespace backend sees the host, so only it masks
//!   /home and /root too ([`crate::MASKED`]), hides the host's secret files, and binds the
//!   workspace's own /etc/passwd and /etc/group (the VM's image has its own accounts).
//! - The agent's home. The namespace backend binds a host directory and clears suid and dev
//!   on the bind (a bind keeps its source's attributes); the VM mounts its home disk nosuid
//!   and nodev.
//! - /dev. The namespace backend builds a tmpfs holding binds of a few harmless host device
//!   nodes (the host's /dev would hand the agent raw disks and every terminal); the VM has the
//!   kernel's devtmpfs (its only devices are the VM's), plus /dev/shm. Its devpts names the
//!   image's tty group (sshd gives it its terminals); in a user namespace that group is not
//!   mapped, so the namespace backend's names none.
//! - /proc and /sys. The VM mounts them in the initramfs first (PID 1 needs them to start)
//!   and moves them into the root. In the namespace backend's user namespace the kernel mounts
//!   a new proc or sysfs only where one is fully visible, so the host's are bound under the
//!   workspace's own, and the fresh ones are mounted after the root is entered; sysfs, there,
//!   is mounted by the host's root beforehand when it started the workspace (the network
//!   namespace is not the workspace's to mount sysfs for).
//! - Entering the root. The namespace backend `pivot_root`s and detaches the host's root; the
//!   VM cannot pivot away from the initramfs, so it moves the root over `/` and `chroot`s
//!   (switch_root).
//! - The trust store. The VM refuses an image without one (its CA would be the only
//!   certificate); the namespace backend, given a host root without Debian's layout, starts
//!   from nothing.
//! - /etc/hosts: the VM writes its own (localhost and its hostname on the loopback); the
//!   namespace backend keeps the root's.
//! - cgroup2: required in the namespace backend; the VM still runs the agent on a kernel
//!   without it.

use std::path::{Path, PathBuf};

use nix::NixPath;
use nix::mount::{MsFlags, mount};

use crate::InitError;

/// Where the agent's home appears inside the workspace.
pub const AGENT_HOME: &str = "/home/agent";

/// The system trust store (Debian's layout), replaced inside the workspace by one that also
/// holds the workspace's CA.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Directories of the workspace's root replaced by the workspace's own (/dev, /proc, /sys).
pub const REPLACED: &[&str] = &["/dev", "/proc", "/sys"];

/// The variables that point TLS clients at the trust store.
pub fn ca_env() -> Vec<(String, String)> {
    [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
    ]
    .iter()
    .map(|k| ((*k).to_owned(), CA_BUNDLE.to_owned()))
    .collect()
}

/// The virtual DNS, as the workspace's resolver configuration.
pub(crate) fn resolv_conf() -> String {
    format!(
        "# moat workspace: the virtual DNS (no query leaves the workspace)\nnameserver {}\noptions edns0\n",
        moat_netstack::GATEWAY
    )
}

/// Where `path`, absolute inside the workspace, lies under `root`.
pub(crate) fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// mount(2), its failure named by `what`.
pub(crate) fn mount_or<P: ?Sized + NixPath>(
    what: &'static str,
    src: Option<&str>,
    target: &P,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mount(src, target, fstype, flags, data).map_err(|source| InitError::Mount { what, source })
}

/// Creates `path` and its parents.
pub(crate) fn mkdir(path: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|e| InitError::Write(path.to_owned(), e))
}

/// Binds the file or directory `src` on `target` (not its submounts).
pub(crate) fn bind(what: &'static str, src: &Path, target: &Path) -> Result<(), InitError> {
    mount_or(
        what,
        Some(&*src.to_string_lossy()),
        target,
        None,
        MsFlags::MS_BIND,
        None,
    )
}

/// The mode of a fresh tmpfs on `dir`: sticky and world-writable where every user keeps
/// scratch files (/tmp, /dev/shm), 0755 elsewhere.
fn tmpfs_mode(dir: &str) -> &'static str {
    if matches!(dir, "/tmp" | "/dev/shm") {
        "mode=1777"
    } else {
        "mode=755"
    }
}

/// Mounts a fresh, empty tmpfs on `dir` (absolute inside the workspace) under `root`,
/// nosuid and nodev.
pub(crate) fn fresh_tmpfs(root: &Path, dir: &'static str) -> Result<(), InitError> {
    mount_or(
        dir,
        Some("tmpfs"),
        &under(root, dir),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmpfs_mode(dir)),
    )
}

/// Binds `resolv` (written from [`resolv_conf`]) over the root's /etc/resolv.conf.
pub(crate) fn bind_resolv_conf(root: &Path, resolv: &Path) -> Result<(), InitError> {
    bind("/etc/resolv.conf", resolv, &under(root, "/etc/resolv.conf"))
}

/// `system`, a trust store (PEM, possibly empty), with the workspace's CA `ca_pem` appended.
fn with_ca(mut system: Vec<u8>, ca_pem: &[u8]) -> Vec<u8> {
    if !system.is_empty() && !system.ends_with(b"\n") {
        system.push(b'\n');
    }
    system.extend_from_slice(ca_pem);
    system
}

/// Writes the workspace's trust store to `out`: `system` (the root's, PEM) plus `ca_pem`.
pub(crate) fn write_trust_store(
    system: Vec<u8>,
    ca_pem: &[u8],
    out: &Path,
) -> Result<(), InitError> {
    std::fs::write(out, with_ca(system, ca_pem)).map_err(|e| InitError::Write(out.to_owned(), e))
}

/// Binds `bundle` (from [`write_trust_store`]) over the root's [`CA_BUNDLE`].
pub(crate) fn bind_trust_store(root: &Path, bundle: &Path) -> Result<(), InitError> {
    bind("the trust store", bundle, &under(root, CA_BUNDLE))
}

/// The options of the workspace's devpts: an instance of its own, /dev/ptmx usable by all,
/// terminals 0620, owned by `tty_gid` where the root has a tty group to give them.
fn devpts_options(tty_gid: Option<u32>) -> String {
    let mut options = String::from("newinstance,ptmxmode=0666,mode=0620");
    if let Some(gid) = tty_gid {
        options.push_str(&format!(",gid={gid}"));
    }
    options
}

/// Mounts a devpts of the workspace's own on `<dev>/pts` (made if missing), nosuid and noexec.
pub(crate) fn mount_devpts(dev: &Path, tty_gid: Option<u32>) -> Result<(), InitError> {
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount_or(
        "/dev/pts",
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&devpts_options(tty_gid)),
    )
}

/// The links udev would make in `dev`: the descriptor links bash's process substitution and
/// `tee /dev/stderr` use. One that exists already is left as it is.
pub(crate) fn link_fds(dev: &Path) {
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
}

/// Mounts a fresh proc on `target`, nosuid, nodev and noexec.
pub(crate) fn mount_proc(target: &Path) -> Result<(), InitError> {
    mount_or(
        "/proc",
        Some("proc"),
        target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Mounts the sysfs of the caller's network namespace on `target`, nosuid, nodev and noexec;
/// read-only unless `writable` (PID 1 of the VM, before its root is switched).
pub(crate) fn mount_sysfs(target: &Path, writable: bool) -> Result<(), InitError> {
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount_or("/sys", Some("sysfs"), target, Some("sysfs"), flags, None)
}

/// Mounts the workspace's cgroup2 tree on /sys/fs/cgroup, read-only for everything inside.
pub(crate) fn mount_cgroup2() -> Result<(), InitError> {
    mount_or(
        "/sys/fs/cgroup",
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_follows_a_trust_store_that_lacks_its_last_newline_on_a_line_of_its_own() {
        let store = with_ca(b"-----END CERTIFICATE-----".to_vec(), b"CA\n");
        assert_eq!(store, b"-----END CERTIFICATE-----\nCA\n");
    }

    #[test]
    fn the_ca_follows_a_complete_trust_store_without_a_blank_line() {
        let store = with_ca(b"-----END CERTIFICATE-----\n".to_vec(), b"CA\n");
        assert_eq!(store, b"-----END CERTIFICATE-----\nCA\n");
    }

    #[test]
    fn without_a_system_trust_store_the_ca_is_the_whole_store() {
        assert_eq!(with_ca(Vec::new(), b"CA\n"), b"CA\n");
    }

    #[test]
    fn shared_scratch_directories_are_sticky_and_world_writable_and_the_rest_are_not() {
        assert_eq!(tmpfs_mode("/tmp"), "mode=1777");
        assert_eq!(tmpfs_mode("/dev/shm"), "mode=1777");
        for dir in ["/run", "/home", "/root"] {
            assert_eq!(tmpfs_mode(dir), "mode=755", "{dir}");
        }
    }

    #[test]
    fn terminals_go_to_the_tty_group_only_where_one_is_named() {
        assert_eq!(devpts_options(None), "newinstance,ptmxmode=0666,mode=0620");
        assert_eq!(
            devpts_options(Some(5)),
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        );
    }

    #[test]
    fn workspace_paths_lie_under_the_new_root() {
        assert_eq!(
            under(Path::new("/mnt/root"), CA_BUNDLE),
            Path::new("/mnt/root/etc/ssl/certs/ca-certificates.crt")
        );
        assert_eq!(under(Path::new("/"), "/dev/shm"), Path::new("/dev/shm"));
    }

    #[test]
    fn the_resolver_is_the_virtual_dns() {
        let conf = resolv_conf();
        assert!(
            conf.lines()
                .any(|l| l == format!("nameserver {}", moat_netstack::GATEWAY)),
            "{conf}"
        );
        assert_eq!(
            conf.lines().filter(|l| l.starts_with("nameserver")).count(),
            1
        );
    }
}
