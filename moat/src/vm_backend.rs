//! The vm backend of `moat run`: the workspace in a microVM booted by moat-vmm.
//!
//! The host side: the egress proxy (already up, on `<uds>_1025`), the process-event socket
//! (`<uds>_1026`) and the control socket (`<uds>_1027`, here) all live in the run directory;
//! moat-vmm's vsock device maps the guest's connections to host port P onto `<uds>_P`. The
//! VM gets the kernel and initramfs built by `cargo xtask images`, the root image read-only
//! and a home disk read-write; its serial console is this terminal.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_guest_init::control::{self, CONTROL_VSOCK_PORT, VmOutcome, VmSignal, VmWorkspace};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The images the VM boots (`current.toml`, written by `cargo xtask images`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VmImages {
    pub(crate) kernel: PathBuf,
    /// The kernel with PCI and MSI, for VMs with a GPU (`cargo xtask images kernel-gpu`).
    #[serde(default)]
    pub(crate) kernel_gpu: Option<PathBuf>,
    pub(crate) initramfs: PathBuf,
    pub(crate) rootfs: PathBuf,
    /// The same root image as a directory: the namespace backend's root ([`find_root_dir`]).
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "named here so that the manifest stays strict; read by find_root_dir"
    )]
    pub(crate) rootfs_dir: Option<PathBuf>,
}

/// Where `cargo xtask images` put its images: `$MOAT_IMAGES`, else `target/moat-images` beside
/// the directory holding this binary (`target/debug/moat` -> `target/moat-images`).
fn images_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MOAT_IMAGES") {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("moat-images"))
}

/// The images to boot, or why there are none.
pub(crate) fn find_images() -> Result<VmImages, String> {
    let dir = images_dir().ok_or("cannot tell where the VM images are")?;
    let current = dir.join("current.toml");
    let text = std::fs::read_to_string(&current).map_err(|_| {
        format!(
            "no VM images in {} (build them with `cargo xtask images`, about 10 minutes)",
            dir.display()
        )
    })?;
    let images: VmImages = toml::from_str(&text).map_err(|e| {
        format!(
            "{} is incomplete (run `cargo xtask images`): {e}",
            current.display()
        )
    })?;
    for p in [&images.kernel, &images.initramfs, &images.rootfs] {
        if !p.is_file() {
            return Err(format!(
                "VM image {} is missing (run `cargo xtask images`)",
                p.display()
            ));
        }
    }
    Ok(images)
}

/// The root image as a directory (`rootfs_dir` in `current.toml`), the namespace backend's
/// default root; or why there is none. Read on its own: a host without a kernel built still
/// has one.
pub(crate) fn find_root_dir() -> Result<PathBuf, String> {
    #[derive(serde::Deserialize)]
    struct RootOnly {
        rootfs_dir: Option<PathBuf>,
    }
    let dir = images_dir().ok_or("cannot tell where the images are")?;
    let current = dir.join("current.toml");
    let text = std::fs::read_to_string(&current)
        .map_err(|_| format!("no root image is built (no {})", current.display()))?;
    let found: RootOnly =
        toml::from_str(&text).map_err(|e| format!("{} is unreadable: {e}", current.display()))?;
    match found.rootfs_dir {
        Some(p) if p.is_dir() => Ok(p),
        Some(p) => Err(format!("the root image {} is missing", p.display())),
        None => Err(format!(
            "{} names no root image directory (it predates them)",
            current.display()
        )),
    }
}

/// moat-vmm, beside this binary (`cargo build -p moat-vmm` puts it there).
pub(crate) fn find_vmm() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let vmm = exe.with_file_name("moat-vmm");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(format!(
            "{} is not built (cargo build -p moat-vmm)",
            vmm.display()
        ))
    }
}

/// The kernel command line. moat-vmm adds its virtio-mmio devices itself.
pub(crate) fn cmdline(boot_log: bool) -> String {
    // reboot=k: guest-init's reboot(2) pulses the i8042 reset line, moat-vmm's shutdown path.
    // panic=-1: a kernel panic resets at once (and guest-init's missing report says so).
    let mut c = String::from("console=ttyS0 reboot=k panic=-1 rdinit=/init");
    if !boot_log {
        c.push_str(" quiet");
    }
    // On nested PVM moat-vmm adds what that host cannot emulate (vmm/README.md, CPUID).
    c
}

/// What the VM run needs from `moat run`.
pub(crate) struct VmRun<'a> {
    pub(crate) images: VmImages,
    pub(crate) vmm: PathBuf,
    pub(crate) run_dir: &'a Path,
    pub(crate) uds: &'a Path,
    pub(crate) home_disk: Option<PathBuf>,
    pub(crate) mem_mib: u64,
    pub(crate) vcpus: u8,
    pub(crate) boot_log: bool,
    /// Host PCI devices passed through with VFIO (moat-vmm `--gpu`; docs/gpu.md).
    pub(crate) gpus: Vec<String>,
    /// Boot, make a template, or start from one.
    pub(crate) mode: VmMode,
    /// moat-vmm's control socket for this workspace (`--api-sock`): pause, resume, snapshot.
    pub(crate) api_sock: Option<PathBuf>,
    pub(crate) workspace: VmWorkspace,
}

