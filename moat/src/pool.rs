//! Warm pools of VM workspaces: `moat pool` keeps N machines restored from a template, their
//! RNG reseeded and made ready up to the workspace (guest-init's `prepare`), paused;
//! `moat run --backend vm --pool SOCK` claims one.
//!
//! A pooled machine is nobody's workspace yet: it was restored from a template (taken while
//! guest-init stood by, before anything of a workspace existed), guest-init reseeded its RNG
//! from the host's entropy device and said so, mounted the root and home disks on the pool's
//! `prepare`, and waits on its control stream; the pool then paused its vCPUs. A claim is what
//! makes it a workspace: the claimant (`moat run`) starts its own egress proxy with a new CA,
//! placeholders and audit log on the machine's vsock paths, points the serial console at its
//! own stdout, resumes the machine and sends the workspace on the control stream the pool
//! passes it (SCM_RIGHTS). The pool then only waits: it tells the claimant how moat-vmm
//! exited, and stops the machine if the claimant goes away first. Every machine serves one
//! claim; the pool starts another in its place.
//!
//! The claim protocol, on the pool's Unix socket (mode 0600, the pool's user alone):
//!
//! - claimant: `claim\n`
//! - pool: one JSON line, [`ClaimReply`], with the control stream's descriptor when it is
//!   `claimed` (after a wait while no machine is ready);
//! - pool, when moat-vmm has exited: `exited CODE\n` (-1: killed by a signal);
//! - claimant: closing the connection releases the machine (the pool kills it if it runs).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_guest_init::control::{self, CONTROL_VSOCK_PORT};

use crate::vm_backend;

/// `moat pool`: keep workspaces restored from a template ready to claim.
#[derive(Debug, clap::Args)]
pub(crate) struct PoolArgs {
    /// The template to restore (`moat run --backend vm --snapshot-to DIR`).
    #[arg(long, value_name = "DIR")]
    template: PathBuf,
    /// How many machines to keep ready.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    size: u16,
    /// The socket claims come to (`moat run --backend vm --pool PATH`); created mode 0600.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Size of each machine's fresh home disk, in MiB (sparse: only what is written is used).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    home_disk_mib: u64,
}

/// The pool's answer to a claim.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum ClaimReply {
    /// A machine is the claimant's; its control stream comes with this line.
    Claimed {
        /// The machine's vsock socket path (its guest's flows reach `<uds>_<port>`).
        uds: PathBuf,
        /// moat-vmm's control socket.
        api: PathBuf,
        /// The template's machine.
        mem_mib: u64,
        /// The template's machine.
        vcpus: u8,
    },
    /// No machine: why.
    Refused {
        /// For a person.
        error: String,
    },
}

/// How long a claim waits for a machine before it is refused.
const CLAIM_WAIT: Duration = Duration::from_secs(300);
/// How long a restored machine has, in all, to connect, reseed, prepare and say so (about
/// 4 s in L1, emulated): one that hangs is discarded, its console's end logged, and another
/// restored in its place, rather than holding the pool's claims for minutes.
const PREPARE_WITHIN: Duration = Duration::from_secs(120);
/// How long after a claim the filler leaves the CPU to the claimed machine's start, while
/// the pool still has a ready machine: restoring its replacement at once would compete with
/// it (measured in L1: the claimed guest's own start took twice as long beside a restore).
const REFILL_AFTER: Duration = Duration::from_secs(2);
/// Longest claim request line.
const MAX_REQUEST: u64 = 64;

/// A prepared, paused machine.
#[derive(Debug)]
struct Member {
    vmm: Child,
    dir: PathBuf,
    uds: PathBuf,
    api: PathBuf,
    control: UnixStream,
}

