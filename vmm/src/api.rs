//! The control socket (`--api-sock PATH`, Firecracker's name): pause, resume, snapshot.
//!
//! A tiny line protocol on a Unix stream socket, one request per line, each answered with one
//! line, `OK` or `ERR <why>`:
//!
//! - `pause`: every vCPU leaves KVM_RUN and waits (devices keep running).
//! - `console`, carrying a descriptor: the serial console's output goes there from now on
//!   (with the same cap as `--serial-out`). A warm pool's machine is claimed by a process that
//!   did not start the VMM: the agent's output is then written to the claimant's stdout.
//! - `console-input`, carrying a descriptor: the serial console's input is read from there
//!   from now on (in place of stdin, if it was on). A warm pool's claimant hands over its
//!   terminal, which it put in raw mode itself, for an interactive shell.
//! - `resume`: devices stopped by a snapshot start again, then the vCPUs.
//! - `snapshot`, carrying the state file's descriptor (SCM_RIGHTS), then `memory`, carrying
//!   the memory file's: the paused machine is written to them ([`crate::snapshot`]). The
//!   client opens both, so the jailed VMM needs no path, and writes only where its caller
//!   could. Devices stay stopped until `resume`; a device resumed after a snapshot behaves as
//!   a restored one (vsock drops its host connections and tells the guest).
//!
//! A request longer than [`MAX_LINE`], unknown, or out of order gets `ERR` and the VMM goes
//! on; a client that says nothing for [`IDLE`] is dropped. One client at a time.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::kvm::state::{VmState, XSAVE_LEGACY_BYTES};
use crate::kvm::vcpu::{Gate, kick_signal};
use crate::seccomp::{self, Role};
use crate::snapshot::{self, CpuIdentity, Header, MachineState, RegionState};

/// Longest request line.
pub const MAX_LINE: usize = 64;
/// How long a connected client may stay silent.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long vCPUs get to pause (they are kicked every few milliseconds meanwhile).
const PAUSE_WITHIN: Duration = Duration::from_secs(10);
/// Granularity of the sparse memory file: pages of zeros are left as holes.
const PAGE: usize = 4096;
/// Bytes of guest memory copied out at a time.
const CHUNK: usize = 1 << 20;

/// A vCPU as the control socket sees it: its gate and its thread (to kick).
#[derive(Debug)]
pub struct VcpuHandle {
    /// Its pause point.
    pub gate: Arc<Gate>,
    /// Its thread.
    pub thread: JoinHandle<()>,
}

