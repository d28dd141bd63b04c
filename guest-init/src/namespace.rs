//! The namespace backend: guest-init on the host, in fresh namespaces, with its own TUN.
//!
//! The sequence ([`run_namespace`]; the whole start, `moat run` first, is in ARCHITECTURE.md):
//! 1. `unshare` user, mount, pid, net, ipc, uts and cgroup namespaces; map the caller's uid/gid to root
//!    inside (so the host user needs no privilege). Run by the host's root, root inside is
//!    instead an unprivileged host uid/gid of the workspace's own, leased by `moat run`
//!    ([`crate::ids`]), never host uid 0: the process first drops its supplementary groups, creates
//!    the network namespace (owned by the initial user namespace, so the workspace cannot
//!    reconfigure it), its TUN device and its sysfs, binds the root image read-only and the
//!    agent's home into the run directory (refused unless the leased id owns it) and hands the
//!    mapped gid search permission on the run directory and connect permission on its two
//!    sockets; then it unshares the rest, a child still host root writes the maps, and the
//!    process takes root inside.
//! 2. fork: the child is PID 1 of the new pid namespace; the parent only waits and relays the
//!    exit status.
//! 3. As PID 1: a new root: the root image (by default the Debian image the VM boots; the
//!    host's own root only with `moat run --host-root`) bound recursively and made read-only,
//!    nosuid and nodev (every submount too), fresh tmpfs on /tmp, /run, /home and /root with
//!    the agent's home bound writable
//!    at /home/agent, the workspace's resolv.conf (the virtual DNS) over /etc/resolv.conf, a
//!    fresh /proc; then pivot_root into it, so nothing of the host is writable or reachable
//!    by path but what was bound in; then a fresh /proc, the workspace's own sysfs and cgroup2
//!    tree (read-only).
//! 4. TUN up (default route through it, loopback up), netstack thread started.
//! 5. The agent is started with its environment (HOME, CA variables), confined by
//!    `moat-guest-sandbox` between fork and exec; PID 1 reaps every child, and when the agent
//!    exits, exits with its status: the kernel then kills whatever is left in the namespace.
//!

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, sethostname};

use crate::launch::{exit_code, run_agent};
use crate::rootfs::{self, AGENT_HOME, CA_BUNDLE, ca_env, mkdir, mount_or, resolv_conf};
use crate::service;
use crate::session::{self, SESSION_ID, Sessions};
use moat_log::error_chain;

use crate::{InitError, RootFs, WorkspaceConfig};

/// The namespaces the workspace's user namespace owns.
const OWNED_BY_THE_WORKSPACE: CloneFlags = CloneFlags::CLONE_NEWUSER
    .union(CloneFlags::CLONE_NEWNS)
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWCGROUP);

fn map_ids(uid: Uid, gid: Gid) -> Result<(), InitError> {
    let write = |path: &str, text: String| std::fs::write(path, text).map_err(InitError::IdMap);
    write("/proc/self/setgroups", "deny".to_owned())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

fn tun_error(e: std::io::Error) -> InitError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if e.raw_os_error() == Some(libc::EACCES) => {
            InitError::TunAccess(e)
        }
        _ => InitError::Network(e),
    }
}

/// What the host's root prepares before giving up its identity: the network namespace (owned
/// by the host's initial user namespace, so nothing in the workspace can reconfigure it) with
/// its TUN device, that namespace's sysfs, the workspace's root and the agent's home.
struct Prepared {
    tun: moat_netstack::Tun,
    /// A sysfs of the workspace's network namespace, mounted read-only on `<run_dir>/sys`.
    sysfs: PathBuf,
    /// The workspace's root, bound read-only on `<run_dir>/image` (an image), or `/`.
    root: PathBuf,
    /// The agent's home, bound on `<run_dir>/agent-home` (and checked there).
    home: PathBuf,
    /// Each service's models and devices, bound under `<run_dir>/services`.
    services: Vec<service::Sources>,
}

