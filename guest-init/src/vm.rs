//! The VM backend: guest-init as the kernel's PID 1, started from the initramfs.
//!
//! Sequence ([`run_vm`]):
//! 1. devtmpfs, proc and sysfs in the initramfs.
//! 2. The control stream to the host (vsock port 1027): one line, the [`VmWorkspace`] to run.
//! 3. The machine made ready as far as no workspace is needed (a warm pool's machine does
//!    this before its claim, on the host's `prepare`): the root disk (`/dev/vda`, the root
//!    image, ext4) mounted read-only at `/mnt/root`; the home disk (`/dev/vdb`, ext4)
//!    read-write, nosuid, nodev at `/home/agent` in it; fresh tmpfs on `/tmp` and `/run`; the
//!    virtual DNS over `/etc/resolv.conf`; `/dev`, `/proc` and `/sys` moved across; the root
//!    switched to `/mnt/root`; a copy of the system trust store and an /etc/hosts bound over
//!    theirs, for the workspace's additions; the TUN device up.
//! 4. The clock set to the host's; the workspace's identity: its CA appended to the trust
//!    store bound over the system one, its name to /etc/hosts; then the netstack started on
//!    the TUN device, its flows going to the host over vsock port 1025.
//! 5. The agent started as uid 1000, confined by `moat-guest-sandbox` (as in the namespace
//!    backend), with the serial console as its controlling terminal when interactive; PID 1
//!    reaps every child until the agent exits. Meanwhile the control stream carries the
//!    host's signals; if it ends (a snapshot resets vsock), it is reattached, and if the host
//!    is gone (a restore elsewhere) the workspace is stopped and the VM reset (`link.rs`).
//! 6. The outcome written back on the control stream, file systems synced, and the VM reset
//!    (`reboot=k` on the command line: the i8042 reset line, which moat-vmm treats as
//!    shutdown).
//!
//! Invariants: never panics; any failure is reported to the host (console and control stream)
//! and the VM powers off; the agent never starts on a half-built workspace.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use crate::control::{self, VmOutcome, VmWorkspace};
use crate::launch::{exit_code, run_agent};
use crate::link::Link;
use crate::report::{Reporter, Sink};
use crate::rootfs::{self, AGENT_HOME, CA_BUNDLE, REPLACED, ca_env, mkdir, mount_or, under};
use moat_log::error_chain;

use crate::InitError;

/// The root image's disk (the first virtio-blk device: moat-vmm orders read-only disks first).
pub const ROOT_DISK: &str = "/dev/vda";
/// The home disk.
pub const HOME_DISK: &str = "/dev/vdb";
/// The serial console, the interactive agent's terminal.
pub const CONSOLE: &str = "/dev/ttyS0";
/// The agent's uid and gid inside the VM (the home disk's root directory is owned by it).
pub const AGENT_ID: u32 = 1000;
/// The agent's user name (`images/rootfs/customize.sh` creates it with [`AGENT_ID`]).
pub const AGENT_USER: &str = "agent";

const NEW_ROOT: &str = "/mnt/root";

/// Runs the workspace as PID 1 of the VM, then powers the VM off. Never returns.
pub fn run_vm() -> ! {
    let mut control: Option<std::sync::Arc<Link>> = None;
    let ended = init(&mut control);
    if control.as_ref().is_some_and(|c| c.host_gone()) {
        // The link's thread is ending every process (the agent's end, or its wait's ECHILD,
        // is what brought us here) and resets the VM: nothing to say, nobody to tell.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let outcome = match ended {
        Ok(code) => VmOutcome::Exited { code },
        Err(e) => {
            let error = error_chain(&e);
            eprintln!("moat guest-init: {error}");
            VmOutcome::Failed { error }
        }
    };
    stop_everything();
    if let Some(c) = control {
        c.report(&outcome);
    }
    power_off()
}

/// The host is gone ([`Link`]): nothing may go on in the workspace without it.
fn host_gone() -> ! {
    stop_everything();
    power_off()
}

