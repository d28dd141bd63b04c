//! Another process in a running namespace workspace, confined exactly like its agent: the
//! namespace backend's `exec` (`moat __exec`, which `containerd-shim-moat-v2` runs for
//! `ctr task exec` and the CRI's ExecSync).
//!
//! The process joins the namespaces of the workspace's PID 1 (network, IPC, UTS, cgroup, PID,
//! mount, and last its user namespace, where it takes the workspace's root), then starts the
//! command confined by `moat-guest-sandbox` with the agent's configuration: its own mount,
//! IPC and UTS namespaces, everything but the home, /tmp and /dev/shm read-only, no
//! capabilities, no_new_privs, Landlock and seccomp. It sees what the agent sees and reaches
//! the network only through the workspace's netstack, so only through the egress proxy.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::launch::{AgentSpec, close_on_exec_above_stderr, exit_code};
pub use crate::rootfs::AGENT_HOME;
use crate::rootfs::ca_env;

/// Why a process could not enter a workspace.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// No process under the given one is a workspace's PID 1.
    #[error("no workspace runs under process {0} (no descendant is PID 1 of its namespace)")]
    NoWorkspace(u32),
    /// A namespace of PID 1 could not be opened.
    #[error("cannot open the workspace's {0} namespace")]
    Open(&'static str, #[source] nix::Error),
    /// A namespace of PID 1 could not be joined.
    #[error("cannot join the workspace's {0} namespace")]
    Join(&'static str, #[source] nix::Error),
    /// The workspace's root ids could not be taken.
    #[error("cannot take the workspace's root ids")]
    Ids(#[source] nix::Error),
    /// The sandbox could not be prepared.
    #[error("cannot prepare the sandbox: {0}")]
    Sandbox(String),
    /// The command could not be started or waited for.
    #[error("cannot run the command in the workspace")]
    Spawn(#[source] std::io::Error),
}

/// The workspace's PID 1 among the descendants of `ancestor` (the `moat run` process), once
/// the workspace is up: the process whose innermost PID (`NSpid`) is 1 in a PID namespace
/// below the host's, and which has started the agent (its root and mounts are then final).
/// Waits while the workspace is still starting and `ancestor` lives, at most `wait`.
pub fn wait_for_init(ancestor: u32, wait: std::time::Duration) -> Result<u32, EnterError> {
    let start = std::time::Instant::now();
    loop {
        match find_init(ancestor) {
            Ok(init) if !children(init).is_empty() => return Ok(init),
            _ if start.elapsed() < wait && Path::new(&format!("/proc/{ancestor}")).exists() => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(_) | Err(_) => return Err(EnterError::NoWorkspace(ancestor)),
        }
    }
}

/// The workspace's PID 1 among the descendants of `ancestor`, started or not.
fn find_init(ancestor: u32) -> Result<u32, EnterError> {
    let mut frontier = vec![ancestor];
    let mut seen = 0usize;
    while let Some(pid) = frontier.pop() {
        // A bound, whatever /proc says: a workspace is a handful of host processes deep.
        seen += 1;
        if seen > 4096 {
            break;
        }
        if pid != ancestor && is_namespace_init(pid) {
            return Ok(pid);
        }
        frontier.extend(children(pid));
    }
    Err(EnterError::NoWorkspace(ancestor))
}

/// Whether `pid` is PID 1 of a PID namespace nested in ours.
fn is_namespace_init(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|ids| {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            ids.len() > 1 && ids.last() == Some(&"1")
        })
        .unwrap_or(false)
}

/// The children of `pid`, from every process's parent in /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // After the command's closing parenthesis: state, then the parent.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The namespaces joined, in order; the user namespace is joined after those the caller can
/// already join (run by the host's root: the network namespace is the host user namespace's)
/// and before the others.
const NAMESPACES: [(&str, CloneFlags); 6] = [
    ("net", CloneFlags::CLONE_NEWNET),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

fn open_ns(init: u32, name: &'static str) -> Result<OwnedFd, EnterError> {
    open(
        Path::new(&format!("/proc/{init}/ns/{name}")),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| EnterError::Open(name, e))
}

/// Runs `spec` in the workspace whose PID 1 is `init` (host pid), confined like its agent,
/// and returns its exit code. Must be called while the process is single-threaded (joining a
/// user namespace requires it). Standard streams are the caller's.
pub fn exec_in(init: u32, spec: &AgentSpec) -> Result<i32, EnterError> {
    // Every handle first, while /proc/<init> is the host's /proc.
    let user = open_ns(init, "user")?;
    let others = NAMESPACES
        .iter()
        .map(|(name, flag)| Ok((*name, *flag, open_ns(init, name)?)))
        .collect::<Result<Vec<_>, EnterError>>()?;
    if Uid::effective().is_root() {
        // The workspace's root holds no supplementary group of the host's root.
        nix::unistd::setgroups(&[]).map_err(EnterError::Ids)?;
    }
    // Those owned by a user namespace the caller has no power in wait until it is joined.
    let mut later = Vec::new();
    for (name, flag, fd) in others {
        if setns(&fd, flag).is_err() {
            later.push((name, flag, fd));
        }
    }
    setns(&user, CloneFlags::CLONE_NEWUSER).map_err(|e| EnterError::Join("user", e))?;
    for (name, flag, fd) in later {
        setns(&fd, flag).map_err(|e| EnterError::Join(name, e))?;
    }
    // The workspace's root: its uid and gid 0 (a host id of the workspaces' range).
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(EnterError::Ids)?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(EnterError::Ids)?;
    // Joining the mount namespace left the working directory on the old root.
    std::env::set_current_dir("/").map_err(EnterError::Spawn)?;

    let home = Path::new(AGENT_HOME);
    let mut config = moat_guest_sandbox::agent_config(home);
    // The workspace's services' files and devices are hidden from the agent: from a process
    // joined to it too (checked here, in the workspace's mount namespace).
    if Path::new(crate::service::SERVICES_DIR).exists() {
        config.hidden.push(crate::service::SERVICES_DIR.into());
    }
    let sandbox = moat_guest_sandbox::Sandbox::new(&config)
        .map_err(|e| EnterError::Sandbox(e.to_string()))?;
    let argv = if spec.command.is_empty() {
        vec!["/bin/sh".to_owned()]
    } else {
        spec.command.clone()
    };
    let workdir = spec.workdir.clone().unwrap_or_else(|| home.to_owned());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("HOME", home)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MOAT_WORKSPACE", "1")
        .envs(spec.env.iter().cloned())
        .envs(ca_env())
        .current_dir(&workdir);
    let dir = std::ffi::CString::new(workdir.as_os_str().as_encoded_bytes())
        .map_err(|e| EnterError::Spawn(std::io::Error::other(e)))?;
    // SAFETY: the closure runs in the forked child before exec; this process is
    // single-threaded (the caller's contract), and the closure only issues system calls:
    // `Sandbox::apply` makes no allocation (a test in moat-guest-sandbox proves it).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            close_on_exec_above_stderr()?;
            // Ends with the `__exec` process that waits for it (the shim's kill of the exec).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A session of its own, like the agent: no signal to the group reaches past it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if sandbox.apply().is_err() {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            if libc::chdir(dir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = cmd.status().map_err(EnterError::Spawn)?;
    Ok(exit_code(status))
}
