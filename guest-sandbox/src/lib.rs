//! moat-guest-sandbox: confines the one agent process of a workspace.
//!
//! # Its hop in the data path
//!
//! ```text
//! agent process (confined here) -> guest kernel TCP -> TUN -> netstack -> vsock -> host proxy
//! ```
//!
//! guest-init forks the agent's process and, in the child, right before `execve`, applies a
//! [`Sandbox`]. Whatever the agent then runs inherits the confinement: it can read and execute
//! the (read-only) root, write only its home and `/tmp`, open TCP/UDP sockets (which can only
//! reach the TUN, hence the host egress proxy), and cannot open AF_VSOCK, packet or raw sockets,
//! trace other processes, change mounts or namespaces, or load kernel code.
//!
//! # Order of the steps, and why
//!
//! 1. **rlimits**, lowered only (never raised), soft and hard alike; done first while nothing
//!    else can interfere.
//!
//!    Then (step 1a), if the config gives one, **a nested user namespace**
//!    ([`SandboxConfig::user_namespace`], made beforehand by [`UserNamespace::create`]): the
//!    caller's ids appear there as chosen ones (a non-root uid for a program that must not run
//!    as root); the process holds every capability of that namespace until steps 3 and 5 drop
//!    them. See the `userns` module.
//! 2. **namespaces and read-only mounts** ([`Isolation`]): own mount, IPC and UTS namespaces;
//!    every mount read-only and nosuid except the writable paths; the hidden paths
//!    ([`SandboxConfig::hidden`]) covered by an empty read-only tmpfs. Needs `CAP_SYS_ADMIN`, so
//!    it comes before any capability is dropped.
//! 3. **capability bounding set emptied and securebits locked**, while `CAP_SETPCAP` is still
//!    held: both need it, and the id change of step 4 drops it, so this comes first.
//! 4. **supplementary groups cleared, gid, then uid** changed, if the config asks (gid first:
//!    after the uid change there is no right left to change it). Checked afterwards, including
//!    that uid 0 cannot be regained.
//! 5. **every remaining capability dropped**: ambient, inheritable, permitted, effective;
//!    checked with `capget`.
//! 6. **`PR_SET_NO_NEW_PRIVS`**: no later `execve` of a setuid or file-capability binary grants
//!    anything; Landlock and seccomp also require it of an unprivileged thread.
//! 7. **Landlock** at the best ABI the kernel has (capped at [`NEWEST_VETTED_ABI`]): writable,
//!    readable and device paths, plus signal and abstract-Unix-socket scoping from ABI 6. The
//!    report says which ABI and whether it was fully enforced. Network rights are not
//!    restricted with Landlock; the reason is in the `filesystem` module.
//! 8. **seccomp last**, so that the earlier steps may use the calls it refuses (`unshare`,
//!    `mount`, `mount_setattr`), and so that nothing after it runs but `execve`.
//!
//! Any failure is an error; the caller must then not start the agent.
//!
//! # The seccomp rule table
//!
//! [`deny_rules`] returns the table: system call, argument conditions, errno, one-line
//! reason. The policy is a deny list on purpose (the reasoning is in the `seccomp` module): the
//! agent is arbitrary software. A hand-written prefix kills non-native architectures, refuses
//! the x32 ABI, and answers `clone3` with `ENOSYS` so that libc falls back to `clone`, whose
//! namespace flags the table checks.
//!
//! # What the caller must do
//!
//! - Build the [`Sandbox`] in the parent ([`Sandbox::new`] opens the paths, creates the
//!   Landlock ruleset and compiles the filter; it allocates), then call [`Sandbox::apply`] in
//!   the child after `fork` and immediately `execve` the agent. `apply` does not allocate on its
//!   success path, so it may run in a `pre_exec` hook of a multi-threaded parent.
//! - Call `apply` on the thread that will `execve`: capabilities, Landlock and seccomp are
//!   per-thread. After `fork` the child has a single thread, which is what this expects.
//! - Close every file descriptor the agent must not inherit (mark them `O_CLOEXEC`): Landlock
//!   checks paths at `open`, not descriptors that are already open.
//! - Create the agent's process in a new PID namespace (`clone` flags; a PID namespace only
//!   applies to children, so this crate cannot enter one for the calling process). Mount, IPC
//!   and UTS namespaces are entered here (step 2); the agent can then create or join none.
//! - With `uid_gid`, the target ids must be mapped in the caller's user namespace (namespace
//!   backend), or step 4 fails.
//!
//! ```no_run
//! use std::os::unix::process::CommandExt as _;
//! use std::path::Path;
//! use std::process::Command;
//!
//! use moat_guest_sandbox::{Sandbox, agent_config};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = agent_config(Path::new("/home/agent"));
//! cfg.uid_gid = Some((1000, 1000));
//! // In the parent: opens the paths, creates the Landlock ruleset, compiles the filter.
//! let sandbox = Sandbox::new(&cfg)?;
//! let mut agent = Command::new("/bin/sh");
//! // SAFETY: runs in the forked child; on its success path `apply` only makes system calls
//! // and does not allocate. On failure the child exits and the agent never starts.
//! unsafe {
//!     agent.pre_exec(move || sandbox.apply().map(drop).map_err(std::io::Error::other));
//! }
//! let status = agent.status()?;
//! # let _ = status;
//! # Ok(())
//! # }
//! ```
//!
//! The [`Report`] is produced in the child; a caller that wants to log it writes it to a pipe
//! before `execve`, or confines a probe child the same way first.
//!
//! # What is not covered
//!
//! - The PID namespace (see above).
//! - `ptrace` is refused, so debuggers and `strace` do not work inside; `io_uring` is
//!   refused: libuv (node) falls back to its thread pool on `EPERM`, programs built only on
//!   io_uring fail.
//! - Pathname Unix sockets under readable paths can be connected to below Landlock ABI 9
//!   (Linux 7.1); above it, they are refused outside the writable paths.
//! - Landlock (up to ABI 7 at least) does not restrict `chmod`, `chown`, `utimes` or extended
//!   attributes: outside the writable paths the read-only mounts (step 2) refuse them, and
//!   the unprivileged uid does through file ownership. Without either (an agent left at uid 0
//!   with [`Isolation::none`]) they are open.
//! - Landlock does not restrict TCP destinations (that is the egress proxy's job), nor
//!   `ioctl` on non-device files, nor reading `/proc` of processes the agent already may see.
//! - A deny list cannot know about system calls added to kernels after it was written; new
//!   kernel interfaces are allowed until they are added to the table.
//! - Programs that need user namespaces (Chromium's sandbox, rootless containers, bubblewrap)
//!   do not work inside; Chromium needs `--no-sandbox` there.

