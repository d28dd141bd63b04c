//! The namespace backend: guest-init on the host, in fresh namespaces, with its own TUN.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, fork, sethostname};

use crate::launch::{exit_code, run_agent};
use crate::{InitError, WorkspaceConfig, chain};

/// The virtual DNS, as the workspace's resolver configuration.
pub(crate) fn resolv_conf() -> String {
    format!(
        "# moat workspace: the virtual DNS (no query leaves the workspace)\nnameserver {}\noptions edns0\n",
        moat_netstack::GATEWAY
    )
}

fn map_ids(uid: Uid, gid: Gid) -> Result<(), InitError> {
    let write = |path: &str, text: String| std::fs::write(path, text).map_err(InitError::IdMap);
    write("/proc/self/setgroups", "deny".to_owned())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

fn mount_or(
    what: &'static str,
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mount(src, target, fstype, flags, data).map_err(|source| InitError::Mount { what, source })
}

/// Creates the namespaces, runs the workspace as PID 1 inside, and returns the agent's exit
/// code. Must be called while the process is single-threaded (it forks).
pub fn run_namespace(config: &WorkspaceConfig) -> Result<i32, InitError> {
    let resolv = config.run_dir.join("resolv.conf");
    std::fs::write(&resolv, resolv_conf()).map_err(|e| InitError::Write(resolv.clone(), e))?;

    let (uid, gid) = (Uid::current(), Gid::current());
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(InitError::Unshare)?;
    map_ids(uid, gid)?;
    crate::signals::install();

    // SAFETY: the caller guarantees the process is single-threaded, so the child may run
    // arbitrary code after fork.
    #[allow(unsafe_code)]
    match unsafe { fork() }.map_err(InitError::Fork)? {
        ForkResult::Parent { child } => loop {
            crate::signals::forward_pending(child);
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(InitError::Fork(e)),
            }
        },
        ForkResult::Child => {
            // If the waiting parent dies, PID 1 dies, and the kernel empties the namespace.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            let code = match init(config, &resolv) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("moat guest-init: {}", chain(&e));
                    125
                }
            };
            std::process::exit(code);
        }
    }
}

/// Host files bound over with /dev/null inside the workspace.
const SECRET_FILES: &[&str] = &[
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
];

/// Where the agent's home appears inside the workspace.
pub const AGENT_HOME: &str = "/home/agent";

/// The system trust store (Debian's layout), replaced inside the workspace by one that also
/// holds the workspace's CA.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

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

/// Writes `<run_dir>/ca-bundle.crt`: the host's trust store plus `extra` (PEM).
fn write_bundle(run_dir: &Path, extra: &Path) -> Result<PathBuf, InitError> {
    let mut bundle = std::fs::read(CA_BUNDLE).unwrap_or_default();
    let ca = std::fs::read(extra).map_err(|e| InitError::Write(extra.to_owned(), e))?;
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(&ca);
    let out = run_dir.join("ca-bundle.crt");
    std::fs::write(&out, bundle).map_err(|e| InitError::Write(out.clone(), e))?;
    Ok(out)
}

fn mkdir(path: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|e| InitError::Write(path.to_owned(), e))
}