/// Ends every process but PID 1 (SIGTERM, a second's grace, then SIGKILL) and unmounts the
/// home disk, so nothing writes to it while the VM resets.
fn stop_everything() {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let reap = || loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    };
    let everyone = nix::unistd::Pid::from_raw(-1);
    if kill(everyone, Signal::SIGTERM).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            reap();
            // ESRCH: nobody but PID 1 is left.
            if kill(everyone, None).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(everyone, Signal::SIGKILL);
        reap();
    }
    nix::unistd::sync();
    if let Err(e) = nix::mount::umount(AGENT_HOME) {
        // Not yet switched root (setup failed early), or something still holds it: sync is
        // what matters, and it ran.
        if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
            eprintln!("moat guest-init: cannot unmount the home disk: {e}");
        }
    }
}

/// Syncs and resets the VM (the workspace VM is never rebooted in place: the VMM exits).
fn power_off() -> ! {
    // Whatever the console still has to send (the agent's last output) goes out first.
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    nix::unistd::sync();
    // The console is the agent's output: the kernel's own "reboot: Restarting system" (an
    // emergency-level message, which `quiet` and syslog(2) cannot hold back) must not follow
    // it. kernel.printk takes a console level of 0, which silences even those.
    let _ = std::fs::write("/proc/sys/kernel/printk", "0");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot(2) failed: PID 1 must not exit (the kernel would panic).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What becomes of each [`control::VmSignal`] the host sends after the workspace: raised on
/// this (the main) thread, where PID 1 waits for the agent, whose handler passes it on to the
/// agent as the namespace backend's PID 1 does (`signals.rs`). The [`Link`]'s thread reads
/// them.
fn raise_on_this_thread() -> impl Fn(control::VmSignal) + Send + 'static {
    use nix::sys::signal::Signal;
    let (pid, main) = (nix::unistd::getpid(), nix::unistd::gettid());
    move |signal| {
        let sig = match signal {
            control::VmSignal::Terminate => Signal::SIGTERM,
            control::VmSignal::Hangup => Signal::SIGHUP,
        };
        // To the main thread itself (tgkill): a signal for the whole process could be taken
        // by another thread and leave the main thread's wait uninterrupted.
        // SAFETY: tgkill(2) takes three integers and touches no memory.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                pid.as_raw(),
                main.as_raw(),
                sig as libc::c_int,
            )
        };
    }
}