mod error;
mod filesystem;
mod namespaces;
mod privileges;
mod rlimits;
mod seccomp;
mod sys;
mod userns;

use std::path::{Path, PathBuf};

pub use error::SandboxError;
pub use filesystem::{Enforcement, LandlockReport, NEWEST_VETTED_ABI};
pub use namespaces::Isolation;
pub use privileges::drop_capabilities;
pub use rlimits::Rlimits;
pub use seccomp::{ArgCheck, Cmp, DenyRule, deny_rules};
pub use userns::UserNamespace;

/// What to confine the agent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Read, write and execute beneath these (the agent's home, `/tmp`).
    pub writable: Vec<PathBuf>,
    /// Read and execute only beneath these (typically `/`).
    pub readable: Vec<PathBuf>,
    /// Device files or directories the agent may read, write and `ioctl` (`/dev/null`,
    /// `/dev/tty`, `/dev/pts`). Paths that do not exist are skipped.
    pub devices: Vec<PathBuf>,
    /// Paths hidden from the agent: in its own mount namespace each gets an empty, read-only
    /// tmpfs mounted over it (needs `isolation.read_only_mounts`). guest-init hides the
    /// workspace services' directories (their models, devices and temporary files) this way:
    /// they exist only in the services' mount views.
    pub hidden: Vec<PathBuf>,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// The agent's own mount (read-only), IPC and UTS namespaces. Needs `CAP_SYS_ADMIN` (in
    /// the caller's user namespace).
    pub isolation: Isolation,
    /// Drop to this (uid, gid) with no supplementary groups. Must not be uid 0. Strongly
    /// recommended: an agent left at uid 0 without capabilities still owns root's files.
    pub uid_gid: Option<(u32, u32)>,
    /// First enter this nested user namespace, in which the caller's ids appear as other
    /// ones: for a program that must not see itself as root where the caller's user namespace
    /// maps no other id to drop to (the namespace backend). Exclusive with `uid_gid`.
    pub user_namespace: Option<UserNamespace>,
    /// Refuse to confine on a kernel whose Landlock ABI is older than this. The default, 3,
    /// is the first ABI that controls truncation.
    pub min_landlock_abi: u32,
}