/// How the VM starts.
#[derive(Debug)]
pub(crate) enum VmMode {
    /// Boot the kernel and run the workspace.
    Boot,
    /// Boot, and snapshot the VM into this directory once guest-init stands by; no workspace.
    Template(PathBuf),
    /// Restore the template in this directory and run the workspace.
    Restore(PathBuf),
    /// Run the workspace in a machine claimed from a warm pool (`moat pool`): restored,
    /// reseeded, disks mounted, paused.
    Claim(Box<crate::pool::Claimed>),
}

/// What a template records beside moat-vmm's snapshot: the machine a restore must configure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Template {
    pub(crate) mem_mib: u64,
    pub(crate) vcpus: u8,
}

/// The template's own file in its directory (moat-vmm's are `state` and `memory`).
const TEMPLATE_FILE: &str = "moat-template.toml";

impl Template {
    /// Reads the template in `dir`.
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TEMPLATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a template (make one with `moat run --backend vm --snapshot-to DIR`)",
                dir.display()
            )
        })?;
        toml::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TEMPLATE_FILE);
        let text = toml::to_string(self).context("cannot encode the template")?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A generation for a restored workspace: any number but 0 (a booted machine), unlikely to
/// repeat between restores of one template.
pub(crate) fn new_generation() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = u64::try_from(t.as_nanos() & u128::from(u64::MAX))
            .unwrap_or(1)
            .to_le_bytes();
    }
    u64::from_le_bytes(b).max(1)
}

/// The few requests `moat run` makes on moat-vmm's control socket (its protocol:
/// vmm/src/api.rs): pause, then snapshot, the two files' descriptors passed with
/// SCM_RIGHTS so that the jailed VMM writes where this process opened them.
fn vmm_request(
    conn: &std::os::unix::net::UnixStream,
    line: &str,
    fd: Option<&std::fs::File>,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let iov = [std::io::IoSlice::new(line.as_bytes())];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<nix::sys::socket::ControlMessage<'_>> = fds
        .as_ref()
        .map(|f| vec![nix::sys::socket::ControlMessage::ScmRights(f)])
        .unwrap_or_default();
    nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .with_context(|| format!("cannot send {:?} to moat-vmm", line.trim()))?;
    Ok(())
}

/// One request on moat-vmm's control socket at `api`, answered.
pub(crate) fn vmm_call(api: &Path, line: &str, fd: Option<&std::fs::File>) -> Result<()> {
    let conn = std::os::unix::net::UnixStream::connect(api)
        .with_context(|| format!("cannot reach moat-vmm's control socket {}", api.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    vmm_request(&conn, line, fd)?;
    vmm_answer(&mut reader)
}

fn vmm_answer(reader: &mut impl std::io::BufRead) -> Result<()> {
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("moat-vmm did not answer on its control socket")?;
    match answer.trim_end() {
        "OK" => Ok(()),
        other => bail!("moat-vmm: {}", other.strip_prefix("ERR ").unwrap_or(other)),
    }
}

/// Pauses the VM behind `api` and snapshots it into `dir` (`state`, `memory`, mode 0600).
fn snapshot_vm(api: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))
    };
    let (state, memory) = (open("state")?, open("memory")?);
    let conn = std::os::unix::net::UnixStream::connect(api)
        .with_context(|| format!("cannot reach moat-vmm's control socket {}", api.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    vmm_request(&conn, "pause\n", None)?;
    vmm_answer(&mut reader)?;
    vmm_request(&conn, "snapshot\n", Some(&state))?;
    vmm_request(&conn, "memory\n", Some(&memory))?;
    vmm_answer(&mut reader)
}

/// This terminal's size (rows, columns), or (0, 0) when stdin is not a terminal.
pub(crate) fn terminal_size() -> (u16, u16) {
    use std::os::fd::AsRawFd;
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which is valid for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        nix::libc::ioctl(
            std::io::stdin().as_raw_fd(),
            nix::libc::TIOCGWINSZ,
            std::ptr::addr_of_mut!(ws),
        )
    };
    if rc == 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (0, 0)
    }
}

