//! Workspace services: processes PID 1 starts before the agent and stops after it, beside the
//! agent and out of its reach (a local model server, say).
//!
//! Each service ([`ServiceSpec`]) runs:
//!
//! - as a uid of its own inside the workspace ([`service_uid`]: 900 and up; in the namespace
//!   backend, run by root, also a host uid of its own, leased like the workspace's and mapped
//!   beside it), never the agent's;
//! - in a pid namespace of its own (it sees only itself) and a mount namespace of its own,
//!   cloned from PID 1's; a small init of ours is PID 1 there (it passes SIGTERM on, reaps,
//!   and exits with the service's status), and the service is its only child;
//! - confined by moat-guest-sandbox exactly like the agent (rlimits, read-only mounts, no
//!   capability, no_new_privs, seccomp) but with Landlock rules of its own: its temporary
//!   directory writable, its devices usable, the root readable; the workspace's `/tmp` and
//!   `/home` (the agent's) hidden;
//! - with its files under `/run/moat-services/<name>/` ([`SERVICES_DIR`]): `models/` (the host
//!   directory the spec names, read-only), `dev/` (its device nodes beside null, zero, full,
//!   random and urandom: its `/dev`), `tmp/` (its `TMPDIR` and `HOME`, its uid's alone). The
//!   agent's sandbox hides the whole of `/run/moat-services` under an empty tmpfs, so none of
//!   it is in the agent's view (moat-guest-sandbox's `hidden`).
//!
//! The agent reaches a service only through the loopback port it listens on (the workspace's
//! network namespace is shared), and through a name the signed policy routes to it
//! (`[[local_routes]]`, answered by the netstack). Its start and end are process records in
//! the audit log, marked with its name; it is restarted up to [`MAX_RESTARTS`] times if its
//! spec asks, else reported. After the agent exits, each service gets SIGTERM, then SIGKILL
//! after [`STOP_GRACE`].

use std::ffi::{CString, c_char};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::InitError;
use crate::report::Reporter;
use crate::rootfs::{self, mkdir, mount_or};

/// Where each service's files are, in every view of the workspace that has them (none of
/// the agent's).
pub const SERVICES_DIR: &str = "/run/moat-services";
/// The uid (and gid) of the first service inside the workspace; the next ones follow.
pub const FIRST_SERVICE_UID: u32 = 900;
/// How many services one workspace may declare.
pub const MAX_SERVICES: usize = 8;
/// The longest service name.
pub const MAX_NAME_LEN: usize = 32;
/// How often a service whose spec asks for it is started again after it exits.
pub const MAX_RESTARTS: u32 = 3;
/// How long a service with a port has to accept a connection there before the agent starts
/// anyway (and a warning says so).
pub const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a service has to exit after SIGTERM once the agent is gone.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// The devices of the service's `/dev` besides its own.
const STANDARD_DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// One service, as the workspace spec declares it (`moat run --service` or `--services FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Its name: 1 to [`MAX_NAME_LEN`] of a-z, 0-9 and `-`, starting with a letter.
    pub name: String,
    /// argv; the program is looked up in the workspace's PATH unless it holds a `/`.
    pub command: Vec<String>,
    /// The loopback port it listens on: the agent starts once it accepts there, and a
    /// policy's local route may send a name to it.
    #[serde(default)]
    pub port: Option<u16>,
    /// A host directory (in a VM: a directory of the root image) bound read-only at
    /// `/run/moat-services/<name>/models` in its view only.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// Device nodes (host paths in the namespace backend; in a VM, the guest's `/dev` ones,
    /// those of a passed-through GPU) that appear in its `/dev` only.
    #[serde(default)]
    pub devices: Vec<PathBuf>,
    /// Start it again when it exits (up to [`MAX_RESTARTS`] times).
    #[serde(default)]
    pub restart: bool,
}