impl SandboxConfig {
    /// A configuration with the given writable and readable paths, the default device list,
    /// default rlimits, full isolation, no id change and Landlock ABI 3 at least.
    pub fn new(writable: Vec<PathBuf>, readable: Vec<PathBuf>) -> Self {
        Self {
            writable,
            readable,
            devices: Self::default_devices(),
            hidden: Vec::new(),
            rlimits: Rlimits::default(),
            isolation: Isolation::full(),
            uid_gid: None,
            user_namespace: None,
            min_landlock_abi: 3,
        }
    }

    /// The device paths a shell and the usual tools need.
    pub fn default_devices() -> Vec<PathBuf> {
        [
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
            "/dev/tty",
            "/dev/ptmx",
            "/dev/pts",
        ]
        .into_iter()
        .map(PathBuf::from)
        .collect()
    }
}

/// What [`Sandbox::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// How many resource limits were set.
    pub rlimits_set: u32,
    /// Whether new namespaces were entered (and, if configured, the mounts made read-only).
    pub isolated: bool,
    /// The real, effective and saved uid afterwards.
    pub uid: u32,
    /// The real, effective and saved gid afterwards.
    pub gid: u32,
    /// Whether the ids were changed (false if none were asked, or they already matched).
    pub ids_changed: bool,
    /// Whether the capability bounding set is empty.
    pub bounding_set_cleared: bool,
    /// Whether the securebits were set and locked (needs `CAP_SETPCAP` at the start).
    pub securebits_locked: bool,
    /// What Landlock enforced.
    pub landlock: LandlockReport,
    /// How many rows of the seccomp table are installed (the arch prefix not counted).
    pub seccomp_rules: u32,
}

/// A confinement ready to apply: built from a [`SandboxConfig`] before `fork`.
#[derive(Debug)]
pub struct Sandbox {
    limits: [Option<rlimits::Limit>; 8],
    user_namespace: Option<UserNamespace>,
    isolation: namespaces::Prepared,
    uid_gid: Option<(u32, u32)>,
    landlock: filesystem::Prepared,
    seccomp: seccompiler::BpfProgram,
    seccomp_rules: u32,
}

fn check_absolute(paths: &[PathBuf]) -> Result<(), SandboxError> {
    if paths.iter().all(|p| p.is_absolute()) {
        Ok(())
    } else {
        Err(SandboxError::InvalidConfig(
            "sandbox paths must be absolute",
        ))
    }
}

impl Sandbox {
    /// Validates the configuration, opens its paths, builds the Landlock ruleset and compiles
    /// the seccomp filter. Call it in the parent, before `fork`.
    pub fn new(cfg: &SandboxConfig) -> Result<Self, SandboxError> {
        check_absolute(&cfg.writable)?;
        check_absolute(&cfg.readable)?;
        check_absolute(&cfg.devices)?;
        check_absolute(&cfg.hidden)?;
        if !cfg.hidden.is_empty() && !cfg.isolation.read_only_mounts {
            return Err(SandboxError::InvalidConfig(
                "hidden paths need a mount namespace of the agent's own",
            ));
        }
        if matches!(cfg.uid_gid, Some((0, _))) {
            return Err(SandboxError::InvalidConfig("the agent's uid must not be 0"));
        }
        if cfg.user_namespace.is_some() && cfg.uid_gid.is_some() {
            return Err(SandboxError::InvalidConfig(
                "user_namespace and uid_gid exclude each other",
            ));
        }
        let landlock = filesystem::prepare(
            &cfg.writable,
            &cfg.readable,
            &cfg.devices,
            cfg.min_landlock_abi,
        )?;
        let seccomp = seccomp::compile()?;
        Ok(Self {
            limits: cfg.rlimits.resolve(),
            user_namespace: cfg.user_namespace.clone(),
            isolation: namespaces::prepare(&cfg.isolation, &cfg.writable, &cfg.hidden)?,
            uid_gid: cfg.uid_gid,
            landlock,
            seccomp,
            seccomp_rules: u32::try_from(deny_rules().count()).unwrap_or(u32::MAX),
        })
    }