/// Everything the control socket acts on.
pub struct Machine {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM.
    pub mem: Arc<GuestMemoryMmap>,
    /// Guest RAM as configured.
    pub mem_bytes: u64,
    /// The vCPUs, in index order.
    pub vcpus: Vec<VcpuHandle>,
    /// The virtio-mmio transports, in slot order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The console output's cap in bytes (`--serial-cap`), for a console attached later.
    pub console_cap: u64,
    /// Where console input handed over later goes (the input thread takes it from there).
    pub console_input: Option<Arc<crate::devices::serial::InputSlot>>,
    /// This host's CPU, for the snapshot's header.
    pub cpu: CpuIdentity,
    /// This host's XSAVE area in bytes.
    pub xsave_size: usize,
    /// Whether PCI devices are passed through (their state lives in hardware: no snapshot).
    pub passthrough: bool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.transports.len())
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Machine {
    /// Whether every vCPU is paused.
    fn paused(&self) -> bool {
        self.vcpus.iter().all(|v| v.gate.paused())
    }

    /// Pauses every vCPU: asks, then kicks each still in KVM_RUN until it answers (a kick that
    /// lands just before the thread enters KVM_RUN is lost, so it is repeated).
    pub fn pause(&self) -> Result<(), String> {
        for v in &self.vcpus {
            v.gate.request_pause();
        }
        let deadline = Instant::now() + PAUSE_WITHIN;
        for (i, v) in self.vcpus.iter().enumerate() {
            loop {
                if v.gate.paused() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("vCPU {i} did not pause (has the guest stopped?)"));
                }
                let _ = v.thread.kill(kick_signal());
                v.gate.wait_paused(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// Starts devices a snapshot stopped, then the vCPUs.
    pub fn resume(&self) {
        for t in &self.transports {
            lock(t).resume_device();
        }
        for v in &self.vcpus {
            v.gate.resume();
        }
    }

    /// Sends the serial console's output to `out` from now on; what was held back for the
    /// old sink (a line not yet ended) goes to it first.
    pub fn attach_console(&self, out: File) {
        let mut serial = lock(&self.serial);
        let writer = serial.writer_mut();
        let _ = writer.flush();
        *writer = crate::devices::serial::CappedWriter::new(Box::new(out), self.console_cap);
    }

    /// Reads the serial console's input from `input` from now on.
    pub fn attach_console_input(&self, input: File) -> Result<(), String> {
        let slot = self
            .console_input
            .as_ref()
            .ok_or("this VM takes no console input")?;
        slot.attach(input)
            .map_err(|e| format!("cannot hand the input over: {e}"))
    }

    /// Writes the paused machine: its state to `state`, its RAM to `memory`.
    pub fn snapshot(&self, state: &mut File, memory: &mut File) -> Result<(), String> {
        if self.passthrough {
            return Err("a VM with PCI passthrough devices cannot be snapshotted".to_owned());
        }
        if self.xsave_size > XSAVE_LEGACY_BYTES {
            return Err(format!(
                "this host's XSAVE area is {} bytes; snapshots handle at most {XSAVE_LEGACY_BYTES}",
                self.xsave_size
            ));
        }
        if !self.paused() {
            return Err("pause the VM first".to_owned());
        }
        // Devices stop first, so nothing writes memory or raises an interrupt from here on:
        // an interrupt raised after the vCPUs' local APICs were read, but before the device
        // stopped, would be in neither the snapshot's APICs nor its devices' future. They start
        // again on `resume`.
        let mut devices = Vec::with_capacity(self.transports.len());
        for t in &self.transports {
            let mut t = lock(t);
            t.pause_device();
            devices.push(t.state());
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(*v.gate.save(PAUSE_WITHIN)?);
        }
        let vm = VmState::save(&self.vm).map_err(|e| moat_log::error_chain(&e))?;
        let serial = lock(&self.serial).state().into();
        let regions = write_memory(&self.mem, memory).map_err(|e| format!("memory file: {e}"))?;
        let machine = MachineState {
            mem_bytes: self.mem_bytes,
            regions,
            vcpus,
            vm,
            serial,
            devices,
        };
        let write = (|| {
            state.set_len(0)?;
            state.rewind()?;
            snapshot::write_state(state, &Header::ours(self.cpu.clone()), &machine)?;
            state.flush().map_err(snapshot::Error::Io)?;
            state.sync_all()?;
            memory.sync_all()?;
            Ok::<_, snapshot::Error>(())
        })();
        write.map_err(|e| format!("state file: {}", moat_log::error_chain(&e)))
    }
}

/// Writes guest RAM to `out`, region after region, leaving pages of zeros as holes; returns
/// where each region went.
fn write_memory(mem: &GuestMemoryMmap, out: &File) -> std::io::Result<Vec<RegionState>> {
    use std::os::unix::fs::FileExt;
    out.set_len(0)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = buf.get_mut(..n).ok_or(std::io::ErrorKind::InvalidInput)?;
            mem.read_slice(chunk, GuestAddress(start + done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    out.write_all_at(page, offset + done + (i * PAGE) as u64)?;
                }
            }
            done += n as u64;
        }
        regions.push(RegionState {
            guest_addr: start,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    out.set_len(offset)?;
    Ok(regions)
}

/// Binds the control socket (replacing a stale socket there, never another kind of file),
/// reachable by its owner (and root) alone from the first instant: it is bound in a private
/// directory (0700) beside `path`, made 0600 there and renamed into place. Whoever reaches it
/// can pause the VM and copy its memory, so neither the umask nor the directory decides.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    moat_private_socket::bind_std(path)
}

/// Starts the control socket's thread (confined by the `Api` filter when `confine`).
pub fn spawn(listener: UnixListener, machine: Machine, confine: bool) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("api".to_owned())
        .spawn(move || {
            if confine && let Err(e) = seccomp::install(Role::Api) {
                tracing::error!(error = %e, "the API thread cannot confine itself; no control socket");
                return;
            }
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => serve(&c, &machine),
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })
        .map(drop)
}

/// One line and the descriptor that came with it.
fn next_line(
    conn: &UnixStream,
    pending: &mut Vec<u8>,
    fd: &mut Option<File>,
) -> Option<Result<String, &'static str>> {
    loop {
        if let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = std::str::from_utf8(line.get(..end)?).ok()?;
            return Some(Ok(text.trim().to_owned()));
        }
        if pending.len() > MAX_LINE {
            return Some(Err("request too long"));
        }
        let mut buf = [0u8; MAX_LINE];
        match conn.recv_with_fd(&mut buf) {
            Ok((0, _)) | Err(_) => return None,
            Ok((n, got)) => {
                if got.is_some() {
                    *fd = got;
                }
                pending.extend_from_slice(buf.get(..n)?);
            }
        }
    }
}