/// Connects the control stream; vsock is up as soon as the driver probed, but allow the
/// host a moment.
fn connect_control() -> Result<UnixStream, InitError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match moat_netstack::vsock_connect(moat_netstack::HOST_CID, control::CONTROL_VSOCK_PORT) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(InitError::Control(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// What the host's first lines gave: the control stream, the workspace, and the machine made
/// ready ahead of it (a warm pool's `prepare`), if it was.
struct Received {
    stream: UnixStream,
    workspace: VmWorkspace,
    prepared: Option<Prepared>,
}

/// What a machine sets up before it knows its workspace: nothing in it depends on the
/// workspace, so a warm pool's machine does it before its claim ([`prepare_machine`]).
struct Prepared {
    /// The netstack's TUN device, up, addressed and routed; the netstack itself starts with
    /// the workspace (its flow header version and local routes are the workspace's).
    tun: moat_netstack::Tun,
}

/// Connects the control stream and reads the workspace. A template VM is told to stand by
/// first ([`control::VmStandby::Standby`]): it says so and waits, untimed; the host snapshots
/// it there. When a restore of that snapshot resets the vsock transport, the wait ends with an
/// error: this machine is a new one whose RNG state every other restore shares, so the RNG is
/// reseeded from the host (the rng device) before anything else, and the control stream
/// connected again, to the new host, which is told so first ([`control::VmRestored`]) and then
/// sends the workspace, or (a warm pool) `prepare`: the machine is made ready as far as no
/// workspace is needed ([`prepare_machine`]), and the workspace comes when it is claimed.
fn receive_workspace() -> Result<Received, InitError> {
    let mut reseeded = None;
    loop {
        let stream = connect_control()?;
        if let Some(bytes) = reseeded {
            (&stream)
                .write_all(&control::encode(&control::VmRestored::Reseeded { bytes }))
                .map_err(InitError::Control)?;
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(InitError::Control)?;
        let line = control::read_line(&mut BufReader::new(&stream)).map_err(|e| {
            InitError::Control(if e.kind() == std::io::ErrorKind::WouldBlock {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the host sent no workspace within 10 s",
                )
            } else {
                e
            })
        })?;
        let Ok(standby) = control::parse::<control::VmStandby>(&line) else {
            let workspace = control::parse(&line).map_err(InitError::Control)?;
            return Ok(Received {
                stream,
                workspace,
                prepared: None,
            });
        };
        stream.set_read_timeout(None).map_err(InitError::Control)?;
        if standby == control::VmStandby::Prepare {
            let prepared = prepare_machine()?;
            warm_page_cache(Path::new("/"));
            warm_agent_start();
            warm_free_memory();
            (&stream)
                .write_all(&control::encode(&control::VmStandingBy::Prepared))
                .map_err(InitError::Control)?;
            let line =
                control::read_line(&mut BufReader::new(&stream)).map_err(InitError::Control)?;
            let workspace = control::parse(&line).map_err(InitError::Control)?;
            return Ok(Received {
                stream,
                workspace,
                prepared: Some(prepared),
            });
        }
        (&stream)
            .write_all(&control::encode(&control::VmStandingBy::StandingBy))
            .map_err(InitError::Control)?;
        match control::read_line(&mut BufReader::new(&stream)) {
            // The template's own host changed its mind: run the workspace here.
            Ok(line) => {
                let workspace = control::parse(&line).map_err(InitError::Control)?;
                return Ok(Received {
                    stream,
                    workspace,
                    prepared: None,
                });
            }
            Err(_) => {
                drop(stream);
                reseed_rng().map_err(InitError::Reseed)?;
                reseeded = Some(u32::try_from(RESEED_BYTES).unwrap_or(u32::MAX));
            }
        }
    }
}

/// Sets the wall clock to the host's `realtime_ns` (nothing when 0: a host that did not say).
/// Only CLOCK_REALTIME moves: the monotonic clock, and every timer on it, goes on as it was.
fn set_clock(realtime_ns: u64) -> Result<(), InitError> {
    if realtime_ns == 0 {
        return Ok(());
    }
    let ns = |v: u64| libc::c_long::try_from(v).unwrap_or(libc::c_long::MAX);
    let now = nix::sys::time::TimeSpec::new(
        ns(realtime_ns / 1_000_000_000),
        ns(realtime_ns % 1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now).map_err(InitError::Clock)
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
/// Bytes of host entropy mixed in on a restore.
const RESEED_BYTES: usize = 64;

/// Mixes [`RESEED_BYTES`] from the host's entropy device (`/dev/hwrng`, our virtio-rng) into
/// the kernel's input pool, credited, and makes the kernel rekey its CRNG from it at once
/// (RNDRESEEDCRNG): what every restore of one snapshot would otherwise share, /dev/urandom's
/// and getrandom's stream, now differs between them.
pub(crate) fn reseed_rng() -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; RESEED_BYTES],
    }
    let mut info = RandPoolInfo {
        entropy_count: libc::c_int::try_from(RESEED_BYTES * 8).unwrap_or(0),
        buf_size: libc::c_int::try_from(RESEED_BYTES).unwrap_or(0),
        buf: [0; RESEED_BYTES],
    };
    std::fs::File::open("/dev/hwrng")?.read_exact(&mut info.buf)?;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its two ints;
    // `info` is laid out so (repr(C)) and lives across the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &raw const info) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn init(control_out: &mut Option<std::sync::Arc<Link>>) -> Result<i32, InitError> {
    mount_or(
        "/dev",
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )?;
    rootfs::mount_proc(Path::new("/proc"))?;
    // Writable while PID 1 sets up; the agent's uid cannot write to it.
    rootfs::mount_sysfs(Path::new("/sys"), true)?;

    let Received {
        stream,
        workspace,
        prepared,
    } = receive_workspace()?;
    let link = Link::new(stream);
    *control_out = Some(std::sync::Arc::clone(&link));
    let steps = Steps::new(workspace.trace_steps);
    set_clock(workspace.realtime_ns)?;
    let prepared = match prepared {
        Some(prepared) => {
            steps.say("workspace received (disks, root and TUN made ready before the claim)");
            prepared
        }
        None => {
            steps.say("workspace received");
            let prepared = prepare_machine()?;
            steps.say("disks mounted, root entered, TUN up");
            prepared
        }
    };
    install_identity(&workspace)?;
    steps.say("trust store and names installed");
    crate::service::ServiceSpec::check_all(&workspace.services)?;
    lay_out_services(&workspace.services)?;
    if workspace.generation != 0 {
        // For the agent and its tools: which restore of its snapshot this machine is.
        let _ = std::fs::write(
            "/run/moat/generation",
            format!("{}\n", workspace.generation),
        );
    }

    let Prepared { tun } = prepared;
    let transport = moat_netstack::VsockTransport {
        port: control::EGRESS_VSOCK_PORT,
    };
    crate::start_netstack(
        tun,
        Box::new(transport),
        workspace.flow_header_version,
        moat_netstack::LocalRoutes::new(workspace.local_routes.iter().map(Into::into).collect()),
    )
    .map_err(InitError::Network)?;
    steps.say("netstack started");
    let _ = nix::unistd::sethostname(&workspace.hostname);
    // Nobody in the workspace may open PID 1's descriptors (the control stream) through /proc.
    let _ = nix::sys::prctl::set_dumpable(false);
    crate::signals::install();
    // From now on the host may send signals for the agent; read them on a thread of their own,
    // which also notices the host going away.
    link.listen(raise_on_this_thread(), host_gone)
        .map_err(InitError::Control)?;

    let reporter = std::sync::Arc::new(Reporter::new(Sink::Vsock(control::AUDIT_VSOCK_PORT)));
    steps.say("host signals and audit reporter set up");
    let mut agent = crate::AgentSpec {
        command: workspace.command.clone(),
        home: AGENT_HOME.into(),
        env: vec![
            ("USER".to_owned(), AGENT_USER.to_owned()),
            ("LOGNAME".to_owned(), AGENT_USER.to_owned()),
            ("SHELL".to_owned(), "/bin/bash".to_owned()),
        ],
        workdir: None,
    };
    agent.env.extend(workspace.env.iter().cloned());
    agent.env.extend(ca_env());
    if !workspace.interactive {
        batch_console()?;
    }
    let tty = if workspace.interactive {
        let fd = nix::fcntl::open(
            CONSOLE,
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| InitError::Agent(e.into()))?;
        // The agent's uid owns its terminal, as login(1) would arrange.
        nix::unistd::fchown(
            &fd,
            Some(nix::unistd::Uid::from_raw(AGENT_ID)),
            Some(nix::unistd::Gid::from_raw(AGENT_ID)),
        )
        .map_err(|e| InitError::Agent(e.into()))?;
        set_window_size(&fd, workspace.rows, workspace.cols);
        Some(fd)
    } else {
        None
    };
    let mut sandbox = agent_sandbox();
    // Started before the agent; their directory hidden from it and from SSH sessions.
    let mut services = crate::service::Services::start(&workspace.services, &reporter)?;
    if !workspace.services.is_empty() {
        sandbox.hidden.push(crate::service::SERVICES_DIR.into());
    }
    if let Some(service) = &workspace.ssh {
        start_sessions(service, &sandbox, &reporter)?;
    }
    sandbox.devices.push(CONSOLE.into());
    steps.say("starting the agent");
    let status = run_agent(&agent, &sandbox, tty, &reporter, &mut services, &|what| {
        steps.say(what);
    })
    .map_err(InitError::Agent)?;
    services.stop(&reporter);
    Ok(exit_code(status))
}

/// Lays out each service's directory (after the switch into the root image): its models, a
/// directory of the image, bound read-only; its devices, nodes the guest's drivers made in
/// /dev, bound into its own /dev and then removed from /dev, where the agent would see them
/// (devtmpfs makes a node again only if its driver registers the device again).
fn lay_out_services(specs: &[crate::service::ServiceSpec]) -> Result<(), InitError> {
    if specs.is_empty() {
        return Ok(());
    }
    let mut sources = Vec::with_capacity(specs.len());
    for spec in specs {
        for device in &spec.devices {
            crate::service::check_device(device).map_err(|e| {
                InitError::Write(
                    device.clone(),
                    std::io::Error::new(
                        e.kind(),
                        format!("service {:?}'s device in the VM: {e}", spec.name),
                    ),
                )
            })?;
        }
        sources.push(crate::service::Sources {
            models: spec.models.clone(),
            devices: spec.devices.clone(),
        });
    }
    let dev = Path::new("/dev");
    crate::service::lay_out(Path::new("/"), dev, specs, &sources)?;
    for device in specs.iter().flat_map(|s| &s.devices) {
        std::fs::remove_file(device).map_err(|e| InitError::Write(device.clone(), e))?;
    }
    Ok(())
}

/// SSH sessions through the broker: sshd as the agent's uid on vsock port 22, which moat-vmm
/// connects the host side's `CONNECT 22` to.
fn start_sessions(
    service: &crate::session::SshService,
    sandbox: &moat_guest_sandbox::SandboxConfig,
    reporter: &std::sync::Arc<Reporter>,
) -> Result<(), InitError> {
    use crate::session::{self, Sessions};
    let mut env = ca_env();
    env.push(("MOAT_WORKSPACE".into(), "1".into()));
    let sessions = Sessions {
        config: session::prepare(service, &env, Some((AGENT_ID, AGENT_ID)))?,
        home: AGENT_HOME.into(),
        sandbox: sandbox.clone(),
        // sshd's log is dropped: the console is the agent's terminal.
        log: None,
        report: std::sync::Arc::clone(reporter),
    };
    let listener = moat_netstack::VsockListener::bind(session::SSH_PORT)
        .map_err(session::SessionError::Service)?;
    std::thread::Builder::new()
        .name("sessions".into())
        .spawn(move || session::serve_vsock(listener, sessions))
        .map_err(session::SessionError::Service)?;
    Ok(())
}

/// A command without a terminal: no input (the host sends none), and output passed through
/// byte for byte (no CR added before each newline).
fn batch_console() -> Result<(), InitError> {
    use nix::sys::termios::{OutputFlags, SetArg, tcgetattr, tcsetattr};
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| InitError::Agent(e.into()))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| InitError::Agent(e.into()))?;
    let out = std::io::stdout();
    if let Ok(mut t) = tcgetattr(&out) {
        t.output_flags.remove(OutputFlags::OPOST);
        let _ = tcsetattr(&out, SetArg::TCSADRAIN, &t);
    }
    Ok(())
}