/// Creates a fresh, sparse ext4 home disk whose root directory belongs to the agent.
pub(crate) fn make_home_disk(path: &Path, size_mib: u64) -> Result<()> {
    let id = moat_guest_init::vm::AGENT_ID;
    // Captured: stdout is the agent's (mke2fs says "Creating regular file" even with -q).
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "moat-home", "-E"])
        .arg(format!("root_owner={id}:{id}"))
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .context("cannot run mkfs.ext4 (Debian: apt-get install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 {} failed ({}): {}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where the guest's control stream comes from.
#[derive(Debug)]
enum ControlSource {
    /// The machine connects here; a restored one first says it reseeded its RNG.
    Listener {
        listener: tokio::net::UnixListener,
        restored: bool,
    },
    /// A pool's machine: connected, reseeded and prepared before its claim.
    Stream(tokio::net::UnixStream),
}

/// This host's wall clock, for the guest to take ([`VmWorkspace::realtime_ns`]).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Serves the control stream: the guest gets the workspace, then every signal from `signals`
/// (SIGTERM, SIGHUP to `moat run`, for the agent); its one answer is the outcome. From a
/// listener, a later connection that asks to reattach ([`control::VmReattach`]: guest-init,
/// after a snapshot reset the VM's vsock transport) takes the stream's place, and signals sent
/// meanwhile go on it; any other is closed unanswered. (A pool's machine has no listener here:
/// its control socket is the pool's.)
async fn serve_control(
    source: ControlSource,
    workspace: VmWorkspace,
    outcome: Arc<Mutex<Option<VmOutcome>>>,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<VmSignal>,
) {
    let (conn_tx, mut conns) = tokio::sync::mpsc::channel(1);
    let (stream, restored) = match source {
        ControlSource::Stream(s) => (s, false),
        ControlSource::Listener { listener, restored } => {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => {
                            if conn_tx.send(s).await.is_err() {
                                return;
                            }
                        }
                        // Out of descriptors and the like: do not spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
            (stream, restored)
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    if restored {
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(60),
            (&mut reader).take(1024).read_until(b'\n', &mut line),
        )
        .await;
        let checked = match read {
            Ok(Ok(_)) => check_reseeded(&mut std::io::Cursor::new(line)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow::anyhow!(
                "no word from the restored guest within 60 s"
            )),
        };
        if let Err(e) = checked {
            let error = moat_egress::error_chain(e.as_ref());
            tracing::error!(%error, "refusing the restored machine");
            if let Ok(mut slot) = outcome.lock() {
                *slot = Some(VmOutcome::Failed { error });
            }
            return;
        }
    }
    let workspace = VmWorkspace {
        realtime_ns: realtime_ns(),
        ..workspace
    };
    if let Err(e) = write.write_all(&control::encode(&workspace)).await {
        tracing::warn!(error = %e, "cannot send the workspace to the guest");
        return;
    }
    tracing::debug!("workspace sent to the guest");
    let mut reader = reader.take(control::MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    // Whether `reader` and `write` are a live stream; signals wait in `held` while not.
    let mut live = true;
    let mut held = Vec::new();
    loop {
        tokio::select! {
            read = reader.read_until(b'\n', &mut line), if live => match read {
                Ok(_) if line.last() == Some(&b'\n') => {
                    line.pop();
                    match control::parse::<VmOutcome>(&line) {
                        Ok(o) => {
                            if let Ok(mut slot) = outcome.lock() {
                                *slot = Some(o);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "the guest's outcome line is malformed"),
                    }
                    return;
                }
                // A snapshot resets the guest's vsock transport: guest-init reattaches.
                Ok(_) => {
                    tracing::info!("the control stream ended without an outcome");
                    live = false;
                }
                Err(e) => {
                    tracing::info!(error = %e, "the control stream failed");
                    live = false;
                }
            },
            Some(conn) = conns.recv() => match reattached(conn).await {
                Ok((r, w)) => {
                    (reader, write, live) = (r, w, true);
                    line.clear();
                    eprintln!(
                        "moat: the VM's control stream was reset (a snapshot) and guest-init \
                         reattached it"
                    );
                    for signal in held.drain(..) {
                        if let Err(e) = write.write_all(&control::encode(&signal)).await {
                            tracing::warn!(error = %e, "cannot pass a signal on to the guest");
                        }
                    }
                }
                Err(why) => tracing::warn!(%why, "a control connection from the guest was refused"),
            },
            Some(signal) = signals.recv() => {
                if !live {
                    held.push(signal);
                } else if let Err(e) = write.write_all(&control::encode(&signal)).await {
                    tracing::warn!(error = %e, "cannot pass a signal on to the guest");
                    held.push(signal);
                }
            }
            else => return,
        }
    }
}

/// The control stream's reading side: lines of at most [`control::MAX_LINE`] bytes.
type ControlReader = tokio::io::Take<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>;

fn control_reader(read: tokio::net::unix::OwnedReadHalf) -> ControlReader {
    tokio::io::BufReader::new(read).take(control::MAX_LINE as u64 + 1)
}

/// A later guest connection, if it is guest-init asking to reattach (within 10 s): answered,
/// and handed back as the control stream.
async fn reattached(
    conn: tokio::net::UnixStream,
) -> Result<(ControlReader, tokio::net::unix::OwnedWriteHalf), String> {
    let (read, mut write) = conn.into_split();
    let mut reader = control_reader(read);
    let mut line = Vec::new();
    let asked = tokio::time::timeout(
        Duration::from_secs(10),
        (&mut reader).take(256).read_until(b'\n', &mut line),
    )
    .await;
    match asked {
        Ok(Ok(_)) if line.last() == Some(&b'\n') => {}
        Ok(Ok(_)) => return Err("it closed before a line".to_owned()),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("it said nothing within 10 s".to_owned()),
    }
    control::parse::<control::VmReattach>(&line[..line.len() - 1])
        .map_err(|_| "it did not ask to reattach".to_owned())?;
    write
        .write_all(&control::encode(&control::VmReattached::Reattached))
        .await
        .map_err(|e| e.to_string())?;
    Ok((reader, write))
}

/// Serves a template VM's control socket: tells guest-init to stand by and reports on `ready`
/// once it does (it then waits on the stream, which the snapshot keeps).
async fn serve_template(listener: tokio::net::UnixListener, ready: std::sync::mpsc::Sender<()>) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = write
        .write_all(&control::encode(&control::VmStandby::Standby))
        .await
    {
        tracing::warn!(error = %e, "cannot tell the guest to stand by");
        return;
    }
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(1024);
    if reader.read_until(b'\n', &mut line).await.is_ok()
        && line.last() == Some(&b'\n')
        && control::parse::<control::VmStandingBy>(&line[..line.len() - 1]).is_ok()
    {
        let _ = ready.send(());
    }
    // Keep the stream open: guest-init's wait on it is what the snapshot holds.
    std::future::pending::<()>().await;
}

/// Waits for the template VM to stand by, snapshots it into `dir` with the machine's
/// description, and stops it.
fn make_template(
    vmm: &mut std::process::Child,
    ready: &std::sync::mpsc::Receiver<()>,
    api: &Path,
    dir: &Path,
    template: &Template,
) -> Result<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if ready.try_recv().is_ok() {
            break;
        }
        if let Some(status) = vmm.try_wait()? {
            bail!(
                "the template VM stopped before guest-init stood by (moat-vmm: {}); rerun with --boot-log",
                vmm_exit_meaning(status.code())
            );
        }
        if std::time::Instant::now() >= deadline {
            let _ = vmm.kill();
            bail!("guest-init did not stand by within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let taken = snapshot_vm(api, dir).and_then(|()| template.write(dir));
    let _ = vmm.kill();
    let _ = vmm.wait();
    taken?;
    eprintln!("moat: template written to {}", dir.display());
    Ok(0)
}

/// How long the agent has to end after `moat run` got SIGTERM before the VM is stopped.
const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// The uid and gid moat-vmm's jail runs as when started by root (its default).
const JAIL_ID: u32 = 65534;

/// As root, the jailed VMM (uid and gid 65534) must reach the host-side sockets its guest
/// connects to. The socket directory and the `sockets` in it (the proxy's, the audit and the
/// control sockets) get the jail's group, with group access only: the jail may traverse the
/// directory and connect, but neither rename nor remove anything. The run directory above
/// stays 0700 root, so no one else on the host reaches them.
pub(crate) fn hand_sockets_to_jail(uds: &Path, sockets: &[&Path]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = uds.parent().context("socket path without a directory")?;
    for (path, mode) in std::iter::once((dir, 0o710)).chain(sockets.iter().map(|s| (*s, 0o660))) {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(JAIL_ID)))
            .map_err(std::io::Error::from)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .with_context(|| format!("cannot hand {} to the VMM's jail", path.display()))?;
    }
    Ok(())
}

/// The guest-side sockets of a workspace's host: the egress proxy's and the audit socket.
fn workspace_sockets(uds: &Path) -> [PathBuf; 2] {
    [
        moat_egress::port_path(uds, moat_guest_init::control::EGRESS_VSOCK_PORT),
        moat_egress::port_path(uds, moat_guest_init::control::AUDIT_VSOCK_PORT),
    ]
}

/// The VM dies with the process (the thread) that started it, whichever way that ends:
/// nothing in it may outlive its proxy.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// Reads a restored guest's first line, which must say it reseeded its RNG
/// ([`control::VmRestored`]); a machine that does not gets no workspace.
pub(crate) fn check_reseeded(reader: &mut impl std::io::BufRead) -> Result<()> {
    let line = control::read_line(reader)
        .context("the restored guest did not say it reseeded its RNG; it gets no workspace")?;
    match control::parse::<control::VmRestored>(&line) {
        Ok(control::VmRestored::Reseeded { bytes }) if bytes >= 32 => Ok(()),
        Ok(control::VmRestored::Reseeded { bytes }) => bail!(
            "the restored guest reseeded its RNG with only {bytes} bytes; it gets no workspace"
        ),
        Err(_) => bail!(
            "the restored guest's first line was not that it reseeded its RNG ({:?}); it gets \
             no workspace",
            String::from_utf8_lossy(&line)
                .chars()
                .take(80)
                .collect::<String>()
        ),
    }
}

/// Checks where `--api-sock` will be bound before anything starts: a directory that exists,
/// and nothing there but perhaps a stale socket (moat-vmm replaces one).
pub(crate) fn check_api_sock(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--api-sock {}: {} is not a directory",
            path.display(),
            dir.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "--api-sock {}: it exists and is not a socket (nothing is replaced but a stale socket)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Removes the control socket moat-vmm left (if it is still a socket).
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// What moat-vmm's exit code means (vmm/src/exit.rs).
pub(crate) fn vmm_exit_meaning(code: Option<i32>) -> &'static str {
    match code {
        Some(0) => "the guest reset the machine",
        Some(1) => "a VMM error",
        Some(2) => "bad VMM arguments",
        Some(3) => "the guest crashed",
        Some(4) => "the VMM's time limit",
        Some(5) => "the guest halted",
        _ => "killed by a signal",
    }
}

/// The kernel to boot: the GPU kernel (PCI, MSI) when devices are passed through.
fn kernel_for(images: &VmImages, gpus: &[String]) -> Result<PathBuf> {
    if gpus.is_empty() {
        return Ok(images.kernel.clone());
    }
    match &images.kernel_gpu {
        Some(k) if k.is_file() => Ok(k.clone()),
        _ => bail!(
            "--gpu needs the guest kernel with PCI and MSI: build it with \
             `cargo xtask images kernel-gpu` (and check the host with `moat doctor --gpu ...`)"
        ),
    }
}

/// The running VM: moat-vmm as this process's child, or a machine claimed from a pool.
#[derive(Debug)]
enum Running {
    Child(std::process::Child),
    Claimed(Box<crate::pool::Claimed>),
}

/// How a stop reaches the running VM from the SIGTERM task.
#[derive(Debug)]
enum Stopper {
    /// SIGTERM to moat-vmm (it restores the terminal on its way out), SIGKILL 5 s later.
    Pid(nix::unistd::Pid),
    /// Closing the claim: the pool kills the machine.
    Claim(std::os::unix::net::UnixStream),
}

impl Stopper {
    async fn stop(self) {
        match self {
            Self::Pid(pid) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            Self::Claim(conn) => {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Running {
    fn stopper(&self) -> Result<Stopper> {
        Ok(match self {
            Self::Child(c) => Stopper::Pid(nix::unistd::Pid::from_raw(
                i32::try_from(c.id()).unwrap_or(i32::MAX),
            )),
            Self::Claimed(c) => Stopper::Claim(c.conn.try_clone()?),
        })
    }

    /// Waits for the VM to end; moat-vmm's exit code (None: by a signal).
    fn wait(self) -> Result<Option<i32>> {
        match self {
            Self::Child(mut c) => Ok(c.wait()?.code()),
            Self::Claimed(c) => Ok(c.wait()),
        }
    }
}

/// Takes over a machine claimed from a pool: its console goes to this process's standard
/// output from now on (the agent's output is ours), and it runs again. Done as soon as it is
/// claimed: the guest wakes while this process builds the workspace's proxy, and waits on its
/// control stream for the workspace.
pub(crate) fn take_over(claimed: &crate::pool::Claimed) -> Result<()> {
    let stdout = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    vmm_call(&claimed.api, "console\n", Some(&stdout))
        .and_then(|()| vmm_call(&claimed.api, "resume\n", None))
        .context("cannot take over the pool's machine")?;
    tracing::debug!("the pool's machine resumed");
    Ok(())
}

/// The claimant's terminal in raw mode while it drives a pool machine's console (moat-vmm
/// does this itself for a VM it starts, `vmm/src/terminal.rs`, with the same flags); put back
/// exactly as it was when dropped. Signals do not skip that: with ISIG off no key sends one,
/// and SIGTERM, SIGHUP, SIGINT and SIGQUIT to moat are caught before raw mode starts
/// ([`Signals::listen`]) and end the run normally.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Raw input (no line editing, echo or signal keys; Enter as CR, as a serial terminal
    /// sends it; each byte as it comes); output processing kept, so the guest's `\n` still
    /// starts a new line.
    fn enter() -> Result<Self> {
        use nix::sys::termios::{
            InputFlags, LocalFlags, SetArg, SpecialCharacterIndices, tcgetattr, tcsetattr,
        };
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.local_flags.remove(
            LocalFlags::ICANON
                | LocalFlags::ECHO
                | LocalFlags::ECHONL
                | LocalFlags::ISIG
                | LocalFlags::IEXTEN,
        );
        raw.input_flags.remove(
            InputFlags::IXON
                | InputFlags::ICRNL
                | InputFlags::INLCR
                | InputFlags::IGNCR
                | InputFlags::ISTRIP,
        );
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("cannot put the terminal in raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Hands this process's terminal (stdin) to a claimed machine as its console input, in raw
/// mode until the returned guard is dropped: the agent's interactive shell reads what is typed
/// here. moat-vmm reads the terminal through its own descriptor; this process never does.
fn hand_over_terminal(claimed: &crate::pool::Claimed) -> Result<RawTerminal> {
    let stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let raw = RawTerminal::enter()?;
    vmm_call(&claimed.api, "console-input\n", Some(&stdin))
        .context("cannot hand the terminal to the pool's machine")?;
    Ok(raw)
}

/// Boots the workspace VM (or restores it, or claims it from a pool) and waits for it;
/// returns the agent's exit code.
pub(crate) fn run(rt: &tokio::runtime::Runtime, run: VmRun<'_>) -> Result<i32> {
    let outcome = Arc::new(Mutex::new(None));
    let (signal_tx, signal_rx) = tokio::sync::mpsc::unbounded_channel();
    if let VmMode::Claim(claimed) = run.mode {
        let stream = {
            let _guard = rt.enter();
            claimed.control.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(claimed.control.try_clone()?)?
        };
        if nix::unistd::geteuid().is_root() {
            let sockets = workspace_sockets(run.uds);
            hand_sockets_to_jail(run.uds, &[&sockets[0], &sockets[1]])?;
        }
        let signals = Signals::listen(rt, run.workspace.interactive)?;
        // Before the workspace goes out: the agent's shell opens its terminal once it has it.
        let terminal = if run.workspace.interactive {
            Some(hand_over_terminal(&claimed)?)
        } else {
            None
        };
        let control = rt.spawn(serve_control(
            ControlSource::Stream(stream),
            run.workspace.clone(),
            Arc::clone(&outcome),
            signal_rx,
        ));
        let code = wait_for_vm(
            rt,
            Running::Claimed(claimed),
            control,
            &outcome,
            signals,
            signal_tx,
        );
        drop(terminal);
        return code;
    }
    let kernel = kernel_for(&run.images, &run.gpus)?;
    let home = match &run.home_disk {
        Some(p) => p.clone(),
        None => {
            let p = run.run_dir.join("home.ext4");
            make_home_disk(&p, 2048)?;
            p
        }
    };
    let control_path = moat_egress::port_path(run.uds, CONTROL_VSOCK_PORT);
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&control_path)
            .with_context(|| format!("cannot listen on {}", control_path.display()))?
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let control = if matches!(run.mode, VmMode::Template(_)) {
        rt.spawn(serve_template(listener, ready_tx))
    } else {
        rt.spawn(serve_control(
            ControlSource::Listener {
                listener,
                restored: matches!(run.mode, VmMode::Restore(_)),
            },
            run.workspace.clone(),
            Arc::clone(&outcome),
            signal_rx,
        ))
    };
    let api = run.run_dir.join("vmm-api.sock");
    let jail_dir = run.run_dir.join("jail");
    if nix::unistd::geteuid().is_root() {
        let sockets = workspace_sockets(run.uds);
        hand_sockets_to_jail(run.uds, &[&sockets[0], &sockets[1], &control_path])?;
    }
    let mut cmd = Command::new(&run.vmm);
    // The jail (vmm/README.md): moat-vmm opens the kernel, disks and its vsock listener, then
    // lives in an empty read-only root holding only the socket directory, as an unprivileged
    // uid (65534 when we are root; our own uid in a user namespace otherwise), under Landlock.
    cmd.arg("--jail-dir").arg(&jail_dir);
    match &run.mode {
        VmMode::Restore(dir) => {
            cmd.arg("--restore").arg(dir);
        }
        VmMode::Boot | VmMode::Template(_) | VmMode::Claim(_) => {
            cmd.arg("--kernel")
                .arg(&kernel)
                .arg("--initrd")
                .arg(&run.images.initramfs)
                .arg("--cmdline")
                .arg(cmdline(run.boot_log));
        }
    }
    if let VmMode::Template(_) = &run.mode {
        cmd.arg("--api-sock").arg(&api);
    } else if let Some(path) = &run.api_sock {
        // Bound by moat-vmm before it enters its jail, owner-only (0600): as root, the jailed
        // VMM keeps the listening socket, and only root reaches it.
        cmd.arg("--api-sock").arg(path);
        eprintln!(
            "moat: moat-vmm's control socket (pause, resume, snapshot): {}",
            path.display()
        );
    }
    cmd.arg("--mem")
        .arg(run.mem_mib.to_string())
        .arg("--vcpus")
        .arg(run.vcpus.to_string())
        .arg("--vsock-uds")
        .arg(run.uds)
        .arg("--block-ro")
        .arg(&run.images.rootfs)
        .arg("--block")
        .arg(&home)
        .arg("--rng");
    for gpu in &run.gpus {
        cmd.arg("--gpu").arg(gpu);
    }
    if !run.workspace.interactive {
        // A command without a terminal gets no console input (guest-init gives it /dev/null).
        cmd.args(["--serial-in", "off"]);
    }
    die_with_parent(&mut cmd);
    tracing::debug!(?cmd, "starting moat-vmm");
    let mut vmm = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", run.vmm.display()))?;
    if let VmMode::Template(dir) = &run.mode {
        let template = Template {
            mem_mib: run.mem_mib,
            vcpus: run.vcpus,
        };
        return make_template(&mut vmm, &ready_rx, &api, dir, &template);
    }
    let signals = Signals::listen(rt, false)?;
    let code = wait_for_vm(
        rt,
        Running::Child(vmm),
        control,
        &outcome,
        signals,
        signal_tx,
    );
    if let Some(path) = &run.api_sock {
        remove_socket(path);
    }
    code
}

/// The signals a run acts on, caught from the moment this is made (before the claimant's
/// terminal goes raw, so that none of them ends moat with it left raw).
struct Signals {
    /// SIGTERM, and for an interactive run SIGINT and SIGQUIT too (no key sends those while
    /// the terminal is raw; a `kill` does, and it must not leave the terminal raw).
    stop: Vec<tokio::signal::unix::Signal>,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen(rt: &tokio::runtime::Runtime, interactive: bool) -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = rt.enter();
        let mut kinds = vec![SignalKind::terminate()];
        if interactive {
            kinds.extend([SignalKind::interrupt(), SignalKind::quit()]);
        }
        let stop = kinds
            .into_iter()
            .map(signal)
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot catch signals")?;
        let hangup = signal(SignalKind::hangup()).context("cannot catch SIGHUP")?;
        Ok(Self { stop, hangup })
    }
}

/// Waits for the running VM and says how the agent ended. SIGTERM to moat (and, for an
/// interactive run, SIGINT and SIGQUIT) is passed on to the agent over the control stream, so
/// that it can shut down in order and its exit status comes back; a VM still running after
/// TERMINATE_GRACE is stopped. SIGHUP is passed on likewise, and nothing more.
fn wait_for_vm(
    rt: &tokio::runtime::Runtime,
    vm: Running,
    control: tokio::task::JoinHandle<()>,
    outcome: &Mutex<Option<VmOutcome>>,
    signals: Signals,
    signal_tx: tokio::sync::mpsc::UnboundedSender<VmSignal>,
) -> Result<i32> {
    let stopper = vm.stopper()?;
    let terminated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let Signals { stop, mut hangup } = signals;
        let terminated = Arc::clone(&terminated);
        let term_tx = signal_tx.clone();
        // The first of them to come.
        let (fired_tx, mut fired) = tokio::sync::mpsc::channel::<()>(1);
        for mut signal in stop {
            let fired_tx = fired_tx.clone();
            rt.spawn(async move {
                if signal.recv().await.is_some() {
                    let _ = fired_tx.send(()).await;
                }
            });
        }
        drop(fired_tx);
        rt.spawn(async move {
            if fired.recv().await.is_some() {
                terminated.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = term_tx.send(VmSignal::Terminate);
                tokio::time::sleep(TERMINATE_GRACE).await;
                stopper.stop().await;
            }
        });
        rt.spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = signal_tx.send(VmSignal::Hangup);
            }
        });
    }
    let code = vm.wait()?;
    // The outcome may still be on its way through the VMM's last vsock packets.
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), control).await });
    let reported = outcome.lock().ok().and_then(|mut o| o.take());
    if reported.is_none() && terminated.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("moat: the workspace VM was stopped (a signal to moat)");
        return Ok(143);
    }
    match reported {
        Some(VmOutcome::Exited { code }) => Ok(code),
        Some(VmOutcome::Failed { error }) => {
            eprintln!("moat: the workspace VM could not start the agent: {error}");
            Ok(125)
        }
        None => {
            eprintln!(
                "moat: the workspace VM stopped before guest-init reported an outcome \
                 (moat-vmm exit {}: {}); rerun with --boot-log to see the kernel's messages",
                code.map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
                vmm_exit_meaning(code)
            );
            Ok(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restored machine's control stream, served as `moat run --from-snapshot` does: what the
    /// guest gets after saying `first`, and the outcome recorded.
    fn restored_guest_says(first: &[u8]) -> (Vec<u8>, Option<VmOutcome>) {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&path).unwrap()
        };
        let outcome = Arc::new(Mutex::new(None));
        let (_signals, signal_rx) = tokio::sync::mpsc::unbounded_channel();
        let workspace: VmWorkspace = control::parse(
            br#"{"hostname":"w","command":["true"],"env":[],"ca_pem":"","interactive":false,"rows":0,"cols":0,"generation":9}"#,
        )
        .unwrap();
        let task = rt.spawn(serve_control(
            ControlSource::Listener {
                listener,
                restored: true,
            },
            workspace,
            Arc::clone(&outcome),
            signal_rx,
        ));
        let mut guest = std::os::unix::net::UnixStream::connect(&path).unwrap();
        guest.write_all(first).unwrap();
        guest
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let got = rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                let mut got = Vec::new();
                let mut byte = [0u8; 1];
                // Up to the first line, or the end of the stream.
                while guest.read(&mut byte).unwrap_or(0) == 1 {
                    got.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                got
            })
            .await
            .unwrap()
        });
        if got.is_empty() {
            rt.block_on(task).unwrap();
        }
        let recorded = outcome.lock().unwrap().take();
        (got, recorded)
    }

    #[test]
    fn a_restored_machine_that_says_it_reseeded_gets_the_workspace() {
        let (got, outcome) = restored_guest_says(b"{\"reseeded\":{\"bytes\":64}}\n");
        let workspace: VmWorkspace = control::parse(&got[..got.len() - 1]).unwrap();
        assert_eq!(workspace.generation, 9);
        assert!(outcome.is_none());
    }

    #[test]
    fn a_restored_machine_that_does_not_say_it_reseeded_gets_no_workspace() {
        for first in [
            &b"\"standing_by\"\n"[..],
            b"{\"reseeded\":{\"bytes\":8}}\n",
            b"\n",
        ] {
            let (got, outcome) = restored_guest_says(first);
            assert!(got.is_empty(), "a workspace was sent: {got:?}");
            let Some(VmOutcome::Failed { error }) = outcome else {
                panic!("no refusal recorded: {outcome:?}");
            };
            assert!(
                error.contains("reseeded") || error.contains("RNG"),
                "{error}"
            );
        }
    }

    /// After a snapshot reset the guest's vsock transport, the control stream ends without an
    /// outcome: guest-init connects again and asks to reattach. Only that is answered; a signal
    /// sent meanwhile, and the outcome, go on the new stream.
    #[test]
    fn a_guest_that_lost_its_control_stream_reattaches_and_nothing_else_does() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&path).unwrap()
        };
        let outcome = Arc::new(Mutex::new(None));
        let (signals, signal_rx) = tokio::sync::mpsc::unbounded_channel();
        let workspace: VmWorkspace = control::parse(
            br#"{"hostname":"w","command":["true"],"env":[],"ca_pem":"","interactive":false,"rows":0,"cols":0}"#,
        )
        .unwrap();
        let task = rt.spawn(serve_control(
            ControlSource::Listener {
                listener,
                restored: false,
            },
            workspace,
            Arc::clone(&outcome),
            signal_rx,
        ));
        let connect = || {
            let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let line = |s: &std::os::unix::net::UnixStream| {
            let mut line = String::new();
            let _ = std::io::BufReader::new(s).read_line(&mut line);
            line
        };
        let first = connect();
        assert!(line(&first).contains("\"hostname\":\"w\""));
        // The snapshot: the stream ends, no outcome.
        drop(first);
        // Something else on the control port gets nothing and is closed.
        let mut stranger = connect();
        stranger.write_all(b"\"standing_by\"\n").unwrap();
        assert_eq!(line(&stranger), "");
        // guest-init asks; the signal sent while it was away comes after the answer.
        signals.send(VmSignal::Terminate).unwrap();
        let mut again = connect();
        again
            .write_all(&control::encode(&control::VmReattach::Reattach))
            .unwrap();
        let mut reader = std::io::BufReader::new(again.try_clone().unwrap());
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        assert_eq!(answer, "\"reattached\"\n");
        let mut signal = String::new();
        reader.read_line(&mut signal).unwrap();
        assert_eq!(signal, "\"terminate\"\n");
        again
            .write_all(&control::encode(&VmOutcome::Exited { code: 56 }))
            .unwrap();
        rt.block_on(task).unwrap();
        assert_eq!(
            outcome.lock().unwrap().take(),
            Some(VmOutcome::Exited { code: 56 })
        );
    }

    #[test]
    fn cmdline_is_quiet_unless_the_boot_log_is_wanted() {
        let plain = cmdline(false);
        assert!(plain.contains("reboot=k") && plain.contains("quiet"));
        // moat-vmm adds the nested-PVM workarounds itself.
        assert!(!plain.contains("noxsave"));
        assert!(!cmdline(true).contains("quiet"));
    }

    #[test]
    fn images_manifest_is_strict() {
        let dir = tempfile::tempdir().unwrap();
        let text = "kernel = \"/k\"\ninitramfs = \"/i\"\nrootfs = \"/r\"\nextra = 1\n";
        assert!(toml::from_str::<VmImages>(text).is_err());
        let text = "kernel = \"/k\"\ninitramfs = \"/i\"\n";
        assert!(toml::from_str::<VmImages>(text).is_err());
        let k = dir.path().join("k");
        std::fs::write(&k, b"").unwrap();
        let text = format!("kernel = {k:?}\ninitramfs = {k:?}\nrootfs = {k:?}\n");
        let images: VmImages = toml::from_str(&text).unwrap();
        assert_eq!(images.rootfs, k);
        assert_eq!(kernel_for(&images, &[]).unwrap(), k);
        // A GPU needs the PCI kernel; without it the error says how to build it.
        let err = kernel_for(&images, &["0000:41:00.0".into()]).unwrap_err();
        assert!(
            err.to_string().contains("cargo xtask images kernel-gpu"),
            "{err}"
        );
        let g = dir.path().join("g");
        std::fs::write(&g, b"").unwrap();
        let text =
            format!("kernel = {k:?}\nkernel_gpu = {g:?}\ninitramfs = {k:?}\nrootfs = {k:?}\n");
        let images: VmImages = toml::from_str(&text).unwrap();
        assert_eq!(kernel_for(&images, &["0000:41:00.0".into()]).unwrap(), g);
    }
}