/// Why a workspace's services are refused or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A malformed `--service` flag.
    #[error("--service {0:?} is not NAME[:PORT]=COMMAND")]
    Flag(String),
    /// A malformed name.
    #[error(
        "{0:?} is not a service name (1-{MAX_NAME_LEN} of a-z, 0-9 and '-', starting with a \
         letter)"
    )]
    Name(String),
    /// An empty command.
    #[error("service {0:?} has no command")]
    NoCommand(String),
    /// Two services of one name.
    #[error("two services are named {0:?}")]
    Duplicate(String),
    /// Too many services.
    #[error("a workspace has at most {MAX_SERVICES} services")]
    TooMany,
    /// A relative path, or port 0.
    #[error("service {0:?}: {1}")]
    Invalid(String, &'static str),
    /// Two devices whose file names collide in the service's `/dev`.
    #[error("service {0:?}: two devices are named {1:?}")]
    DeviceName(String, String),
    /// The program is not in the workspace.
    #[error("service {0:?}: no program {1:?} in the workspace")]
    NoProgram(String, String),
    /// The service could not be prepared or started.
    #[error("cannot start service {0:?}")]
    Start(String, #[source] std::io::Error),
}

/// The uid (and gid) inside the workspace of the service at `index` in the spec.
pub fn service_uid(index: usize) -> u32 {
    FIRST_SERVICE_UID + u32::try_from(index).unwrap_or(u32::MAX - FIRST_SERVICE_UID)
}

impl ServiceSpec {
    /// Parses `NAME[:PORT]=COMMAND`, the command split on whitespace.
    pub fn parse_flag(text: &str) -> Result<ServiceSpec, ServiceError> {
        let bad = || ServiceError::Flag(text.to_owned());
        let (head, command) = text.split_once('=').ok_or_else(bad)?;
        let (name, port) = match head.split_once(':') {
            Some((name, port)) => (name, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (head, None),
        };
        let spec = ServiceSpec {
            name: name.to_owned(),
            command: command.split_whitespace().map(str::to_owned).collect(),
            port,
            models: None,
            devices: Vec::new(),
            restart: false,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks one spec.
    pub fn check(&self) -> Result<(), ServiceError> {
        let name_ok = (1..=MAX_NAME_LEN).contains(&self.name.len())
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(ServiceError::Name(self.name.clone()));
        }
        if self.command.is_empty() || self.command.iter().any(|a| a.contains('\0')) {
            return Err(ServiceError::NoCommand(self.name.clone()));
        }
        if self.port == Some(0) {
            return Err(ServiceError::Invalid(self.name.clone(), "port 0"));
        }
        let absolute = self.models.iter().chain(&self.devices).all(|p| {
            p.is_absolute() && !p.as_os_str().as_bytes().contains(&0) && p.file_name().is_some()
        });
        if !absolute {
            return Err(ServiceError::Invalid(
                self.name.clone(),
                "models and devices must be absolute paths",
            ));
        }
        let mut names = Vec::new();
        for device in &self.devices {
            let name = device_name(device);
            if names.contains(&name) || STANDARD_DEVICES.contains(&&*name.to_string_lossy()) {
                return Err(ServiceError::DeviceName(
                    self.name.clone(),
                    name.to_string_lossy().into_owned(),
                ));
            }
            names.push(name);
        }
        Ok(())
    }

    /// Checks a workspace's services together.
    pub fn check_all(specs: &[ServiceSpec]) -> Result<(), ServiceError> {
        if specs.len() > MAX_SERVICES {
            return Err(ServiceError::TooMany);
        }
        for (i, spec) in specs.iter().enumerate() {
            spec.check()?;
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(ServiceError::Duplicate(spec.name.clone()));
            }
        }
        Ok(())
    }

    /// `/run/moat-services/<name>`.
    pub fn dir(&self) -> PathBuf {
        Path::new(SERVICES_DIR).join(&self.name)
    }
}

fn device_name(device: &Path) -> std::ffi::OsString {
    device.file_name().unwrap_or_default().to_owned()
}

/// Where a service's models and devices come from when its directory is laid out: paths
/// PID 1 reaches at that moment (in the namespace backend, before it enters the workspace's
/// root; in a VM, after).
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Bound at `models/`.
    pub(crate) models: Option<PathBuf>,
    /// Each bound at `dev/<the device's file name>`.
    pub(crate) devices: Vec<PathBuf>,
}

/// The namespace backend, run by the host's root (before the ids switch): binds each
/// service's models directory (read-only) and devices into `<staging>/<name>/`, while their
/// host paths are reachable whatever their permissions, and returns where they now are.
pub(crate) fn stage_host_paths(
    staging: &Path,
    specs: &[ServiceSpec],
) -> Result<Vec<Sources>, InitError> {
    let mut all = Vec::with_capacity(specs.len());
    for spec in specs {
        let dir = staging.join(&spec.name);
        mkdir(&dir)?;
        let models = match &spec.models {
            Some(host) => {
                let target = dir.join("models");
                mkdir(&target)?;
                rootfs::bind("a service's models", host, &target)?;
                read_only(&target)?;
                Some(target)
            }
            None => None,
        };
        let mut devices = Vec::with_capacity(spec.devices.len());
        for device in &spec.devices {
            check_device(device).map_err(|e| InitError::Write(device.clone(), e))?;
            let target = dir.join(format!("dev-{}", devices.len()));
            std::fs::write(&target, b"").map_err(|e| InitError::Write(target.clone(), e))?;
            rootfs::bind("a service's device", device, &target)?;
            devices.push(target);
        }
        all.push(Sources { models, devices });
    }
    Ok(all)
}

/// Refuses anything but a character or block device.
pub(crate) fn check_device(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)?.file_type();
    if kind.is_char_device() || kind.is_block_device() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "not a character or block device (a service's devices are device nodes)",
        ))
    }
}

