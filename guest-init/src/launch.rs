//! Starting the agent and reaping it, as PID 1.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::report::Reporter;

/// The agent process to run.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// argv; empty means an interactive login shell.
    pub command: Vec<String>,
    /// The agent's home (writable).
    pub home: PathBuf,
    /// Extra environment (CA bundle variables, credential placeholders, a container's own).
    pub env: Vec<(String, String)>,
    /// The working directory inside the workspace (absolute); the home when absent. A
    /// container's `cwd` under `containerd-shim-moat-v2`.
    pub workdir: Option<PathBuf>,
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}

/// Starts the agent with a clean environment, confined by `sandbox`, and waits for it, reaping
/// every other child that ends meanwhile (orphans re-parented to PID 1). With `tty`, the agent
/// leads a new session with that terminal as its controlling terminal and standard streams.
/// `step` is told when the sandbox is prepared and when the agent has started (its exec
/// done), for `--boot-log`'s step times. Returns the agent's exit status.
pub(crate) fn run_agent(
    spec: &AgentSpec,
    sandbox: &moat_guest_sandbox::SandboxConfig,
    tty: Option<OwnedFd>,
    report: &Reporter,
    services: &mut crate::service::Services,
    step: &dyn Fn(&'static str),
) -> std::io::Result<ExitStatus> {
    let argv: Vec<String> = if spec.command.is_empty() {
        vec!["/bin/bash".to_owned(), "-l".to_owned()]
    } else {
        spec.command.clone()
    };
    let (program, args) = (argv[0].clone(), argv[1..].to_vec());
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("HOME", &spec.home)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MOAT_WORKSPACE", "1")
        .current_dir(spec.workdir.as_ref().unwrap_or(&spec.home));
    for key in ["TERM", "LANG", "COLORTERM"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // Everything that allocates (opening paths, building the Landlock ruleset, compiling the
    // seccomp filter) happens here, in PID 1; the child only applies it.
    let sandbox = moat_guest_sandbox::Sandbox::new(sandbox)
        .map_err(|e| std::io::Error::other(format!("cannot prepare the sandbox: {e}")))?;
    step("sandbox prepared");
    let tty_fd = tty.as_ref().map(AsRawFd::as_raw_fd);
    // The sandbox stacks new mounts over the agent's paths: enter the working directory
    // again afterwards, or it would stay on the mount underneath.
    let workdir = spec.workdir.as_ref().unwrap_or(&spec.home);
    let home = std::ffi::CString::new(workdir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: the closure runs in the forked child before exec. `Sandbox::apply` makes no
    // allocation and only issues system calls (a test in moat-guest-sandbox proves it), and
    // the error is built from a raw errno without allocating: so it is safe even though PID 1
    // has other threads (the netstack) at fork time.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // Whatever `moat run` (or the VM's PID 1) inherited without close-on-exec must not
            // reach the agent: a descriptor of the host's is a capability the policy never
            // granted. Marked close-on-exec rather than closed, so std's own pipe still reports
            // a failed exec, and the sandbox's prepared descriptors still work until exec.
            close_on_exec_above_stderr()?;
            // A session and process group of its own, with or without a terminal: otherwise
            // `kill(0, ...)` (or a negative pid naming the group) from inside reaches every
            // process of the group it was born in: PID 1 and, in the namespace backend,
            // `__guest-init` and `moat run` on the host (the egress proxy).
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = tty_fd {
                // The terminal as its controlling terminal (taken over if the console was
                // someone's: PID 1 still holds CAP_SYS_ADMIN here) and standard streams.
                if libc::ioctl(fd, libc::TIOCSCTTY, 1) < 0
                    || libc::dup2(fd, 0) < 0
                    || libc::dup2(fd, 1) < 0
                    || libc::dup2(fd, 2) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if sandbox.apply().is_err() {
                // If the sandbox cannot be applied the agent does not start.
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            if libc::chdir(home.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if tty_fd.is_none() {
        // The agent no longer shares the process group a terminal's Ctrl-C and Ctrl-\ reach
        // (the one PID 1 is in): PID 1 passes them on to the agent's group instead. Kept from
        // before the agent starts, so none that arrives once it runs is lost (the child's
        // handlers are reset by exec).
        crate::signals::forward_interrupts();
    }
    let child = cmd.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot start the agent inside its sandbox: {e}"),
        )
    })?;
    step("agent started");
    drop(tty);
    report.launch(child.id(), &argv);
    let agent = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let status = loop {
        crate::signals::forward_pending(agent);
        crate::signals::forward_pending_interrupt(agent);
        match crate::signals::wait_for(None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                break ExitStatus::from_raw((code & 0xff) << 8);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                break ExitStatus::from_raw(sig as i32);
            }
            Ok(WaitStatus::Exited(pid, code)) => {
                if !services.reaped(pid, code, report) {
                    report.reaped(pid_u32(pid), code);
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                if !services.reaped(pid, 128 + sig as i32, report) {
                    report.reaped(pid_u32(pid), 128 + sig as i32);
                }
            }
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    report.terminate(child.id(), exit_code(status));
    Ok(status)
}

/// Marks every descriptor above standard error close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, Linux 5.11). Only a system call: safe between fork and exec.
pub(crate) fn close_on_exec_above_stderr() -> std::io::Result<()> {
    // SAFETY: integer arguments only.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