/// Hands the mapped id exactly what PID 1 needs in the run directory: search permission on
/// the directory and connect permission on the host's two sockets, both through the group
/// (the owner stays root, so the workspace can change no mode), nothing to other host users.
fn hand_over_run_dir(config: &WorkspaceConfig, id: u32) -> Result<(), InitError> {
    let gid = Some(id);
    let give = |path: &Path, mode: u32| {
        std::os::unix::fs::lchown(path, None, gid)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| InitError::Write(path.to_owned(), e))
    };
    give(&config.flow_socket, 0o660)?;
    if let Some(audit) = &config.audit_socket {
        give(audit, 0o660)?;
    }
    give(&config.run_dir, 0o710)
}

/// The workspace's user namespace when the host's root starts it: root inside is host uid and
/// gid `id` (leased by `moat run`, [`crate::ids`]). The process gives up its supplementary
/// groups, creates the network namespace and the TUN device while it is still host root, binds
/// the workspace's root and the agent's home, then unshares the workspace's namespaces; a child
/// it forked before, still host root in the initial user namespace, writes the maps (writing an
/// id other than one's own needs CAP_SETUID over the parent namespace, in the writer and in the
/// opener of the map file); then the process takes root inside, that is, host uid `id`.
fn isolate_as_host_root(config: &WorkspaceConfig, id: u32) -> Result<Prepared, InitError> {
    let parent = nix::unistd::getppid();
    // Host root's groups (0 among them) would survive the id switch: setgroups is denied in
    // the workspace, so they go now.
    nix::unistd::setgroups(&[]).map_err(|e| InitError::IdMap(e.into()))?;
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).map_err(InitError::Unshare)?;
    // Nothing mounted here may reach the host's mount namespace (where `moat run` removes the
    // run directory recursively at exit: a bound home there would be emptied).
    mount_or(
        "/ (private)",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let tun = moat_netstack::setup_tun().map_err(tun_error)?;
    // sysfs shows the network namespace of whoever mounts it, and only a holder of
    // CAP_SYS_ADMIN over that namespace's owner may mount it: root, now.
    let sysfs = config.run_dir.join("sys");
    mkdir(&sysfs)?;
    rootfs::mount_sysfs(&sysfs, false)?;
    // Bound while the process can still reach them wherever they are (the workspace's id may
    // not search the directories above them), and locked as bound: read-only, nosuid and
    // nodev cannot be undone from inside.
    let root = match &config.root {
        RootFs::Image(dir) => bind_image(dir, &config.run_dir.join("image"))?,
        RootFs::Host => PathBuf::from("/"),
    };
    let home = bind_home(config, id)?;
    let services = service::stage_host_paths(&config.run_dir.join("services"), &config.services)?;
    switch_ids(parent, id, &config.service_host_ids)?;
    Ok(Prepared {
        tun,
        sysfs,
        root,
        home,
        services,
    })
}

/// Binds the root image `dir` on `target`, read-only, nosuid and nodev, and returns `target`.
fn bind_image(dir: &Path, target: &Path) -> Result<PathBuf, InitError> {
    mkdir(target)?;
    mount_or(
        "the root image",
        Some(&*dir.to_string_lossy()),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    moat_guest_sandbox::make_tree_read_only(target).map_err(|e| InitError::Mount {
        what: "the root image read-only",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })?;
    Ok(target.to_owned())
}

/// Binds the agent's home on `<run_dir>/agent-home` while the process can still reach it
/// wherever it is, and refuses it there unless `id` owns it: PID 1 binds it from there, so
/// the directory checked is the directory the agent gets.
fn bind_home(config: &WorkspaceConfig, id: u32) -> Result<PathBuf, InitError> {
    let home = &config.agent.home;
    let bound = config.run_dir.join("agent-home");
    mkdir(&bound)?;
    let err = |e: std::io::Error| InitError::Home(home.clone(), e);
    mount(
        Some(home),
        &bound,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| err(e.into()))?;
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&bound).map_err(err)?);
    if owner != id {
        return Err(err(std::io::Error::other(format!(
            "it is owned by uid {owner}, and this workspace runs as host uid {id}"
        ))));
    }
    Ok(bound)
}