impl Member {
    /// Stops the machine and removes its files.
    fn discard(mut self) {
        let pid = pid_of(&self.vmm);
        kill_if_live(pid);
        forget(pid);
        let _ = self.vmm.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pool's moat-vmm processes not yet reaped. A pid is killed only under this lock and
/// while it is listed, and is unlisted before it is reaped: a kill never reaches a process
/// that reused the pid.
static LIVE: Mutex<Vec<nix::unistd::Pid>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<nix::unistd::Pid>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pid_of(child: &Child) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// SIGKILL to `pid` if it is still one of the pool's unreaped machines.
fn kill_if_live(pid: nix::unistd::Pid) {
    let live = live();
    if live.contains(&pid) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether `pid` (a child) has exited, and its exit code (None inside when by a signal),
/// without reaping it: it stays listed, and its pid its own, until [`forget`] and a wait.
fn exited_unreaped(pid: nix::unistd::Pid) -> Option<Option<i32>> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    match waitid(
        Id::Pid(pid),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) {
        Ok(WaitStatus::Exited(_, code)) => Some(Some(code)),
        Ok(WaitStatus::Signaled(..)) => Some(None),
        _ => None,
    }
}

/// Unlists `pid`, which its caller reaps next.
fn forget(pid: nix::unistd::Pid) {
    live().retain(|p| *p != pid);
}

/// What the claim handlers and the filler share.
#[derive(Debug, Default)]
struct Shared {
    ready: VecDeque<Member>,
    /// Claims served whose machines the filler must replace.
    wanted: usize,
    /// When the last machine was claimed: its start in the guest goes first (see
    /// [`REFILL_AFTER`]).
    last_claim: Option<Instant>,
}

type State = Arc<(Mutex<Shared>, Condvar)>;

fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every machine of the pool is started with.
#[derive(Debug)]
struct Recipe {
    vmm: PathBuf,
    template: PathBuf,
    machine: vm_backend::Template,
    rootfs: PathBuf,
    home_disk_mib: u64,
    dir: PathBuf,
}

/// Runs the pool until SIGTERM or SIGINT.
pub(crate) fn run(args: PoolArgs) -> Result<std::process::ExitCode> {
    let machine = vm_backend::Template::read(&args.template)?;
    let images = vm_backend::find_images().map_err(anyhow::Error::msg)?;
    let vmm = vm_backend::find_vmm().map_err(anyhow::Error::msg)?;
    let template = std::fs::canonicalize(&args.template)
        .with_context(|| format!("cannot resolve {}", args.template.display()))?;
    let dir_template = std::env::temp_dir().join("moat-pool-XXXXXX");
    let dir = nix::unistd::mkdtemp(&dir_template)
        .with_context(|| format!("cannot create a directory like {}", dir_template.display()))?;
    let listener = bind_private(&args.socket)?;
    eprintln!(
        "moat: pool of {} from {} ({} MiB, {} vCPU each) on {}; machines in {}",
        args.size,
        template.display(),
        machine.mem_mib,
        machine.vcpus,
        args.socket.display(),
        dir.display()
    );
    let recipe = Recipe {
        vmm,
        template,
        machine,
        rootfs: images.rootfs,
        home_disk_mib: args.home_disk_mib,
        dir: dir.clone(),
    };
    let state: State = Arc::new((
        Mutex::new(Shared {
            wanted: usize::from(args.size),
            ..Shared::default()
        }),
        Condvar::new(),
    ));
    // Before any thread starts: they inherit the mask, and one thread takes the signals.
    stop_on_signals(&args.socket, &dir)?;
    {
        let state = Arc::clone(&state);
        let machine = recipe.machine.clone();
        std::thread::Builder::new()
            .name("claims".into())
            .spawn(move || serve_claims(&listener, &state, &machine))
            .context("cannot start the claim thread")?;
    }
    // The machines are started from this thread, which lives as long as the pool: a child's
    // parent-death signal fires when the thread that started it ends.
    fill(&recipe, &state)
}

/// Binds `path` for the pool's owner alone (a stale socket there is replaced, nothing else).
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!("a pool already answers on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot replace {}", path.display()))?;
    }
    // Owner-only from the first instant: whoever connects claims a machine.
    moat_private_socket::bind_std(path)
        .with_context(|| format!("cannot listen on {}", path.display()))
}