fn read_only(path: &Path) -> Result<(), InitError> {
    moat_guest_sandbox::make_tree_read_only(path).map_err(|e| InitError::Mount {
        what: "a service's models read-only",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })
}

/// Lays out `<root>/run/moat-services/<name>/` for each service (before the pivot into
/// `root`, whose `/run` is a fresh tmpfs): `models/` bound from its source, read-only;
/// `dev/` a tmpfs with the standard devices (bound from `dev`, a `/dev` PID 1 still sees) and
/// its own; `tmp/`, its uid's alone.
pub(crate) fn lay_out(
    root: &Path,
    dev: &Path,
    specs: &[ServiceSpec],
    sources: &[Sources],
) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    let top = rootfs::under(root, SERVICES_DIR);
    mkdir(&top)?;
    for (i, (spec, source)) in specs.iter().zip(sources).enumerate() {
        let dir = top.join(&spec.name);
        mkdir(&dir)?;
        if let Some(models) = &source.models {
            let target = dir.join("models");
            mkdir(&target)?;
            rootfs::bind("a service's models", models, &target)?;
            read_only(&target)?;
        }
        let devdir = dir.join("dev");
        mkdir(&devdir)?;
        mount_or(
            "a service's /dev",
            Some("tmpfs"),
            &devdir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=755"),
        )?;
        let own = spec
            .devices
            .iter()
            .map(|d| device_name(d))
            .zip(&source.devices);
        let standard = STANDARD_DEVICES
            .iter()
            .map(|n| (std::ffi::OsString::from(n), dev.join(n)));
        for (name, from) in standard.chain(own.map(|(n, p)| (n, p.clone()))) {
            let node = devdir.join(&name);
            std::fs::write(&node, b"").map_err(|e| InitError::Write(node.clone(), e))?;
            rootfs::bind("a service's device", &from, &node)?;
        }
        let tmp = dir.join("tmp");
        mkdir(&tmp)?;
        let uid = service_uid(i);
        std::os::unix::fs::chown(&tmp, Some(uid), Some(uid))
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| InitError::Write(tmp.clone(), e))?;
    }
    Ok(())
}

