//! Putting the machine together: memory, kernel, KVM, devices, vCPU threads; then waiting for
//! the first reason to stop.

use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootSpec};
use crate::config::{Toggle, VmConfig};
use crate::cpuid;
use crate::devices::bus::Bus;
use crate::devices::legacy::{I8042, ResetLine};
use crate::devices::metrics::DeviceMetrics;
use crate::devices::pci::bus::PciRoot;
use crate::devices::pci::window::BarWindows;
use crate::devices::serial::{self, IrqLine};
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::exit::{ExitSender, VmExit};
use crate::kvm::irq::{KvmBarMapper, KvmMsiRouter};
use crate::kvm::{self, Vm};
use crate::layout;
use crate::seccomp::{self, Role};
use crate::vfio::{self, VfioBackend, device::VfioPciDevice};

/// Errors that stop the VMM before or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory could not be mapped.
    #[error("cannot map {0} bytes of guest memory")]
    GuestMemory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The kernel could not be loaded.
    #[error("cannot boot the kernel")]
    Boot(#[source] boot::Error),
    /// KVM setup failed.
    #[error("cannot set up KVM")]
    Kvm(#[source] kvm::Error),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The console sink could not be opened.
    #[error("cannot open the serial console output")]
    Console(#[source] std::io::Error),
    /// Console input (stdin, the terminal, its thread) could not be set up.
    #[error("cannot set up console input")]
    ConsoleInput(#[source] std::io::Error),
    /// The vsock device could not be created.
    #[error("cannot create the vsock device")]
    Vsock(#[source] crate::devices::virtio::vsock::Error),
    /// A disk could not be opened.
    #[error("cannot open a disk")]
    Disk(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The host entropy source could not be opened.
    #[error("cannot open the host entropy source")]
    Entropy(#[source] std::io::Error),
    /// A virtio transport could not be created.
    #[error("cannot create a virtio-mmio transport")]
    Transport(#[source] crate::devices::virtio::mmio::Error),
    /// The MP table could not be written.
    #[error("cannot write the MP table")]
    MpTable(#[source] crate::mptable::Error),
    /// A seccomp filter could not be installed.
    #[error("cannot confine the main thread")]
    Seccomp(#[source] seccomp::Error),
    /// A passthrough device could not be set up.
    #[error("cannot set up PCI passthrough")]
    Passthrough(#[source] crate::vfio::Error),
    /// The BAR windows could not be laid out.
    #[error("cannot lay out PCI BAR windows")]
    BarWindows(#[source] crate::devices::pci::window::Error),
    /// The PCI bus is full.
    #[error("too many PCI devices")]
    PciBusFull,
    /// A thread could not be started.
    #[error("cannot start thread {0}")]
    Thread(String, #[source] std::io::Error),
}

/// Every host resource the VM needs, opened up front so a jailed VMM needs no host paths:
/// the kernel, initramfs, disks, entropy, console, /dev/kvm and the vsock listener.
pub struct Resources {
    kernel: std::fs::File,
    initrd: Option<std::fs::File>,
    kvm: kvm_ioctls::Kvm,
    vfio: Option<(vfio::host::Container, Vec<vfio::host::HostDevice>)>,
    disks: Vec<Disk>,
    entropy: Option<std::fs::File>,
    console: serial::ConsoleOut,
    console_in: Option<std::fs::File>,
    vsock: Option<UnixListener>,
    /// Whether the nested-PVM workarounds apply, decided while the host's `/sys` is visible.
    pvm: bool,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("disks", &self.disks.len())
            .field("vsock", &self.vsock.is_some())
            .finish_non_exhaustive()
    }
}

impl Resources {
    /// Opens everything `cfg` names.
    pub fn open(cfg: &VmConfig) -> Result<Self, Error> {
        let kernel = boot::open_kernel(&cfg.kernel).map_err(Error::Boot)?;
        let initrd = match &cfg.initrd {
            Some(p) => Some(boot::open_initrd(p).map_err(Error::Boot)?),
            None => None,
        };
        let mut disks = Vec::new();
        for d in &cfg.disks {
            disks.push(Disk::open(&d.path, d.read_only).map_err(|e| Error::Disk(Box::new(e)))?);
        }
        let entropy = if cfg.rng {
            Some(std::fs::File::open("/dev/urandom").map_err(Error::Entropy)?)
        } else {
            None
        };
        let console = serial::console_out(cfg.serial_out.as_deref(), cfg.serial_cap)
            .map_err(Error::Console)?;
        let console_in = console_input(cfg.serial_in)?;
        let vsock = match &cfg.vsock {
            Some(v) => Some(crate::devices::virtio::vsock::bind(&v.uds).map_err(Error::Vsock)?),
            None => None,
        };
        let kvm = Vm::open_kvm().map_err(Error::Kvm)?;
        let vfio = if cfg.gpus.is_empty() {
            None
        } else {
            Some(
                vfio::host::open(&cfg.gpus, std::path::Path::new("/sys"))
                    .map_err(Error::Passthrough)?,
            )
        };
        Ok(Self {
            kernel,
            initrd,
            kvm,
            vfio,
            disks,
            entropy,
            console,
            console_in,
            vsock,
            pvm: cpuid::pvm_workarounds(cfg.pvm_workarounds),
        })
    }
}

/// Stdin for console input, duplicated (so the input thread owns a plain file), or `None` when
/// input is off or (`auto`) stdin is closed or cannot be polled (a regular file, `/dev/null`:
/// epoll refuses those). When stdin is a terminal it goes to raw mode here, before any thread
/// exists (see [`crate::terminal`]).
fn console_input(toggle: Toggle) -> Result<Option<std::fs::File>, Error> {
    use std::os::fd::AsFd;
    if toggle == Toggle::Off {
        return Ok(None);
    }
    let stdin = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(_) if toggle == Toggle::Auto => return Ok(None),
        Err(e) => return Err(Error::ConsoleInput(e)),
    };
    if toggle == Toggle::Auto && !pollable(&stdin) {
        return Ok(None);
    }
    crate::terminal::enter_raw_mode().map_err(Error::ConsoleInput)?;
    Ok(Some(stdin))
}

/// Whether epoll can watch `f`: a terminal, a pipe or a socket.
fn pollable(f: &std::fs::File) -> bool {
    use std::io::IsTerminal;
    use std::os::unix::fs::FileTypeExt;
    f.is_terminal()
        || f.metadata()
            .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
            .unwrap_or(false)
}

/// KVM memory slots set aside for mmapped BARs.
const BAR_SLOTS: u32 = 64;

/// Puts the passthrough devices (and, in test builds, the fake one) on a PCI root bus:
/// guest RAM DMA-mapped for them, BARs placed, MSI/MSI-X routed through KVM. Returns the
/// devices, which are stopped (interrupts off, reset) when the VM stops.
fn attach_pci(
    cfg: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    host: Option<(vfio::host::Container, Vec<vfio::host::HostDevice>)>,
    bus: &mut Bus,
) -> Result<Vec<Arc<Mutex<VfioPciDevice>>>, Error> {
    let mut backends: Vec<Box<dyn VfioBackend>> = Vec::new();
    if let Some((container, devices)) = host {
        // The devices hold the container open (and guest RAM mapped for DMA) until exit.
        vfio::map_guest_memory(&container, mem).map_err(Error::Passthrough)?;
        backends.extend(
            devices
                .into_iter()
                .map(|d| Box::new(d) as Box<dyn VfioBackend>),
        );
    }
    #[cfg(feature = "test-utils")]
    if cfg.test_fake_gpu {
        backends.push(Box::new(vfio::fake::FakeGpu::new().0));
    }
    #[cfg(not(feature = "test-utils"))]
    let _ = cfg;
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    let ram_end = mem.last_addr().0.saturating_add(1);
    let mut windows = BarWindows::new(ram_end, vm.guest_phys_bits()).map_err(Error::BarWindows)?;
    let router = Arc::new(KvmMsiRouter::new(vm.fd()));
    let mapper = Arc::new(KvmBarMapper::new(vm.fd(), vm.first_free_slot(), BAR_SLOTS));
    let mut root = PciRoot::new();
    let mut devices = Vec::new();
    for backend in backends {
        let dev = VfioPciDevice::new(backend, &mut windows, router.clone(), Some(mapper.clone()))
            .map_err(Error::Passthrough)?;
        let dev = Arc::new(Mutex::new(dev));
        root.add(dev.clone()).ok_or(Error::PciBusFull)?;
        devices.push(dev);
    }
    bus.set_pci(root);
    Ok(devices)
}

/// Boots `cfg` and runs it until the guest stops, the VMM fails or `timeout` passes. With
/// `stats` (the instant `main()` started) a cost report is printed on stderr at exit.
pub fn run(
    cfg: &VmConfig,
    timeout: Option<Duration>,
    stats: Option<Instant>,
) -> Result<VmExit, Error> {
    let res = Resources::open(cfg)?;
    run_with(cfg, res, None, timeout, stats)
}

/// Runs `cfg` from resources opened earlier. `uds_inside` is the vsock socket's path as this
/// process now sees it (a jail moves it); `None` keeps `cfg`'s path.
pub fn run_with(
    cfg: &VmConfig,
    res: Resources,
    uds_inside: Option<std::path::PathBuf>,
    timeout: Option<Duration>,
    stats: Option<Instant>,
) -> Result<VmExit, Error> {
    let Resources {
        mut kernel,
        mut initrd,
        kvm,
        vfio,
        disks,
        entropy,
        console,
        console_in,
        vsock,
        pvm,
    } = res;
    let uds = uds_inside.or_else(|| cfg.vsock.as_ref().map(|v| v.uds.clone()));
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.mem_bytes)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory(cfg.mem_bytes, e))?,
    );

    // Devices first: their host resources (sockets, disks, entropy) are opened before the
    // guest exists, and their MMIO slots go on the command line in this order.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut metrics: Vec<(String, Arc<dyn DeviceMetrics>)> = Vec::new();
    if let (Some(v), Some(listener), Some(uds)) = (&cfg.vsock, vsock, &uds) {
        let dev = Vsock::with_listener(v.cid, listener, uds, cfg.seccomp).map_err(Error::Vsock)?;
        metrics.push(("vsock".to_owned(), dev.metrics()));
        devices.push(Box::new(dev));
    }
    for (i, disk) in disks.into_iter().enumerate() {
        metrics.push((format!("block{i}"), disk.metrics()));
        devices.push(Box::new(
            Block::new(disk, cfg.seccomp).map_err(|e| Error::Disk(Box::new(e)))?,
        ));
    }
    if let Some(source) = entropy {
        let dev = Rng::with_source(source, cfg.seccomp).map_err(Error::Entropy)?;
        metrics.push(("rng".to_owned(), dev.metrics()));
        devices.push(Box::new(dev));
    }
    let slots: Vec<MmioSlot> = (0u64..).zip(&devices).map(|(i, _)| mmio_slot(i)).collect();
    let cmdline = kernel_cmdline(&cfg.cmdline, pvm, &slots);
    let entry = boot::load(
        &mem,
        BootSpec {
            kernel: &mut kernel,
            format: cfg.kernel_format,
            cmdline: &cmdline,
            initrd: initrd.as_mut(),
            mem_bytes: cfg.mem_bytes,
        },
    )
    .map_err(Error::Boot)?;
    drop(kernel);
    drop(initrd);
    crate::mptable::write(&mem, cfg.vcpus).map_err(Error::MpTable)?;

    let vm = Vm::new(kvm, &mem).map_err(Error::Kvm)?;
    let (exits, exit_rx) = ExitSender::channel();
    let stop = Arc::new(AtomicBool::new(false));

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(Error::Kvm)?;
    let input_ready = match console_in {
        Some(_) => Some(serial::input_ready_eventfd().map_err(Error::ConsoleInput)?),
        None => None,
    };
    let serial = Arc::new(Mutex::new(
        serial::serial_device(IrqLine(serial_irq), input_ready.as_ref(), console)
            .map_err(Error::EventFd)?,
    ));
    if let (Some(input), Some(ready)) = (console_in, input_ready) {
        serial::spawn_input_thread(input, ready, serial.clone(), cfg.seccomp)
            .map_err(|e| Error::Thread("serial-in".to_owned(), e))?;
    }
    let i8042 = I8042::new(ResetLine::new(exits.clone(), stop.clone()));
    let mut bus = Bus::new(serial, i8042);
    for (dev, slot) in devices.into_iter().zip(&slots) {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irq, slot.irq).map_err(Error::Kvm)?;
        let t =
            MmioTransport::new(dev, mem.clone(), Interrupt::new(irq)).map_err(Error::Transport)?;
        for (q, evt) in (0u32..).zip(t.queue_notifiers()) {
            vm.register_ioevent(evt, slot.base + QUEUE_NOTIFY_OFFSET, q)
                .map_err(Error::Kvm)?;
        }
        bus.add_mmio(slot.base, layout::VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(t)));
    }
    let passthrough = attach_pci(cfg, &vm, &mem, vfio, &mut bus)?;
    let pci = !passthrough.is_empty();
    let bus = Arc::new(bus);

    tracing::info!(pvm_workarounds = pvm, entry = entry.entry(), "booting");
    let (started_tx, started_rx) = mpsc::channel::<Instant>();
    for index in 0..cfg.vcpus {
        let vcpu = vm
            .create_vcpu(index, cfg.vcpus, entry, pvm)
            .map_err(Error::Kvm)?;
        let (bus, exits, stop, mem) = (bus.clone(), exits.clone(), stop.clone(), mem.clone());
        let confine = cfg.seccomp;
        let started = (index == 0).then(|| started_tx.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if confine && let Err(e) = seccomp::install_for(Role::Vcpu, pci) {
                    exits.send(VmExit::VmmError(format!("vCPU {index}: {e}")));
                    return;
                }
                if let Some(s) = started {
                    let _ = s.send(Instant::now());
                }
                vcpu.run(bus.as_ref(), &exits, &stop);
                // Guest memory stays mapped while any vCPU thread lives.
                drop(mem);
            })
            .map_err(|e| Error::Thread(format!("vcpu{index}"), e))?;
    }

    let mut report = None;
    if let Some(t0) = stats {
        let first = started_rx
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .map(|t| t.duration_since(t0));
        let cpu = crate::stats::cpu_ns_all_threads().unwrap_or(0);
        let guest = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((host as u64, r.len()))
            })
            .collect();
        match crate::stats::ExitProbe::open(guest) {
            Ok(probe) => report = Some((first, cpu, probe)),
            Err(e) => tracing::warn!(error = %e, "--stats needs /proc, which a jail hides"),
        }
    }
    // Every other thread runs (with the exit signals blocked): from now on the main thread
    // alone takes them, under its own seccomp role.
    crate::terminal::unblock_exit_signals().map_err(Error::ConsoleInput)?;
    if cfg.seccomp {
        seccomp::install_for(Role::Main, pci).map_err(Error::Seccomp)?;
    }
    let exit = match timeout {
        Some(t) => match exit_rx.recv_timeout(t) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => VmExit::Timeout,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                VmExit::VmmError("every vCPU thread ended without a reason".to_owned())
            }
        },
        None => exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::VmmError("every vCPU thread ended".to_owned())),
    };
    stop.store(true, std::sync::atomic::Ordering::Release);
    for dev in &passthrough {
        if let Ok(mut d) = dev.lock() {
            d.shutdown();
        }
    }
    // Keep the VM and memory alive: vCPU threads may still be inside KVM_RUN; the caller exits
    // the process.
    std::mem::forget(vm);
    // The devices too, for good: the main thread's reference to the bus (and through it to
    // every device) is never dropped, so whichever vCPU thread ends last cannot drop the last
    // one and run a device's destructor under the vCPU filter, which kills the process
    // (`Vsock::drop` unlinks its socket; a passthrough device's drop removes its BAR slots
    // and lets go of its VFIO group). What those destructors would do is done here under the
    // main thread's filter (passthrough devices shut down above, the socket unlinked below)
    // or by the kernel when the process exits (fds, mappings, memory slots).
    std::mem::forget(bus);
    std::mem::forget(passthrough);
    if let Some(uds) = &uds {
        let _ = std::fs::remove_file(uds);
    }
    if let Some((first, cpu, mut probe)) = report {
        eprintln!(
            "{}",
            crate::stats::line(first, cpu, probe.memory(), &metrics)
        );
    }
    Ok(exit)
}