/// SIGTERM or SIGINT stop the pool: every machine, claimed ones too, is killed, the socket and
/// the pool's directory are removed, and the process exits.
fn stop_on_signals(socket: &Path, dir: &Path) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked here and in every thread started after, taken by the one thread below (children
    // start with an empty mask: std resets it).
    set.thread_block().context("cannot block SIGTERM")?;
    let socket = socket.to_owned();
    let dir = dir.to_owned();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if set.wait().is_ok() {
                let _ = std::fs::remove_file(&socket);
                // Every machine, claimed ones too, killed here (their jails' inner processes
                // follow their parents), and the lock kept: nothing is reaped after this.
                let live = live();
                for pid in live.iter() {
                    let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = std::fs::remove_dir_all(&dir);
                eprintln!("moat: pool stopped");
                std::process::exit(0);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Keeps `wanted` machines coming, one at a time, until the pool stops (the process exits).
fn fill(recipe: &Recipe, state: &State) -> ! {
    let mut seq = 0u64;
    let mut failures = 0u32;
    loop {
        {
            let mut shared = lock(state);
            loop {
                // A claim just made starts first, unless claims wait for a machine.
                let settle = shared
                    .last_claim
                    .and_then(|t| (t + REFILL_AFTER).checked_duration_since(Instant::now()))
                    .filter(|_| !shared.ready.is_empty());
                match settle {
                    Some(left) if shared.wanted > 0 => {
                        shared = state
                            .1
                            .wait_timeout(shared, left)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0;
                    }
                    _ if shared.wanted > 0 => break,
                    _ => {
                        shared = state
                            .1
                            .wait(shared)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
            }
        }
        seq += 1;
        let started = Instant::now();
        match start_member(recipe, seq) {
            Ok(member) => {
                failures = 0;
                let mut shared = lock(state);
                shared.wanted = shared.wanted.saturating_sub(1);
                shared.ready.push_back(member);
                tracing::info!(
                    machine = seq,
                    ready = shared.ready.len(),
                    secs = started.elapsed().as_secs_f64(),
                    "pool machine ready"
                );
                state.1.notify_all();
            }
            Err(e) => {
                failures += 1;
                eprintln!(
                    "moat: pool machine {seq} failed: {}",
                    moat_egress::error_chain(e.as_ref())
                );
                // Do not spin on a broken template or host: back off, up to 30 s.
                let wait = Duration::from_secs(u64::from(failures.min(30)));
                let shared = lock(state);
                let _ = state.1.wait_timeout(shared, wait);
            }
        }
    }
}

/// Restores one machine from the template and prepares it: reseeded, made ready (guest-init
/// does all of a start that is no workspace's), paused.
fn start_member(recipe: &Recipe, seq: u64) -> Result<Member> {
    let dir = recipe.dir.join(format!("m{seq}"));
    let sock_dir = dir.join("sock");
    std::fs::create_dir_all(&sock_dir)
        .with_context(|| format!("cannot create {}", sock_dir.display()))?;
    let uds = sock_dir.join("vsock");
    let api = dir.join("vmm-api.sock");
    let console = dir.join("console.log");
    let home = dir.join("home.ext4");
    let prepared = (|| {
        vm_backend::make_home_disk(&home, recipe.home_disk_mib)?;
        let control_path = moat_egress::port_path(&uds, CONTROL_VSOCK_PORT);
        let listener = UnixListener::bind(&control_path)
            .with_context(|| format!("cannot listen on {}", control_path.display()))?;
        if nix::unistd::geteuid().is_root() {
            vm_backend::hand_sockets_to_jail(&uds, &[&control_path])?;
        }
        let mut cmd = Command::new(&recipe.vmm);
        cmd.arg("--jail-dir")
            .arg(dir.join("jail"))
            .arg("--restore")
            .arg(&recipe.template)
            .arg("--api-sock")
            .arg(&api)
            .arg("--mem")
            .arg(recipe.machine.mem_mib.to_string())
            .arg("--vcpus")
            .arg(recipe.machine.vcpus.to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--block-ro")
            .arg(&recipe.rootfs)
            .arg("--block")
            .arg(&home)
            .arg("--rng")
            .args(["--serial-in", "off", "--serial-out"])
            .arg(&console);
        vm_backend::die_with_parent(&mut cmd);
        let vmm = {
            // Listed as it starts: a stop meanwhile finds it.
            let mut live = live();
            let vmm = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", recipe.vmm.display()))?;
            live.push(pid_of(&vmm));
            vmm
        };
        let mut member = Member {
            vmm,
            dir: dir.clone(),
            uds: uds.clone(),
            api: api.clone(),
            // Replaced by the guest's connection below.
            control: UnixStream::pair()?.0,
        };
        match prepare(&mut member, &listener) {
            Ok(()) => Ok(member),
            Err(e) => {
                member.discard();
                Err(e)
            }
        }
    })();
    if let Err(e) = prepared {
        let tail = std::fs::read_to_string(&console).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        if tail.is_empty() {
            return Err(e);
        }
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(e.context(format!("its console ended:\n{}", tail.join("\n"))));
    }
    prepared
}

/// Waits for the restored guest's control connection, checks it reseeded, has it mount its
/// disks, and pauses it.
fn prepare(member: &mut Member, listener: &UnixListener) -> Result<()> {
    let deadline = Instant::now() + PREPARE_WITHIN;
    listener.set_nonblocking(true)?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("cannot accept the guest's control stream"),
        }
        if let Some(code) = exited_unreaped(pid_of(&member.vmm)) {
            bail!(
                "moat-vmm stopped before the guest connected ({})",
                vm_backend::vmm_exit_meaning(code)
            );
        }
        if Instant::now() >= deadline {
            bail!("the restored guest did not connect within {PREPARE_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    stream.set_nonblocking(false)?;
    // Each read gets what is left of the one deadline.
    let left = || {
        Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        )
    };
    stream.set_read_timeout(left())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    vm_backend::check_reseeded(&mut reader)?;
    (&stream).write_all(&control::encode(&control::VmStandby::Prepare))?;
    stream.set_read_timeout(left())?;
    let line = control::read_line(&mut reader).context("the guest did not prepare")?;
    if control::parse::<control::VmStandingBy>(&line).ok() != Some(control::VmStandingBy::Prepared)
    {
        bail!(
            "the guest answered prepare with {:?}",
            String::from_utf8_lossy(&line)
        );
    }
    stream.set_read_timeout(None)?;
    vm_backend::vmm_call(&member.api, "pause\n", None)?;
    member.control = stream;
    Ok(())
}

/// Answers claims, each on a thread of its own.
fn serve_claims(listener: &UnixListener, state: &State, machine: &vm_backend::Template) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let state = Arc::clone(state);
        let machine = machine.clone();
        let spawned = std::thread::Builder::new()
            .name("claim".into())
            .spawn(move || {
                if let Err(e) = serve_claim(&conn, &state, &machine) {
                    tracing::warn!(error = %moat_egress::error_chain(e.as_ref()), "a claim failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve a claim");
        }
    }
}

/// Takes the next ready machine, waiting up to `within`.
fn take_ready(state: &State, within: Duration) -> Option<Member> {
    let deadline = Instant::now() + within;
    let mut shared = lock(state);
    loop {
        if let Some(m) = shared.ready.pop_front() {
            shared.wanted += 1;
            shared.last_claim = Some(Instant::now());
            state.1.notify_all();
            return Some(m);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        shared = state
            .1
            .wait_timeout(shared, left)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

fn serve_claim(conn: &UnixStream, state: &State, machine: &vm_backend::Template) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    BufReader::new(conn)
        .take(MAX_REQUEST)
        .read_until(b'\n', &mut line)?;
    if line != b"claim\n" {
        send_reply(
            conn,
            &ClaimReply::Refused {
                error: "unknown request (claim)".into(),
            },
            None,
        )?;
        return Ok(());
    }
    let Some(mut member) = take_ready(state, CLAIM_WAIT) else {
        send_reply(
            conn,
            &ClaimReply::Refused {
                error: format!(
                    "no machine became ready within {CLAIM_WAIT:?} (see the pool's log)"
                ),
            },
            None,
        )?;
        return Ok(());
    };
    let reply = ClaimReply::Claimed {
        uds: member.uds.clone(),
        api: member.api.clone(),
        mem_mib: machine.mem_mib,
        vcpus: machine.vcpus,
    };
    if let Err(e) = send_reply(conn, &reply, Some(&member.control)) {
        member.discard();
        return Err(e);
    }
    tracing::info!(machine = %member.dir.display(), "pool machine claimed");
    // From here the machine is the claimant's: tell it when moat-vmm exits, and stop the
    // machine when the claimant goes away first.
    conn.set_read_timeout(None)?;
    let pid = pid_of(&member.vmm);
    let watcher = conn.try_clone()?;
    std::thread::Builder::new()
        .name("claimant".into())
        .spawn(move || {
            let mut sink = [0u8; 64];
            // Returns at EOF (the claimant closed or died) or when the pool shuts the
            // connection after moat-vmm's exit.
            while matches!((&watcher).read(&mut sink), Ok(n) if n > 0) {}
            kill_if_live(pid);
        })
        .context("cannot watch the claimant")?;
    // Waits for the exit without reaping: the pid stays moat-vmm's until it is unlisted.
    let _ = nix::sys::wait::waitid(
        nix::sys::wait::Id::Pid(pid),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
    );
    forget(pid);
    let status = member.vmm.wait();
    let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
    let _ = (&*conn).write_all(format!("exited {code}\n").as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = std::fs::remove_dir_all(&member.dir);
    Ok(())
}

fn send_reply(conn: &UnixStream, reply: &ClaimReply, fd: Option<&UnixStream>) -> Result<()> {
    let line = control::encode(reply);
    let iov = [std::io::IoSlice::new(&line)];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<nix::sys::socket::ControlMessage<'_>> = fds
        .as_ref()
        .map(|f| vec![nix::sys::socket::ControlMessage::ScmRights(f)])
        .unwrap_or_default();
    let sent = nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .context("cannot answer the claim")?;
    if sent != line.len() {
        bail!("the claim's answer was cut short");
    }
    Ok(())
}

/// A machine claimed from a pool: the claimant's until it closes `conn`.
#[derive(Debug)]
pub(crate) struct Claimed {
    /// The claim's connection: `exited CODE` comes on it.
    pub(crate) conn: UnixStream,
    /// The machine's vsock socket path.
    pub(crate) uds: PathBuf,
    /// moat-vmm's control socket.
    pub(crate) api: PathBuf,
    /// The guest's control stream, past its `prepared`.
    pub(crate) control: UnixStream,
    /// The template's machine.
    pub(crate) mem_mib: u64,
    /// The template's machine.
    pub(crate) vcpus: u8,
}

/// Claims a machine from the pool at `socket`.
pub(crate) fn claim(socket: &Path) -> Result<Claimed> {
    let conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach a pool on {} (start one with `moat pool --template DIR --socket {}`)",
            socket.display(),
            socket.display()
        )
    })?;
    (&conn).write_all(b"claim\n")?;
    // The answer waits for a ready machine; say so when that takes a while.
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut said = false;
    let deadline = Instant::now() + CLAIM_WAIT + Duration::from_secs(30);
    let (n, fd) = loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        match nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fd = None;
                for c in msg.cmsgs()? {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                        for raw in fds {
                            // SAFETY: SCM_RIGHTS just gave this process `raw`; nothing else owns it.
                            #[allow(unsafe_code)]
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            fd.get_or_insert(owned);
                        }
                    }
                }
                break (msg.bytes, fd);
            }
            Err(nix::Error::EAGAIN | nix::Error::EINTR) if Instant::now() < deadline => {
                if !said {
                    eprintln!("moat: waiting for a ready machine from the pool");
                    said = true;
                }
            }
            Err(e) => return Err(e).context("the pool did not answer the claim"),
        }
    };
    let text = buf.get(..n).unwrap_or_default();
    let line = text
        .strip_suffix(b"\n")
        .context("the pool closed the claim unanswered")?;
    match control::parse::<ClaimReply>(line)? {
        ClaimReply::Refused { error } => bail!("the pool refused the claim: {error}"),
        ClaimReply::Claimed {
            uds,
            api,
            mem_mib,
            vcpus,
        } => {
            let fd = fd.context("the pool's answer came without the control stream")?;
            conn.set_read_timeout(None)?;
            Ok(Claimed {
                conn,
                uds,
                api,
                control: UnixStream::from(fd),
                mem_mib,
                vcpus,
            })
        }
    }
}

impl Claimed {
    /// Waits for the pool's word that moat-vmm exited; its exit code (None: killed, or the
    /// pool went away).
    pub(crate) fn wait(&self) -> Option<i32> {
        let mut line = String::new();
        BufReader::new(&self.conn).read_line(&mut line).ok()?;
        line.trim_end()
            .strip_prefix("exited ")?
            .parse()
            .ok()
            .filter(|c| *c >= 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_round_trips_and_a_refusal_is_not_a_claim() {
        let reply = ClaimReply::Claimed {
            uds: "/tmp/p/m1/sock/vsock".into(),
            api: "/tmp/p/m1/vmm-api.sock".into(),
            mem_mib: 512,
            vcpus: 1,
        };
        let line = control::encode(&reply);
        let parsed: ClaimReply = control::parse(&line[..line.len() - 1]).unwrap();
        assert!(matches!(parsed, ClaimReply::Claimed { mem_mib: 512, .. }));
        let refused = control::encode(&ClaimReply::Refused {
            error: "none".into(),
        });
        assert!(matches!(
            control::parse::<ClaimReply>(&refused[..refused.len() - 1]).unwrap(),
            ClaimReply::Refused { .. }
        ));
    }

    #[test]
    fn a_pool_socket_is_the_owners_alone_and_never_replaces_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sock");
        let listener = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live pool is not replaced.
        let err = bind_private(&path).unwrap_err().to_string();
        assert!(err.contains("already answers"), "{err}");
        drop(listener);
        // A stale socket is.
        bind_private(&path).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = bind_private(&file).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn an_exited_machine_is_seen_without_being_reaped() {
        let mut child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = pid_of(&child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(code) = exited_unreaped(pid) {
                break code;
            }
            assert!(Instant::now() < deadline, "sh -c 'exit 3' never exited");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(code, Some(3));
        // Still ours to reap: its pid cannot have gone to another process meanwhile.
        assert_eq!(child.wait().unwrap().code(), Some(3));
    }

    #[test]
    fn a_claim_without_a_pool_says_how_to_start_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = claim(&dir.path().join("none.sock")).unwrap_err();
        assert!(
            format!("{err:#}").contains("moat pool --template"),
            "{err:#}"
        );
    }

    #[test]
    fn a_claim_gets_the_machine_and_its_control_stream_then_the_exit() {
        // The pool's side of one claim, with a stand-in machine (a sleeping child process) and
        // a socket pair as its control stream: the descriptor passing and the exit report are
        // what is tested here; the machines themselves in moat/tests/vm_snapshot.rs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sock");
        let listener = bind_private(&path).unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let member = Member {
            vmm: Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap(),
            dir: dir.path().join("m1"),
            uds: dir.path().join("m1/sock/vsock"),
            api: dir.path().join("m1/vmm-api.sock"),
            control: host,
        };
        let state: State = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        lock(&state).ready.push_back(member);
        let server = {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                let (conn, _) = listener.accept().unwrap();
                serve_claim(
                    &conn,
                    &state,
                    &vm_backend::Template {
                        mem_mib: 256,
                        vcpus: 1,
                    },
                )
                .unwrap();
            })
        };
        let claimed = claim(&path).unwrap();
        assert_eq!(claimed.mem_mib, 256);
        assert_eq!(claimed.uds, dir.path().join("m1/sock/vsock"));
        // The descriptor is the guest's stream's other end.
        (&claimed.control).write_all(b"ping\n").unwrap();
        let mut got = String::new();
        BufReader::new(&guest).read_line(&mut got).unwrap();
        assert_eq!(got, "ping\n");
        assert_eq!(claimed.wait(), Some(7));
        server.join().unwrap();
        // The claim asked for a replacement.
        assert_eq!(lock(&state).wanted, 1);
    }
}