/// Unshares the workspace's namespaces and becomes its root, host uid `id`; the services'
/// uids inside are mapped to their own host ids, `services`.
fn switch_ids(parent: Pid, id: u32, services: &[u32]) -> Result<(), InitError> {
    let this = Pid::this();
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(InitError::Fork)?;
    // SAFETY: the caller guarantees the process is single-threaded, so the child may run
    // arbitrary code after fork.
    #[allow(unsafe_code)]
    let writer = match unsafe { fork() }.map_err(InitError::Fork)? {
        ForkResult::Child => {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            drop(ready_w);
            let mut byte = [0u8; 1];
            // EOF (the parent failed, or died) writes nothing.
            let go = matches!(nix::unistd::read(&ready_r, &mut byte), Ok(1))
                && nix::unistd::getppid() == this;
            let code = if go {
                match write_root_maps(this, id, services) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("moat guest-init: cannot map the workspace's root: {e}");
                        1
                    }
                }
            } else {
                1
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_r);
    let unshared = unshare(OWNED_BY_THE_WORKSPACE).map_err(InitError::Unshare);
    if unshared.is_ok() {
        let _ = nix::unistd::write(&ready_w, b"1");
    }
    drop(ready_w);
    let written = loop {
        match waitpid(writer, None) {
            Ok(WaitStatus::Exited(_, 0)) => break true,
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => break false,
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(InitError::Fork(e)),
        }
    };
    unshared?;
    if !written {
        return Err(InitError::IdMap(std::io::Error::other(
            "the map writer failed",
        )));
    }
    let zero = (Gid::from_raw(0), Uid::from_raw(0));
    nix::unistd::setresgid(zero.0, zero.0, zero.0).map_err(|e| InitError::IdMap(e.into()))?;
    nix::unistd::setresuid(zero.1, zero.1, zero.1).map_err(|e| InitError::IdMap(e.into()))?;
    // The id change cleared the parent-death signal: `moat run`'s death must still end the
    // workspace.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        return Err(InitError::IdMap(std::io::Error::other("moat run is gone")));
    }
    Ok(())
}

/// Run by the host-root child: the maps of `pid`, whose root becomes host `id` and whose
/// services' uids ([`service::service_uid`]) become the host ids `services`, and no setgroups
/// in it.
fn write_root_maps(pid: Pid, id: u32, services: &[u32]) -> std::io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let mut map = format!("0 {id} 1\n");
    for (i, host) in services.iter().enumerate() {
        map.push_str(&format!("{} {host} 1\n", service::service_uid(i)));
    }
    std::fs::write(proc.join("setgroups"), "deny")?;
    std::fs::write(proc.join("uid_map"), &map)?;
    std::fs::write(proc.join("gid_map"), &map)
}