fn serve(conn: &UnixStream, machine: &Machine) {
    let _ = conn.set_read_timeout(Some(IDLE));
    let mut pending = Vec::new();
    let mut fd = None;
    let mut w = conn;
    while let Some(line) = next_line(conn, &mut pending, &mut fd) {
        let answer = match line {
            Err(why) => Err(why.to_owned()),
            Ok(l) => handle(&l, conn, &mut pending, &mut fd, machine),
        };
        let reply = match answer {
            Ok(()) => "OK\n".to_owned(),
            Err(why) => format!("ERR {}\n", why.replace('\n', " ")),
        };
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if pending.len() > MAX_LINE {
            return;
        }
    }
}

fn handle(
    line: &str,
    conn: &UnixStream,
    pending: &mut Vec<u8>,
    fd: &mut Option<File>,
    machine: &Machine,
) -> Result<(), String> {
    match line {
        "pause" => machine.pause(),
        "resume" => {
            machine.resume();
            Ok(())
        }
        "console" => {
            let out = fd.take().ok_or("console needs the output's descriptor")?;
            machine.attach_console(out);
            Ok(())
        }
        "console-input" => {
            let input = fd
                .take()
                .ok_or("console-input needs the input's descriptor")?;
            machine.attach_console_input(input)
        }
        "snapshot" => {
            let mut state = fd
                .take()
                .ok_or("snapshot needs the state file's descriptor")?;
            match next_line(conn, pending, fd) {
                Some(Ok(l)) if l == "memory" => {}
                _ => return Err("snapshot must be followed by memory".to_owned()),
            }
            let mut memory = fd
                .take()
                .ok_or("memory needs the memory file's descriptor")?;
            machine.snapshot(&mut state, &mut memory)
        }
        _ => {
            *fd = None;
            Err("unknown request (pause, resume, console, console-input, snapshot)".to_owned())
        }
    }
}

/// A client of the control socket (moat and the tests).
#[derive(Debug)]
pub struct Client {
    conn: UnixStream,
    reader: std::io::BufReader<UnixStream>,
}

impl Client {
    /// Connects to the VMM's control socket.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let conn = UnixStream::connect(path)?;
        conn.set_read_timeout(Some(Duration::from_secs(120)))?;
        let reader = std::io::BufReader::new(conn.try_clone()?);
        Ok(Self { conn, reader })
    }

    fn answer(&mut self) -> std::io::Result<()> {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        match line.trim_end().strip_prefix("ERR ") {
            None if line == "OK\n" => Ok(()),
            Some(why) => Err(std::io::Error::other(why.to_owned())),
            None => Err(std::io::Error::other(format!("unexpected answer {line:?}"))),
        }
    }

    /// Sends one raw request line and returns the answer (for tests of bad requests).
    pub fn request(&mut self, line: &str) -> std::io::Result<()> {
        self.conn.write_all(format!("{line}\n").as_bytes())?;
        self.answer()
    }

    /// Pauses the VM.
    pub fn pause(&mut self) -> std::io::Result<()> {
        self.request("pause")
    }

    /// Resumes the VM.
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.request("resume")
    }

    /// Sends the serial console's output to `out` from now on.
    pub fn attach_console(&mut self, out: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
        self.conn
            .send_with_fd(&b"console\n"[..], out.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.answer()
    }

    /// Reads the serial console's input from `input` from now on.
    pub fn attach_console_input(
        &mut self,
        input: &impl std::os::fd::AsRawFd,
    ) -> std::io::Result<()> {
        self.conn
            .send_with_fd(&b"console-input\n"[..], input.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.answer()
    }

    /// Snapshots the paused VM into `dir` (created if missing; `state` and `memory`, mode
    /// 0600, replaced).
    pub fn snapshot(&mut self, dir: &Path) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(name))
        };
        let state = open(snapshot::STATE_FILE)?;
        let memory = open(snapshot::MEMORY_FILE)?;
        self.conn
            .send_with_fd(&b"snapshot\n"[..], state.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.conn
            .send_with_fd(&b"memory\n"[..], memory.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.answer()
    }
}