/// Where a virtio-mmio device sits and how the kernel learns of it.
#[derive(Debug, Clone, Copy)]
struct MmioSlot {
    base: u64,
    irq: u32,
}

impl MmioSlot {
    /// ` virtio_mmio.device=4K@0x...:IRQ`, as Linux's virtio-mmio driver parses it.
    fn cmdline(&self) -> String {
        format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            layout::VIRTIO_MMIO_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// The guest's command line: the configured one, then [`cpuid::PVM_CMDLINE`] when the nested-PVM
/// workarounds are on, then the virtio-mmio devices.
fn kernel_cmdline(configured: &str, pvm: bool, slots: &[MmioSlot]) -> String {
    let mut cmdline = configured.to_owned();
    if pvm {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(cpuid::PVM_CMDLINE);
    }
    for slot in slots {
        cmdline.push_str(&slot.cmdline());
    }
    cmdline
}

fn mmio_slot(index: u64) -> MmioSlot {
    MmioSlot {
        base: layout::VIRTIO_MMIO_BASE + index * layout::VIRTIO_MMIO_SIZE,
        irq: layout::VIRTIO_FIRST_IRQ + u32::try_from(index).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_gets_the_pvm_workarounds_only_when_they_are_on() {
        let slots = [mmio_slot(0)];
        let plain = kernel_cmdline("console=ttyS0 reboot=k", false, &slots);
        assert!(
            plain.starts_with("console=ttyS0 reboot=k virtio_mmio.device=4K@"),
            "{plain}"
        );
        assert!(!plain.contains("noxsave"), "{plain}");
        let pvm = kernel_cmdline("console=ttyS0 reboot=k", true, &slots);
        assert!(
            pvm.starts_with(&format!(
                "console=ttyS0 reboot=k {} virtio_mmio",
                cpuid::PVM_CMDLINE
            )),
            "{pvm}"
        );
        assert!(
            pvm.contains("noxsave") && pvm.contains("clearcpuid=smap"),
            "{pvm}"
        );
        assert_eq!(kernel_cmdline("", true, &[]), cpuid::PVM_CMDLINE);
    }
}