/// Creates the namespaces, runs the workspace as PID 1 inside, and returns the agent's exit
/// code. Must be called while the process is single-threaded (it forks).
///
/// Run by the host's root (effective uid 0), the workspace's root is host uid and gid
/// `config.host_id` (leased by `moat run`), never 0; otherwise the caller's own uid and gid.
pub fn run_namespace(config: &WorkspaceConfig) -> Result<i32, InitError> {
    let resolv = config.run_dir.join("resolv.conf");
    std::fs::write(&resolv, resolv_conf()).map_err(|e| InitError::Write(resolv.clone(), e))?;
    // Everything written in the run directory is written now, before any id switch.
    let root = match &config.root {
        RootFs::Image(dir) => dir.clone(),
        RootFs::Host => PathBuf::from("/"),
    };
    let bundle = match &config.extra_ca {
        Some(extra) => Some(write_bundle(&root, &config.run_dir, extra)?),
        None => None,
    };
    write_accounts(&root, &config.run_dir, &config.services)?;
    mkdir(&config.run_dir.join("root"))?;
    // The session socket and sshd's log, opened by the host's user; PID 1 inherits both.
    let ssh = config.ssh.as_ref().map(open_session_files).transpose()?;

    let prepared = if Uid::effective().is_root() {
        // Never host root inside: only an id of the workspaces' range, leased by `moat run`.
        let id = config
            .host_id
            .filter(|id| crate::ids::is_run_id(*id))
            .ok_or_else(|| {
                InitError::IdMap(std::io::Error::other(
                    "run by root, a workspace needs a host id of its own (moat run leases one)",
                ))
            })?;
        check_service_ids(config, id)?;
        hand_over_run_dir(config, id)?;
        Some(isolate_as_host_root(config, id)?)
    } else {
        if !config.services.is_empty() {
            // One user namespace of an unprivileged user maps one id: a service would be the
            // agent's own uid on the host, which signals, traces and reads it.
            return Err(InitError::IdMap(std::io::Error::other(
                "workspace services need moat run as root in the namespace backend (each \
                 runs as a host uid of its own, and an unprivileged user can map only its own)",
            )));
        }
        let (uid, gid) = (Uid::current(), Gid::current());
        unshare(OWNED_BY_THE_WORKSPACE | CloneFlags::CLONE_NEWNET).map_err(InitError::Unshare)?;
        map_ids(uid, gid)?;
        None
    };
    crate::signals::install();

    // SAFETY: the caller guarantees the process is single-threaded, so the child may run
    // arbitrary code after fork.
    #[allow(unsafe_code)]
    match unsafe { fork() }.map_err(InitError::Fork)? {
        ForkResult::Parent { child } => {
            // The TUN device and the session socket are PID 1's alone.
            drop(prepared);
            drop(ssh);
            loop {
                crate::signals::forward_pending(child);
                match crate::signals::wait_for(Some(child)) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(InitError::Fork(e)),
                }
            }
        }
        ForkResult::Child => {
            // If the waiting parent dies, PID 1 dies, and the kernel empties the namespace.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            let code = match init(config, &resolv, bundle.as_deref(), prepared, ssh) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("moat guest-init: {}", error_chain(&e));
                    125
                }
            };
            std::process::exit(code);
        }
    }
}

/// The services' host ids: one each, from the workspaces' range, none the workspace's own and
/// no two alike.
fn check_service_ids(config: &WorkspaceConfig, id: u32) -> Result<(), InitError> {
    let ids = &config.service_host_ids;
    let distinct = ids
        .iter()
        .enumerate()
        .all(|(i, a)| crate::ids::is_run_id(*a) && *a != id && !ids[..i].contains(a));
    if ids.len() != config.services.len() || !distinct {
        return Err(InitError::IdMap(std::io::Error::other(
            "run by root, each workspace service needs a host id of its own (moat run leases \
             them)",
        )));
    }
    Ok(())
}

/// The workspace's accounts, bound over the host's `/etc/passwd` and `/etc/group`: its root
/// (the agent), the account SSH sessions log in as ([`SESSION_ID`]: a nested user namespace
/// maps the workspace's root to it, see [`session`]), one per service (`svc-<name>`), and
/// nobody. The host's own accounts are none of the workspace's business.
fn write_accounts(
    root: &Path,
    run_dir: &Path,
    services: &[service::ServiceSpec],
) -> Result<(), InitError> {
    let shell = if root.join("bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let (mut svc_passwd, mut svc_group) = (String::new(), String::new());
    for (i, spec) in services.iter().enumerate() {
        let (uid, name) = (service::service_uid(i), &spec.name);
        svc_passwd.push_str(&format!(
            "svc-{name}:x:{uid}:{uid}:moat service {name}:/nonexistent:/usr/sbin/nologin\n"
        ));
        svc_group.push_str(&format!("svc-{name}:x:{uid}:\n"));
    }
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:{shell}\n\
                 agent:x:{SESSION_ID}:{SESSION_ID}:moat agent:{AGENT_HOME}:{shell}\n\
                 {svc_passwd}\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nagent:x:{SESSION_ID}:\n{svc_group}nogroup:x:65534:\n"),
        ),
    ];
    for (name, text) in files {
        let path = run_dir.join(name);
        std::fs::write(&path, text).map_err(|e| InitError::Write(path.clone(), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| InitError::Write(path.clone(), e))?;
    }
    Ok(())
}