/// Builds the workspace's root under `<run_dir>/root` and pivots into it.
fn enter_root(config: &WorkspaceConfig, resolv: &Path) -> Result<(), InitError> {
    let root = config.run_dir.join("root");
    mkdir(&root)?;
    let rec_bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount_or("the root", Some("/"), &root, None, rec_bind, None)?;
    moat_guest_sandbox::make_tree_read_only(&root).map_err(|e| InitError::Mount {
        what: "the root read-only",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Fresh, empty directories over the host's: /tmp and /run (sockets, other sessions), /home
    // and /root (people's keys and credentials, readable by a workspace mapped to host root).
    for (dir, what) in [
        ("tmp", "/tmp"),
        ("run", "/run"),
        ("home", "/home"),
        ("root", "/root"),
    ] {
        let mode = if dir == "tmp" {
            "mode=1777"
        } else {
            "mode=755"
        };
        mount_or(
            what,
            Some("tmpfs"),
            &root.join(dir),
            Some("tmpfs"),
            nosuid,
            Some(mode),
        )?;
    }
    // Files only root may read on the host (password hashes, SSH host keys) are hidden too, for
    // the case where the workspace runs as the host's root.
    for secret in SECRET_FILES {
        let target = root.join(secret.trim_start_matches('/'));
        if target.is_file() {
            mount_or(
                "/dev/null over a host secret",
                Some("/dev/null"),
                &target,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(root.join("etc/ssh")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ssh_host_") && name.ends_with("_key") {
                mount_or(
                    "/dev/null over an SSH host key",
                    Some("/dev/null"),
                    &entry.path(),
                    None,
                    MsFlags::MS_BIND,
                    None,
                )?;
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
        let host = format!("/dev/{name}");
        mount_or(
            "a device node",
            Some(&host),
            &node,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    mkdir(&dev.join("pts"))?;
    mount_or(
        "/dev/pts",
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    let home = root.join("home/agent");
    mkdir(&home)?;
    let agent_home = config.agent.home.to_string_lossy();
    mount_or(
        "the agent's home",
        Some(&agent_home),
        &home,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    let resolv_str = resolv.to_string_lossy();
    mount_or(
        "/etc/resolv.conf",
        Some(&resolv_str),
        &root.join("etc/resolv.conf"),
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    if let Some(extra) = &config.extra_ca {
        let bundle = write_bundle(&config.run_dir, extra)?;
        let bundle = bundle.to_string_lossy();
        let target = root.join(CA_BUNDLE.trim_start_matches('/'));
        mount_or(
            "the trust store",
            Some(&bundle),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    nix::unistd::chdir(&root).map_err(|source| InitError::Mount {
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
    })?;
    mount_or(
        "/proc",
        Some("proc"),
        Path::new("/proc"),
        Some("proc"),
        nosuid | MsFlags::MS_NOEXEC,
        None,
    )?;
    // The workspace's own sysfs (its network namespace's devices, not the host's) and its
    // own cgroup tree, both read-only for everything inside.
    let ro = nosuid | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    mount_or(
        "/sys",
        Some("sysfs"),
        Path::new("/sys"),
        Some("sysfs"),
        ro,
        None,
    )?;
    mount_or(
        "/sys/fs/cgroup",
        Some("cgroup2"),
        Path::new("/sys/fs/cgroup"),
        Some("cgroup2"),
        ro,
        None,
    )
}

/// PID 1 of the workspace.
fn init(config: &WorkspaceConfig, resolv: &Path) -> Result<i32, InitError> {
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
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| InitError::Mount {
        what: "the run directory",
        source,
    })?;
    // The TUN device is opened while the host's /dev is still in view.
    let tun = moat_netstack::setup_tun().map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied if e.raw_os_error() == Some(libc::EACCES) => {
            InitError::TunAccess(e)
        }
        _ => InitError::Network(e),
    })?;
    enter_root(config, resolv)?;
    // Nobody else in the workspace may open our descriptors through /proc/1/fd.
    let _ = nix::sys::prctl::set_dumpable(false);
    // The host's sockets, through the kept handle on the run directory.
    let host_dir =
        Path::new("/proc/self/fd").join(std::os::fd::AsRawFd::as_raw_fd(&run_dir).to_string());
    let flow_socket = host_dir.join(config.flow_socket.file_name().unwrap_or_default());
    let reporter = crate::report::Reporter::new(
        config
            .audit_socket
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or(crate::report::Sink::None, |name| {
                crate::report::Sink::Unix(host_dir.join(name))
            }),
    );
    let _ = sethostname(&config.hostname);

    let transport = moat_netstack::UnixTransport { path: flow_socket };
    std::thread::Builder::new()
        .name("netstack".into())
        .spawn(move || {
            if let Err(e) =
                moat_netstack::run(tun, Box::new(transport), moat_netstack::Limits::default())
            {
                eprintln!("moat guest-init: netstack stopped: {e}");
            }
        })
        .map_err(InitError::Network)?;

    let mut agent = config.agent.clone();
    agent.home = AGENT_HOME.into();
    agent.env.extend(ca_env());
    let sandbox = moat_guest_sandbox::agent_config(&agent.home);
    let status = run_agent(&agent, &sandbox, None, &reporter).map_err(InitError::Agent)?;
    Ok(exit_code(status))
}
