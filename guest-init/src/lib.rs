//! moat-guest-init: PID 1 of a workspace, in the VM and in the namespace backend.
//!
//! Hop in the data path: it brings up the workspace's only network interface (a TUN device)
//! and runs the netstack that turns every TCP connection into a flow stream to the host; then
//! it launches the agent, confined, and reaps it.
//!
//! How a workspace starts, step by step, in either backend is told once, in ARCHITECTURE.md
//! ("Starting a workspace"); the modules, by where they act:
//!
//! - `namespace` ([`run_namespace`]): the namespace backend: namespaces, the uid/gid maps,
//!   the read-only root and pivot_root, the workspace's accounts, with [`ids`] (the host uid
//!   leased to a workspace started by root).
//! - [`vm`]: PID 1 of the VM (the `moat-guest-init` binary): disks, switch root, vsock; with
//!   [`control`] (the workspace read from the host at boot) and `link` (the control stream
//!   while the agent runs: reattached after a snapshot, the workspace stopped if its host is
//!   gone).
//! - `rootfs`: what both backends mount in the workspace's root (tmpfs, the trust store,
//!   resolv.conf, devpts, proc, sysfs, cgroup2), in steps each calls in its own order; its
//!   docs say what each backend does differently, and why.
//! - `launch`: the agent started, confined by `moat-guest-sandbox` between fork and exec,
//!   and reaped; `signals`: what the waiting processes pass on; `report`: process events
//!   to the host.
//! - [`enter`]: another process in a running namespace workspace, confined like its agent
//!   (`moat __exec`, the containerd shim's exec).
//! - [`service`]: workspace services (a local model server, say): started before the agent
//!   and stopped after it, each as a uid of its own in pid and mount namespaces of its own,
//!   confined with Landlock rules of its own, its files and devices out of the agent's view.
//! - [`session`]: SSH sessions through the broker, one confined `sshd -i` per `CONNECT 22`.
//! - [`program`]: which program opened a connection (the socket table and `/proc`), asked by
//!   the netstack at each SYN and named in the flow header when the host reads version 2.
//!
//! Invariants: never panics on bad input; if the network or the sandbox cannot be set up, the
//! agent is not started.

pub mod control;
pub mod enter;
pub mod ids;
mod launch;
mod link;
mod namespace;
pub mod program;
mod report;
mod rootfs;
pub mod service;
pub mod session;
mod signals;
pub mod vm;

use std::path::PathBuf;

pub use launch::{AgentSpec, exit_code};
pub use moat_netstack::LocalRoute;
pub use namespace::{MASKED, run_namespace};
pub use rootfs::REPLACED;
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
    /// A restored VM could not reseed its RNG from the host: it must not go on with the
    /// random state every other restore of its snapshot shares.
    #[error("cannot reseed the RNG after a restore")]
    Reseed(#[source] std::io::Error),
    /// The guest's wall clock could not be set to the host's.
    #[error("cannot set the clock to the host's")]
    Clock(#[source] nix::Error),
    /// The agent's home cannot be used (missing, or, when moat runs as root, not owned by the
    /// workspace's host id).
    #[error("cannot use {} as the agent's home", .0.display())]
    Home(PathBuf, #[source] std::io::Error),
    /// The SSH session service could not be set up.
    #[error("cannot set up SSH sessions")]
    Session(#[from] session::SessionError),
    /// A workspace service is refused or could not start.
    #[error("cannot start the workspace's services")]
    Service(#[from] service::ServiceError),
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
    /// The workspace's services, started before the agent ([`service`]).
    pub services: Vec<service::ServiceSpec>,
    /// Run by root: each service's own host uid and gid, in the order of `services`, leased
    /// by `moat run` like `host_id` ([`ids`]). Services need them: a service's uid must differ
    /// from the agent's on the host too.
    pub service_host_ids: Vec<u32>,
    /// Names the netstack answers with a workspace service instead of sending them to the
    /// host: the signed policy's `[[local_routes]]`, resolved by `moat run` to the services'
    /// ports.
    pub local_routes: Vec<moat_netstack::LocalRoute>,
    /// SSH sessions through the trusted access broker, if the workspace takes them.
    pub ssh: Option<SshSetup>,
    /// The highest flow header version the host's egress proxy reads: from 2, each flow's
    /// header names the program that opened it ([`program`]).
    pub flow_header_version: u8,
}

/// Starts the netstack thread on `tun`, its flows going through `transport`; with the program
/// of each connection looked up and sent when the host reads flow header version 2 or later
/// (`host_reads`, told by the host at start), not otherwise; the names of `local` answered
/// inside the workspace.
fn start_netstack(
    tun: moat_netstack::Tun,
    transport: Box<dyn moat_netstack::FlowTransport>,
    host_reads: u8,
    local: moat_netstack::LocalRoutes,
) -> std::io::Result<()> {
    let programs = (host_reads.min(moat_flow_header::MAX_VERSION) >= moat_flow_header::VERSION_2)
        .then(|| {
            Box::new(program::ProcPrograms::default()) as Box<dyn moat_netstack::ProgramLookup>
        });
    std::thread::Builder::new()
        .name("netstack".into())
        .spawn(move || {
            if let Err(e) = moat_netstack::run(
                tun,
                transport,
                moat_netstack::Limits::default(),
                programs,
                local,
            ) {
                eprintln!("moat guest-init: netstack stopped: {e}");
            }
        })?;
    Ok(())
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