/// The session service's socket and log, opened before the workspace starts.
struct SessionFiles {
    listener: std::os::unix::net::UnixListener,
    log: Option<std::os::fd::OwnedFd>,
}

fn open_session_files(setup: &crate::SshSetup) -> Result<SessionFiles, InitError> {
    setup.service.check()?;
    let listener = std::os::unix::net::UnixListener::bind(&setup.listen)
        .map_err(|e| InitError::Write(setup.listen.clone(), e))?;
    // Only the host side's connector (this user) connects.
    std::fs::set_permissions(&setup.listen, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| InitError::Write(setup.listen.clone(), e))?;
    let log = match &setup.log {
        Some(path) => Some(std::os::fd::OwnedFd::from(
            // Made by `moat run` beside the run directory; never through a link.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| InitError::Write(path.clone(), e))?,
        )),
        None => None,
    };
    Ok(SessionFiles { listener, log })
}

/// Host files bound over with /dev/null inside the workspace.
const SECRET_FILES: &[&str] = &[
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
];

/// Writes `<run_dir>/ca-bundle.crt`: the trust store of the workspace's root (the image's, or
/// the host's) plus `extra` (PEM).
/// A root without one (a host root of another layout) starts from an empty store.
fn write_bundle(root: &Path, run_dir: &Path, extra: &Path) -> Result<PathBuf, InitError> {
    let system = std::fs::read(rootfs::under(root, CA_BUNDLE)).unwrap_or_default();
    let ca = std::fs::read(extra).map_err(|e| InitError::Write(extra.to_owned(), e))?;
    let out = run_dir.join("ca-bundle.crt");
    rootfs::write_trust_store(system, &ca, &out)?;
    Ok(out)
}

/// Directories of the workspace's root that get a fresh, empty tmpfs, whatever the root: /tmp
/// and /run (sockets, other sessions), /home and /root (people's keys and credentials). Under
/// `--host-root` these are what hides the host's: `moat run` refuses to start when a file the
/// workspace must not see would be visible elsewhere.
pub const MASKED: &[&str] = &["/tmp", "/run", "/home", "/root"];

