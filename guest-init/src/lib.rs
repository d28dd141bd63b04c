//! moat-guest-init: PID 1 of a workspace, in the VM and in the namespace backend.
//!
//! Hop in the data path: it brings up the workspace's only network interface (a TUN device)
//! and runs the netstack that turns every TCP connection into a flow stream to the host; then
//! it launches the agent, confined, and reaps it.
//!
//! The VM backend's sequence is in [`vm`] (PID 1 of the kernel, started from the initramfs as
//! the `moat-guest-init` binary); the namespace backend's:
//!
//! Namespace backend sequence ([`run_namespace`]):
//! 1. `unshare` user, mount, pid, net, ipc, uts and cgroup namespaces; map the caller's uid/gid to root
//!    inside (so the host user needs no privilege). Run by the host's root, root inside is
//!    instead an unprivileged host uid/gid of the workspace's own, leased by `moat run`
//!    ([`ids`]), never host uid 0: the process first drops its supplementary groups, creates
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
//! Invariants: never panics on bad input; if the network or the sandbox cannot be set up, the
//! agent is not started.

pub mod control;
pub mod ids;
mod launch;
mod namespace;
mod report;
pub mod session;
mod signals;
pub mod vm;

use std::path::PathBuf;

pub use launch::{AgentSpec, exit_code};
pub use namespace::{MASKED, REPLACED, run_namespace};
pub use vm::run_vm;

/// Why a workspace could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A namespace could not be created or entered.
    #[error("cannot create the workspace namespaces")]
    Unshare(#[source] nix::Error),
    /// The uid/gid maps could not be written.
    #[error("cannot map the user into the workspace")]
    IdMap(#[source] std::io::Error),
    /// fork failed.
    #[error("cannot fork the workspace init")]
    Fork(#[source] nix::Error),
    /// A mount failed.
    #[error("cannot mount {what}")]
    Mount {
        /// What was being mounted.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// /dev/net/tun could not be opened.
    #[error(
        "cannot open /dev/net/tun: this user needs read and write access to it (most \
         distributions ship it as mode 0666; here it may be root-only)"
    )]
    TunAccess(#[source] std::io::Error),
    /// The TUN device could not be set up.
    #[error("cannot set up the workspace network")]
    Network(#[source] std::io::Error),
    /// The agent could not be started (including a sandbox that could not be applied).
    #[error("cannot start the agent")]
    Agent(#[source] std::io::Error),
    /// The VM's control stream to the host failed (vsock port 1027).
    #[error("cannot get the workspace from the host (vsock control stream)")]
    Control(#[source] std::io::Error),
    /// The agent's home cannot be used (missing, or, when moat runs as root, not owned by the
    /// workspace's host id).
    #[error("cannot use {} as the agent's home", .0.display())]
    Home(PathBuf, #[source] std::io::Error),
    /// The SSH session service could not be set up.
    #[error("cannot set up SSH sessions")]
    Session(#[from] session::SessionError),
    /// A file the workspace needs could not be written.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
}

/// What the workspace runs and how it reaches the host.
#[derive(Debug, Clone)]
pub struct WorkspaceConfig {
    /// The egress proxy's flow socket (`<uds>_1025`), in `run_dir`.
    pub flow_socket: PathBuf,
    /// The host's socket for process events (`<uds>_1026`), in `run_dir`, if any.
    pub audit_socket: Option<PathBuf>,
    /// A directory for the workspace's own files (flow socket, resolv.conf, the new root's
    /// mount point), on the host and outside the agent's view. Run by root, its ancestors must
    /// be searchable by the workspace's host id (the temp directory is): PID 1 reaches it by
    /// path.
    pub run_dir: PathBuf,
    /// The workspace's root file system.
    pub root: RootFs,
    /// Run by root: the unprivileged host uid and gid the workspace's root is, leased by
    /// `moat run` for this workspace alone ([`ids`]). Ignored otherwise (the caller's own ids).
    pub host_id: Option<u32>,
    /// The workspace hostname.
    pub hostname: String,
    /// Extra CA certificates (PEM) the workspace trusts, added to the system trust store.
    pub extra_ca: Option<PathBuf>,
    /// The agent.
    pub agent: AgentSpec,
    /// SSH sessions through the trusted access broker, if the workspace takes them.
    pub ssh: Option<SshSetup>,
}

/// The namespace backend's workspace root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFs {
    /// A directory holding a root file system (the Debian root image `cargo xtask images`
    /// builds, the one the VM boots, or `moat run --rootfs DIR`): bound read-only, nosuid and
    /// nodev. Nothing of the host's is in it.
    Image(PathBuf),
    /// The host's own root, read-only, minus [`MASKED`] (`moat run --host-root`): the agent
    /// reads whatever the workspace's uid may read on the host.
    Host,
}

/// The namespace backend's SSH session service ([`session`]).
#[derive(Debug, Clone)]
pub struct SshSetup {
    /// What sshd needs.
    pub service: session::SshService,
    /// The workspace's vsock-convention Unix socket (`<uds>`), where the host side connects
    /// with `CONNECT 22`. Bound before the workspace starts, by the host's user.
    pub listen: PathBuf,
    /// sshd's log on the host, if any (opened before the workspace starts).
    pub log: Option<PathBuf>,
}