    /// Device paths of the configuration that do not exist and so got no Landlock rule.
    pub fn missing_devices(&self) -> &[PathBuf] {
        &self.landlock.missing_devices
    }

    /// Confines the calling thread, in the order documented at the crate level. Call it in
    /// the child after `fork`, then `execve` the agent. On error the thread may be partly
    /// confined; the caller must not start the agent.
    pub fn apply(&self) -> Result<Report, SandboxError> {
        let rlimits_set = rlimits::apply(&self.limits)?;
        if let Some(userns) = &self.user_namespace {
            userns.enter()?;
        }
        let isolated = self.isolation.apply()?;
        let bounding = privileges::drop_bounding_set()?;
        let ids_changed = match self.uid_gid {
            Some((uid, gid)) => privileges::drop_identity(uid, gid)?,
            None => false,
        };
        privileges::drop_capabilities()?;
        sys::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
        if !sys::no_new_privs().map_err(SandboxError::NoNewPrivs)? {
            return Err(SandboxError::NoNewPrivs(std::io::Error::from_raw_os_error(
                libc::EPERM,
            )));
        }
        let landlock = self.landlock.enforce()?;
        seccomp::install(&self.seccomp)?;
        let (uid, _, _) = sys::uids().map_err(|e| SandboxError::Identity("getresuid", e))?;
        let (gid, _, _) = sys::gids().map_err(|e| SandboxError::Identity("getresgid", e))?;
        Ok(Report {
            rlimits_set,
            isolated,
            uid,
            gid,
            ids_changed,
            bounding_set_cleared: bounding.bounding_set_cleared,
            securebits_locked: bounding.securebits_locked,
            landlock,
            seccomp_rules: self.seccomp_rules,
        })
    }
}

/// Builds a [`Sandbox`] from `cfg` and applies it to the calling thread. Convenient in a
/// single-threaded child; a multi-threaded parent should call [`Sandbox::new`] before `fork`
/// and [`Sandbox::apply`] after it.
pub fn confine(cfg: &SandboxConfig) -> Result<Report, SandboxError> {
    Sandbox::new(cfg)?.apply()
}

/// Makes the mount at `path` and every mount beneath it read-only, nosuid and nodev
/// (mount_setattr with AT_RECURSIVE, Linux 5.12+; a plain `MS_REMOUNT|MS_RDONLY` would leave
/// submounts writable). guest-init uses it for the workspace's root.
pub fn make_tree_read_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    sys::set_mount_attrs_recursive(
        &c_path,
        sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        0,
    )
}

/// Makes the mount at `path` and every mount beneath it nosuid and nodev, leaving every other
/// attribute as it is (a `MS_REMOUNT|MS_BIND` would have to restate the locked ones). guest-init
/// uses it for the agent's home, the one host directory the workspace gets writable.
pub fn make_tree_nosuid(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    sys::set_mount_attrs_recursive(&c_path, sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV, 0)
}

/// The default configuration for an agent: `home`, `/tmp` and (where it exists) `/dev/shm`
/// writable, `/` readable. `/dev/shm` holds POSIX shared memory and semaphores (Python's
/// multiprocessing, Chromium).
pub fn agent_config(home: &Path) -> SandboxConfig {
    let mut writable = vec![home.to_path_buf(), PathBuf::from("/tmp")];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        writable.push(shm.to_path_buf());
    }
    SandboxConfig::new(writable, vec![PathBuf::from("/")])
}