/// Builds the workspace's root under `<run_dir>/root` from `source` (the image, or the host's
/// `/`) and pivots into it. `home` is where the agent's home is bound from; `sysfs`, a sysfs
/// already mounted (else one is mounted here).
fn enter_root(
    config: &WorkspaceConfig,
    source: &Path,
    resolv: &Path,
    bundle: Option<&Path>,
    home: &Path,
    sysfs: Option<&Path>,
    services: &[service::Sources],
) -> Result<(), InitError> {
    let root = config.run_dir.join("root");
    let rec_bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount_or(
        "the root",
        Some(&*source.to_string_lossy()),
        &root,
        None,
        rec_bind,
        None,
    )?;
    if source != Path::new("/") {
        // In a user namespace the kernel mounts a new proc or sysfs only where one is already
        // fully visible (so that a mount cannot reveal what an overmount hid): the host's are
        // bound first, then covered by the workspace's own below.
        for fs in ["proc", "sys"] {
            mount_or(
                "the host's /proc or /sys under the workspace's own",
                Some(&*Path::new("/").join(fs).to_string_lossy()),
                &root.join(fs),
                None,
                rec_bind,
                None,
            )?;
        }
    }
    moat_guest_sandbox::make_tree_read_only(&root).map_err(|e| InitError::Mount {
        what: "the root read-only",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })?;
    for dir in MASKED {
        rootfs::fresh_tmpfs(&root, dir)?;
    }
    // Files only root may read on the host (password hashes, SSH host keys) are hidden too:
    // the workspace is never the host's root (see `crate::ids`), but this does not rest on it.
    let null = Path::new("/dev/null");
    for secret in SECRET_FILES {
        let target = rootfs::under(&root, secret);
        if target.is_file() {
            rootfs::bind("/dev/null over a host secret", null, &target)?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(root.join("etc/ssh")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ssh_host_") && name.ends_with("_key") {
                rootfs::bind("/dev/null over an SSH host key", null, &entry.path())?;
            }
        }
    }
    // A /dev of our own with only harmless devices: the host's /dev would hand the agent raw
    // disks and every terminal.
    let dev = root.join("dev");
    mount_or(
        "/dev",
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let node = dev.join(name);
        std::fs::write(&node, b"").map_err(|e| InitError::Write(node.clone(), e))?;
        rootfs::bind("a device node", &Path::new("/dev").join(name), &node)?;
    }
    // The user namespace maps no tty group.
    rootfs::mount_devpts(&dev, None)?;
    let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    rootfs::link_fds(&dev);
    // The services' files and devices, in /run (a fresh tmpfs above): hidden from the agent
    // by its sandbox, each shown only to its service.
    if !config.services.is_empty() {
        service::lay_out(&root, Path::new("/dev"), &config.services, services)?;
    }
    let agent_home = rootfs::under(&root, AGENT_HOME);
    mkdir(&agent_home)?;
    rootfs::bind("the agent's home", home, &agent_home)?;
    // A bind keeps the source mount's attributes: a home on a suid-capable host file system
    // would let a setuid file the agent leaves there (or one already there) take effect inside
    // the workspace, for any process not already under no_new_privs (the VM's home disk is
    // mounted nosuid and nodev likewise).
    moat_guest_sandbox::make_tree_nosuid(&agent_home).map_err(|e| InitError::Mount {
        what: "the agent's home nosuid and nodev",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })?;
    rootfs::bind_resolv_conf(&root, resolv)?;
    for name in ["passwd", "group"] {
        rootfs::bind(
            "the workspace's accounts",
            &config.run_dir.join(name),
            &root.join("etc").join(name),
        )?;
    }
    if let Some(bundle) = bundle {
        rootfs::bind_trust_store(&root, bundle)?;
    }
    if let Some(sysfs) = sysfs {
        let sysfs = sysfs.to_string_lossy();
        mount_or(
            "/sys",
            Some(&sysfs),
            &root.join("sys"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    pivot_into(&root)?;
    rootfs::mount_proc(Path::new("/proc"))?;
    // The workspace's own sysfs (its network namespace's devices, not the host's) and its
    // own cgroup tree, both read-only for everything inside.
    // (When the host's root started the workspace, the network namespace is not the
    // workspace's to mount sysfs for: the one root mounted for it is bound above.)
    if sysfs.is_none() {
        rootfs::mount_sysfs(Path::new("/sys"), false)?;
    }
    rootfs::mount_cgroup2()
}

/// pivot_root into `root` and detach the host's root, so nothing of the host is reachable by
/// path but what was bound in.
fn pivot_into(root: &Path) -> Result<(), InitError> {
    nix::unistd::chdir(root).map_err(|source| InitError::Mount {
        what: "the new root",
        source,
    })?;
    nix::unistd::pivot_root(".", ".").map_err(|source| InitError::Mount {
        what: "the new root (pivot_root)",
        source,
    })?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
        InitError::Mount {
            what: "away the host root",
            source,
        }
    })?;
    nix::unistd::chdir("/").map_err(|source| InitError::Mount {
        what: "the new root",
        source,
    })
}

/// PID 1 of the workspace.
fn init(
    config: &WorkspaceConfig,
    resolv: &Path,
    bundle: Option<&Path>,
    prepared: Option<Prepared>,
    ssh: Option<SessionFiles>,
) -> Result<i32, InitError> {
    mount_or(
        "/ (private)",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // The run directory (flow socket, resolv.conf, audit log) is left behind by pivot_root.
    // Keep a handle to it to reach the flow socket.
    let run_dir = nix::fcntl::open(
        &config.run_dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| InitError::Mount {
        what: "the run directory",
        source,
    })?;
    let (tun, root, home, sysfs, sources) = match prepared {
        Some(p) => (p.tun, p.root, p.home, Some(p.sysfs), p.services),
        // The TUN device is opened while the host's /dev is still in view.
        None => (
            moat_netstack::setup_tun().map_err(tun_error)?,
            match &config.root {
                RootFs::Image(dir) => bind_image(dir, &config.run_dir.join("image"))?,
                RootFs::Host => PathBuf::from("/"),
            },
            config.agent.home.clone(),
            None,
            Vec::new(),
        ),
    };
    enter_root(
        config,
        &root,
        resolv,
        bundle,
        &home,
        sysfs.as_deref(),
        &sources,
    )?;
    // Nobody else in the workspace may open our descriptors through /proc/1/fd.
    let _ = nix::sys::prctl::set_dumpable(false);
    // The host's sockets, through the kept handle on the run directory.
    let host_dir =
        Path::new("/proc/self/fd").join(std::os::fd::AsRawFd::as_raw_fd(&run_dir).to_string());
    let flow_socket = host_dir.join(config.flow_socket.file_name().unwrap_or_default());
    let reporter = std::sync::Arc::new(crate::report::Reporter::new(
        config
            .audit_socket
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or(crate::report::Sink::None, |name| {
                crate::report::Sink::Unix(host_dir.join(name))
            }),
    ));
    let _ = sethostname(&config.hostname);

    let transport = moat_netstack::UnixTransport { path: flow_socket };
    crate::start_netstack(
        tun,
        Box::new(transport),
        config.flow_header_version,
        moat_netstack::LocalRoutes::new(config.local_routes.clone()),
    )
    .map_err(InitError::Network)?;

    let mut agent = config.agent.clone();
    agent.home = AGENT_HOME.into();
    agent.env.extend(ca_env());
    let mut sandbox = moat_guest_sandbox::agent_config(&agent.home);
    // Started before the agent; their directory (models, devices, temporary files) is
    // hidden from the agent and from SSH sessions, which share its sandbox.
    let mut services = service::Services::start(&config.services, &reporter)?;
    if !config.services.is_empty() {
        sandbox.hidden.push(service::SERVICES_DIR.into());
    }
    if let (Some(files), Some(setup)) = (ssh, &config.ssh) {
        let mut env = ca_env();
        env.push(("MOAT_WORKSPACE".into(), "1".into()));
        let sessions = Sessions {
            config: session::prepare(&setup.service, &env, None)?,
            home: agent.home.clone(),
            sandbox: moat_guest_sandbox::SandboxConfig {
                user_namespace: Some(
                    moat_guest_sandbox::UserNamespace::create(SESSION_ID, SESSION_ID)
                        .map_err(session::SessionError::UserNamespace)?,
                ),
                ..sandbox.clone()
            },
            log: files.log,
            report: std::sync::Arc::clone(&reporter),
        };
        let listener = files.listener;
        std::thread::Builder::new()
            .name("sessions".into())
            .spawn(move || session::serve_unix(listener, sessions))
            .map_err(session::SessionError::Service)?;
    }
    let status = run_agent(&agent, &sandbox, None, &reporter, &mut services, &|_| {})
        .map_err(InitError::Agent)?;
    services.stop(&reporter);
    Ok(exit_code(status))
}