/// Gives the serial console the host terminal's size (0: unknown, left as it is).
fn set_window_size(tty: &std::os::fd::OwnedFd, rows: u16, cols: u16) {
    use std::os::fd::AsRawFd;
    if rows == 0 || cols == 0 {
        return;
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize; `ws` is valid for the call and `tty` is open.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) };
    if rc != 0 {
        eprintln!(
            "moat guest-init: cannot set the console size: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// guest-init's steps after the workspace arrived, printed with the milliseconds since then
/// when the host asks (`moat run --boot-log`): where a start's time goes in the guest.
///
/// Kept in memory and printed when guest-init is done with them (dropped): each byte to the
/// serial console is an exit to the VMM, and printing as they happen would slow the very
/// steps they time.
struct Steps(Option<(Instant, std::cell::RefCell<Vec<Step>>)>);

/// One of [`Steps`]: how long after the workspace came, and what.
type Step = (Duration, &'static str);

impl Steps {
    /// Says at once that the workspace came (one short line: when, the host can tell).
    fn new(on: bool) -> Self {
        if on {
            eprintln!("moat guest-init: workspace received");
        }
        Self(on.then(|| (Instant::now(), std::cell::RefCell::new(Vec::new()))))
    }

    fn say(&self, what: &'static str) {
        if let Some((t0, said)) = &self.0 {
            said.borrow_mut().push((t0.elapsed(), what));
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some((_, said)) = &self.0 {
            for (t, what) in said.borrow().iter() {
                eprintln!("moat guest-init: +{} ms: {what}", t.as_millis());
            }
        }
    }
}

/// Files of the root image every workspace's start reads: the system trust store (extended
/// with the workspace CA) and the shell with what it loads. A restored machine has read none
/// of its root disk; read here, before a pool's pause, they are in its page cache at the claim.
const WARM_FILES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "usr/bin/dash",
    "usr/bin/bash",
    "usr/bin/env",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
];

/// Reads [`WARM_FILES`] under `root` once; a file the image lacks is skipped.
fn warm_page_cache(root: &Path) {
    let mut buf = vec![0u8; 64 * 1024];
    for file in WARM_FILES {
        if let Ok(mut f) = std::fs::File::open(root.join(file)) {
            while matches!(std::io::Read::read(&mut f, &mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// The agent's sandbox, before the workspace adds to it (its services' directory hidden, the
/// console as its terminal).
fn agent_sandbox() -> moat_guest_sandbox::SandboxConfig {
    let mut sandbox = moat_guest_sandbox::agent_config(Path::new(AGENT_HOME));
    sandbox.uid_gid = Some((AGENT_ID, AGENT_ID));
    sandbox
}

/// Starts and reaps one process as the agent will be started (forked, confined by the
/// agent's sandbox, `/bin/sh -c :` exec'd, as the agent's uid, in no workspace: before the
/// claim, with nothing of one in the machine) and ignores how it went. A restored machine's
/// memory is the template's, and each page the guest first touches costs the host a fault
/// (nested, an exit): a claim's own start would otherwise pay for every page of the kernel's
/// fork, exec, namespace, Landlock and seccomp paths and of the shell and libc that this
/// touches first.
fn warm_agent_start() {
    use std::os::unix::process::CommandExt;
    let mut config = agent_sandbox();
    config.devices.push(CONSOLE.into());
    let Ok(sandbox) = moat_guest_sandbox::Sandbox::new(&config) else {
        return;
    };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", ":"])
        .env_clear()
        .current_dir(AGENT_HOME)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec; PID 1 has no other thread
    // yet (before the claim: no netstack, no control-stream reader), and `Sandbox::apply`
    // makes only system calls (as for the agent, crate::launch::run_agent).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            crate::launch::close_on_exec_above_stderr()?;
            sandbox
                .apply()
                .map(|_| ())
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
        });
    }
    if let Ok(mut child) = cmd.spawn() {
        let _ = child.wait();
    }
}

/// Memory a warm pool's machine writes once before its pause ([`warm_free_memory`]).
const WARM_MEMORY_BYTES: usize = 16 << 20;

/// Writes [`WARM_MEMORY_BYTES`] of fresh memory once and frees it. A restored machine's memory
/// is the template's, mapped copy-on-write: the first write to each page the guest never
/// wrote before its snapshot costs the host a fault (and, nested, an exit), and a claim's
/// allocations (the agent's process, its page tables, its threads) would pay them. Freed
/// here, these pages are the guest kernel's next to hand out, already the machine's own; they
/// stay private to it, a fixed cost per pooled machine.
fn warm_free_memory() {
    let mut pages = vec![0u8; WARM_MEMORY_BYTES];
    for page in pages.chunks_mut(4096) {
        if let Some(b) = page.first_mut() {
            *b = 1;
        }
    }
    std::hint::black_box(&pages);
}

/// Mounts the root disk (read-only) at `root` and the home disk in it, with fresh /tmp and
/// /run: nothing of a workspace yet, so a warm pool's machine does it before its claim.
fn mount_disks(root: &Path) -> Result<(), InitError> {
    mount_or(
        "the root disk",
        Some(ROOT_DISK),
        root,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None,
    )?;
    mount_or(
        "the home disk",
        Some(HOME_DISK),
        &under(root, AGENT_HOME),
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    rootfs::fresh_tmpfs(root, "/tmp")?;
    rootfs::fresh_tmpfs(root, "/run")?;
    mkdir(&under(root, "/run/moat"))
}

/// Makes the machine ready as far as no workspace is needed: the disks mounted
/// ([`mount_disks`]), the root entered ([`enter_root`]), the trust store and /etc/hosts
/// staged for the workspace's additions ([`stage_identity`]) and the netstack's TUN device
/// up.
fn prepare_machine() -> Result<Prepared, InitError> {
    mount_disks(Path::new(NEW_ROOT))?;
    enter_root()?;
    stage_identity()?;
    let tun = moat_netstack::setup_tun().map_err(InitError::Network)?;
    Ok(Prepared { tun })
}

/// The workspace's trust store: the root image's, to which [`install_identity`] appends the
/// workspace CA; bound over [`CA_BUNDLE`].
const TRUST_STORE: &str = "/run/moat/ca-bundle.crt";
/// The workspace's /etc/hosts, to which [`install_identity`] appends its own name.
const HOSTS: &str = "/run/moat/hosts";

/// Binds over the root's [`CA_BUNDLE`] a copy of it in /run (tmpfs, root's: the agent cannot
/// write it) and over /etc/hosts one that keeps localhost on the loopback; the workspace's
/// CA and name are appended when it comes ([`install_identity`]). Written before a warm
/// pool's claim, the claim writes a few hundred bytes instead of the whole store.
fn stage_identity() -> Result<(), InitError> {
    let system = std::fs::read(CA_BUNDLE).map_err(|e| {
        InitError::Write(
            CA_BUNDLE.into(),
            std::io::Error::new(
                e.kind(),
                format!("the root image has no system trust store to extend: {e}"),
            ),
        )
    })?;
    rootfs::write_trust_store(system, b"", Path::new(TRUST_STORE))?;
    rootfs::bind_trust_store(Path::new("/"), Path::new(TRUST_STORE))?;
    std::fs::write(HOSTS, "127.0.0.1\tlocalhost\n")
        .map_err(|e| InitError::Write(HOSTS.into(), e))?;
    rootfs::bind("/etc/hosts", Path::new(HOSTS), Path::new("/etc/hosts"))
}

/// Gives the entered root the workspace's identity: its CA appended to the trust store, and
/// its own name to /etc/hosts on the loopback (without it, the name would go to the virtual
/// DNS and out as an egress flow).
fn install_identity(workspace: &VmWorkspace) -> Result<(), InitError> {
    let append = |path: &str, text: &str| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| InitError::Write(path.into(), e))
    };
    append(TRUST_STORE, &workspace.ca_pem)?;
    append(HOSTS, &format!("127.0.1.1\t{}\n", workspace.hostname))
}

/// Switches into the mounted root with the virtual DNS over its resolv.conf, the kernel's file
/// systems moved across, a devpts, /dev/shm and cgroup2 of its own. Nothing of a workspace.
fn enter_root() -> Result<(), InitError> {
    let root = Path::new(NEW_ROOT);
    let moat_dir = under(root, "/run/moat");
    let resolv = moat_dir.join("resolv.conf");
    std::fs::write(&resolv, rootfs::resolv_conf())
        .map_err(|e| InitError::Write(resolv.clone(), e))?;
    rootfs::bind_resolv_conf(root, &resolv)?;

    for dir in REPLACED {
        mount_or(
            "a kernel file system into the root",
            Some(*dir),
            &under(root, dir),
            None,
            MsFlags::MS_MOVE,
            None,
        )?;
    }
    switch_into(root)?;

    let dev = PathBuf::from("/dev");
    // gid 5: the root image's tty group, which sshd gives the terminals it allocates.
    rootfs::mount_devpts(&dev, Some(5))?;
    rootfs::link_fds(&dev);
    // POSIX shared memory, as udev would have made it.
    mkdir(&dev.join("shm"))?;
    rootfs::fresh_tmpfs(Path::new("/"), "/dev/shm")?;
    // Read-only, as in the namespace backend; a kernel without cgroup2 still runs the agent.
    if let Err(e) = rootfs::mount_cgroup2() {
        eprintln!(
            "moat guest-init: no cgroup2 tree in the workspace: {}",
            error_chain(&e)
        );
    }
    Ok(())
}

/// switch_root into `root`: the initramfs cannot be pivoted away, so the new root is moved
/// over "/" and entered with chroot.
fn switch_into(root: &Path) -> Result<(), InitError> {
    let enter = |what: &'static str, r: nix::Result<()>| {
        r.map_err(|source| InitError::Mount { what, source })
    };
    enter("the new root", nix::unistd::chdir(root))?;
    mount_or(
        "the new root over /",
        Some("."),
        "/",
        None,
        MsFlags::MS_MOVE,
        None,
    )?;
    enter("the new root (chroot)", nix::unistd::chroot("."))?;
    enter("the new root", nix::unistd::chdir("/"))
}