/// What the child needs to start one service, prepared in PID 1 (the child only makes
/// system calls: PID 1 has other threads, the netstack, when it forks).
struct Launch {
    sandbox: moat_guest_sandbox::Sandbox,
    program: CString,
    /// Kept alive for `argv_ptrs`.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    /// Kept alive for `envp_ptrs`.
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    /// Its `/dev` (`<dir>/dev`), bound over `/dev` in its mount namespace.
    dev: CString,
    /// Its temporary directory, its working directory.
    tmp: CString,
    /// `/dev/null`, for its standard input and output (its standard error is PID 1's).
    null: OwnedFd,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

fn cstring(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// The PATH of services (and of the agent).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    PATH.split(':').map(|d| Path::new(d).join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

impl Launch {
    fn new(spec: &ServiceSpec, index: usize, specs: &[ServiceSpec]) -> Result<Self, ServiceError> {
        let err = |e: std::io::Error| ServiceError::Start(spec.name.clone(), e);
        let dir = spec.dir();
        let tmp = dir.join("tmp");
        let uid = service_uid(index);
        let mut sandbox =
            moat_guest_sandbox::SandboxConfig::new(vec![tmp.clone()], vec![PathBuf::from("/")]);
        sandbox.devices = vec![dir.join("dev")];
        sandbox.uid_gid = Some((uid, uid));
        // The agent's files, and the other services'.
        sandbox.hidden = ["/tmp", "/home", "/root"]
            .iter()
            .map(PathBuf::from)
            .chain(
                specs
                    .iter()
                    .filter(|s| s.name != spec.name)
                    .map(ServiceSpec::dir),
            )
            .collect();
        let sandbox = moat_guest_sandbox::Sandbox::new(&sandbox)
            .map_err(|e| err(std::io::Error::other(e)))?;
        let program = find_program(&spec.command[0])
            .ok_or_else(|| ServiceError::NoProgram(spec.name.clone(), spec.command[0].clone()))?;
        let argv = spec
            .command
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let mut env = vec![
            format!("PATH={PATH}"),
            format!("HOME={}", tmp.display()),
            format!("TMPDIR={}", tmp.display()),
            format!("MOAT_SERVICE={}", spec.name),
            format!("MOAT_SERVICE_DIR={}", dir.display()),
        ];
        if let Some(port) = spec.port {
            env.push(format!("MOAT_SERVICE_PORT={port}"));
        }
        if let Ok(lang) = std::env::var("LANG") {
            env.push(format!("LANG={lang}"));
        }
        let envp = env
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(err)?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Launch {
            sandbox,
            program: cstring(program.as_os_str().as_bytes()).map_err(err)?,
            argv_ptrs: ptrs(&argv),
            _argv: argv,
            envp_ptrs: ptrs(&envp),
            _envp: envp,
            dev: cstring(dir.join("dev").as_os_str().as_bytes()).map_err(err)?,
            tmp: cstring(tmp.as_os_str().as_bytes()).map_err(err)?,
            null: null.into(),
        })
    }

    /// Starts the service: a child in new pid and mount namespaces, which confines itself
    /// and runs the service under [`service_init`]. Returns the child's pid.
    fn spawn(&self) -> std::io::Result<Pid> {
        let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::SIGCHLD;
        // SAFETY: clone with no new stack behaves as fork: the child runs on a copy of this
        // stack and returns 0. It then only makes system calls on data prepared above (no
        // allocation, no lock: PID 1 has other threads) and ends in execve or _exit.
        #[allow(unsafe_code)]
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::c_ulong::try_from(flags).unwrap_or(0),
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        match pid {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                let code = self.child();
                // SAFETY: ends the child without running anything of the parent's.
                #[allow(unsafe_code)]
                unsafe {
                    libc::_exit(code)
                }
            }
            pid => Ok(Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))),
        }
    }

    /// In the child (PID 1 of the service's pid namespace): its mounts, its sandbox, then the
    /// service under a small init. Returns an exit code only on failure.
    fn child(&self) -> i32 {
        // SAFETY: system calls on descriptors and NUL-terminated strings this struct owns, and
        // integers.
        #[allow(unsafe_code)]
        let ready = unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0
                && crate::launch::close_on_exec_above_stderr().is_ok()
                && libc::dup2(self.null.as_raw_fd(), 0) >= 0
                && libc::dup2(self.null.as_raw_fd(), 1) >= 0
                && libc::setsid() >= 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                // Its own /proc: its pid namespace's, where it sees only itself.
                && libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    self.dev.as_ptr(),
                    c"/dev".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == 0
        };
        if !ready {
            return fail(c"moat guest-init: cannot set up a service's namespaces\n");
        }
        if self.sandbox.apply().is_err() {
            return fail(c"moat guest-init: cannot confine a service; not started\n");
        }
        service_init(self)
    }
}

/// Writes `msg` on standard error (no allocation) and returns 127.
fn fail(msg: &std::ffi::CStr) -> i32 {
    let bytes = msg.to_bytes();
    // SAFETY: writes a borrowed buffer of its own length.
    #[allow(unsafe_code)]
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len())
    };
    127
}

/// The last SIGTERM/SIGINT/SIGHUP the service's init received and has not passed on.
static SERVICE_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn keep_signal(sig: libc::c_int) {
    SERVICE_SIGNAL.store(sig, Ordering::SeqCst);
}

/// PID 1 of the service's pid namespace (already confined, as the service's uid): starts the
/// service as its only child, passes SIGTERM, SIGINT and SIGHUP on to it (an init without a
/// handler would ignore them), reaps whatever ends in the namespace, and exits with the
/// service's status.
fn service_init(launch: &Launch) -> i32 {
    const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    // SAFETY: sigaction with a handler that only stores into an atomic; clone as fork (see
    // `Launch::spawn`); execve of prepared, NUL-terminated arrays; waitpid, kill and
    // nanosleep on integers and a local.
    #[allow(unsafe_code)]
    unsafe {
        for sig in FORWARDED {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = keep_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
        let pid = libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        );
        if pid < 0 {
            return fail(c"moat guest-init: cannot start a service\n");
        }
        if pid == 0 {
            for sig in FORWARDED {
                libc::signal(sig, libc::SIG_DFL);
            }
            libc::chdir(launch.tmp.as_ptr());
            libc::execve(
                launch.program.as_ptr(),
                launch.argv_ptrs.as_ptr(),
                launch.envp_ptrs.as_ptr(),
            );
            libc::_exit(fail(c"moat guest-init: cannot run a service's program\n"));
        }
        let service = libc::pid_t::try_from(pid).unwrap_or(-1);
        loop {
            let sig = SERVICE_SIGNAL.swap(0, Ordering::SeqCst);
            if sig != 0 {
                libc::kill(service, sig);
            }
            let mut status = 0;
            let reaped = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if reaped == service {
                if libc::WIFEXITED(status) {
                    return libc::WEXITSTATUS(status);
                }
                if libc::WIFSIGNALED(status) {
                    return 128 + libc::WTERMSIG(status);
                }
            } else if reaped == 0 || (reaped < 0 && *libc::__errno_location() == libc::EINTR) {
                // As PID 1's own wait: a signal arriving just before a blocking wait would be
                // passed on only at the next exit, so wake at least every 50 ms.
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
            } else if reaped < 0 {
                return 127;
            }
        }
    }
}

/// One service and its process.
#[derive(Debug)]
struct Service {
    spec: ServiceSpec,
    launch: Launch,
    pid: Option<Pid>,
    restarts: u32,
}

/// The workspace's services, started by PID 1 before the agent.
#[derive(Debug, Default)]
pub(crate) struct Services {
    all: Vec<Service>,
}

impl Services {
    /// Starts every service (after the pivot into the workspace's root and the netstack), and
    /// waits until each one with a port accepts connections there, up to [`READY_WITHIN`].
    pub(crate) fn start(specs: &[ServiceSpec], report: &Reporter) -> Result<Self, ServiceError> {
        let mut all = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let launch = Launch::new(spec, i, specs)?;
            let mut service = Service {
                spec: spec.clone(),
                launch,
                pid: None,
                restarts: 0,
            };
            service.start(report)?;
            all.push(service);
        }
        let mut services = Services { all };
        services.wait_ready(report);
        Ok(services)
    }

    fn wait_ready(&mut self, report: &Reporter) {
        let deadline = Instant::now() + READY_WITHIN;
        for i in 0..self.all.len() {
            let Some(port) = self.all[i].spec.port else {
                continue;
            };
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            loop {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                let Some(pid) = self.all[i].pid else {
                    break;
                };
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => {
                        self.reaped(pid, code, report);
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        self.reaped(pid, 128 + sig as i32, report);
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    eprintln!(
                        "moat guest-init: service {:?} does not accept connections on port \
                         {port} after {} s; starting the agent anyway",
                        self.all[i].spec.name,
                        READY_WITHIN.as_secs()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// PID 1 reaped `pid`: if it was a service, reports its end, starts it again if its spec
    /// asks and it has restarts left, and returns true.
    pub(crate) fn reaped(&mut self, pid: Pid, code: i32, report: &Reporter) -> bool {
        let Some(service) = self.all.iter_mut().find(|s| s.pid == Some(pid)) else {
            return false;
        };
        service.pid = None;
        report.service_terminate(pid_u32(pid), &service.spec.name, code);
        if service.spec.restart && service.restarts < MAX_RESTARTS {
            service.restarts += 1;
            eprintln!(
                "moat guest-init: service {:?} exited with status {code}; starting it again \
                 ({} of {MAX_RESTARTS})",
                service.spec.name, service.restarts
            );
            if let Err(e) = service.start(report) {
                eprintln!("moat guest-init: {}", moat_log::error_chain(&e));
            }
        } else {
            eprintln!(
                "moat guest-init: service {:?} exited with status {code}",
                service.spec.name
            );
        }
        true
    }

    /// After the agent: SIGTERM to every service, SIGKILL to those still running after
    /// [`STOP_GRACE`]; each end reported.
    pub(crate) fn stop(&mut self, report: &Reporter) {
        for service in &self.all {
            if let Some(pid) = service.pid {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for service in &mut self.all {
            let Some(pid) = service.pid.take() else {
                continue;
            };
            let code = loop {
                let flags = (Instant::now() < deadline).then_some(WaitPidFlag::WNOHANG);
                match waitpid(pid, flags) {
                    Ok(WaitStatus::Exited(_, code)) => break code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(WaitStatus::StillAlive) => {
                        if Instant::now() + Duration::from_millis(20) >= deadline {
                            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(_) => break 128 + libc::SIGKILL,
                }
            };
            report.service_terminate(pid_u32(pid), &service.spec.name, code);
        }
    }
}

impl Service {
    fn start(&mut self, report: &Reporter) -> Result<(), ServiceError> {
        let pid = self
            .launch
            .spawn()
            .map_err(|e| ServiceError::Start(self.spec.name.clone(), e))?;
        self.pid = Some(pid);
        report.service_launch(pid_u32(pid), &self.spec.name, &self.spec.command);
        Ok(())
    }
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_names_the_service_its_port_and_its_command() {
        let spec = ServiceSpec::parse_flag("llm:8000=python3 /srv/server.py --quiet").unwrap();
        assert_eq!(spec.name, "llm");
        assert_eq!(spec.port, Some(8000));
        assert_eq!(spec.command, ["python3", "/srv/server.py", "--quiet"]);
        assert_eq!(
            ServiceSpec::parse_flag("db=redis-server").unwrap().port,
            None
        );
    }

    #[test]
    fn malformed_flags_and_names_are_refused() {
        for bad in [
            "llm",
            "llm:x=cmd",
            "llm:0=cmd",
            "=cmd",
            "LLM=cmd",
            "-a=cmd",
            "a b=cmd",
            "llm=",
        ] {
            assert!(ServiceSpec::parse_flag(bad).is_err(), "{bad}");
        }
        let long = format!("{}=cmd", "a".repeat(MAX_NAME_LEN + 1));
        assert!(ServiceSpec::parse_flag(&long).is_err());
    }

    #[test]
    fn duplicate_names_relative_paths_and_clashing_devices_are_refused() {
        let llm = ServiceSpec::parse_flag("llm=x").unwrap();
        assert!(matches!(
            ServiceSpec::check_all(&[llm.clone(), llm.clone()]),
            Err(ServiceError::Duplicate(_))
        ));
        let relative = ServiceSpec {
            models: Some("models".into()),
            ..llm.clone()
        };
        assert!(relative.check().is_err());
        let clash = ServiceSpec {
            devices: vec!["/dev/a/gpu0".into(), "/dev/b/gpu0".into()],
            ..llm.clone()
        };
        assert!(matches!(clash.check(), Err(ServiceError::DeviceName(..))));
        let null = ServiceSpec {
            devices: vec!["/dev/null".into()],
            ..llm
        };
        assert!(null.check().is_err());
    }

    #[test]
    fn unknown_fields_in_a_spec_are_refused() {
        let json = r#"{"name":"llm","command":["x"],"uid":0}"#;
        assert!(serde_json::from_str::<ServiceSpec>(json).is_err());
    }

    #[test]
    fn services_run_as_uids_of_their_own_above_the_agents() {
        assert_eq!(service_uid(0), FIRST_SERVICE_UID);
        assert_ne!(service_uid(1), service_uid(0));
        assert!(
            service_uid(MAX_SERVICES) < 1000,
            "below the agent's 1000 (in a VM)"
        );
    }
}
