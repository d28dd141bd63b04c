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
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket {0}")]
    ApiSocket(std::path::PathBuf, #[source] std::io::Error),
    /// A snapshot could not be opened or is refused.
    #[error("cannot restore the snapshot in {0}")]
    Snapshot(std::path::PathBuf, #[source] crate::snapshot::Error),
    /// The snapshot does not fit this configuration.
    #[error("the snapshot does not fit this VM: {0}")]
    SnapshotMismatch(String),
    /// Neither a kernel nor a snapshot was given.
    #[error("no kernel and no snapshot to start from")]
    NoKernel,
    /// The snapshot's memory file could not be mapped.
    #[error("cannot map the snapshot's memory file")]
    SnapshotMemory(#[source] std::io::Error),
}

/// A snapshot to restore, read and checked before anything else is built.
#[derive(Debug)]
pub struct Restore {
    /// Where it came from (for errors).
    pub dir: std::path::PathBuf,
    /// The machine's state.
    pub state: crate::snapshot::MachineState,
    /// Its memory file.
    pub memory: std::fs::File,
}

/// Every host resource the VM needs, opened up front so a jailed VMM needs no host paths:
/// the kernel, initramfs, disks, entropy, console, /dev/kvm and the vsock listener.
pub struct Resources {
    kernel: Option<std::fs::File>,
    initrd: Option<std::fs::File>,
    kvm: kvm_ioctls::Kvm,
    vfio: Option<(vfio::host::Container, Vec<vfio::host::HostDevice>)>,
    disks: Vec<Disk>,
    entropy: Option<std::fs::File>,
    console: serial::ConsoleOut,
    console_in: Option<std::fs::File>,
    vsock: Option<UnixListener>,
    /// The control socket.
    api: Option<UnixListener>,
    /// The snapshot to restore instead of booting.
    restore: Option<Restore>,
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
        let kernel = match &cfg.kernel {
            Some(k) => Some(boot::open_kernel(k).map_err(Error::Boot)?),
            None => None,
        };
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
        let restore = match &cfg.restore {
            Some(dir) => Some(open_snapshot(dir, &kvm)?),
            None => None,
        };
        let api = match &cfg.api_sock {
            Some(p) => Some(crate::api::bind(p).map_err(|e| Error::ApiSocket(p.clone(), e))?),
            None => None,
        };
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
            api,
            restore,
            pvm: cpuid::pvm_workarounds(cfg.pvm_workarounds),
        })
    }
}

/// Opens and checks the snapshot in `dir` (format, checksum, moat-vmm version, host CPU).
fn open_snapshot(dir: &std::path::Path, kvm: &kvm_ioctls::Kvm) -> Result<Restore, Error> {
    use crate::snapshot::{self, Error as SnapError};
    let err = |e: SnapError| Error::Snapshot(dir.to_owned(), e);
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| err(SnapError::Io(std::io::Error::from_raw_os_error(e.errno()))))?;
    let cpu = snapshot::CpuIdentity::from_supported(cpuid.as_slice());
    let mut state_file =
        std::fs::File::open(dir.join(snapshot::STATE_FILE)).map_err(|e| err(SnapError::Io(e)))?;
    let state = snapshot::read_state(&mut state_file, &cpu).map_err(err)?;
    let memory =
        std::fs::File::open(dir.join(snapshot::MEMORY_FILE)).map_err(|e| err(SnapError::Io(e)))?;
    let len = memory.metadata().map_err(|e| err(SnapError::Io(e)))?.len();
    if len != state.memory_len() {
        return Err(err(SnapError::Length));
    }
    Ok(Restore {
        dir: dir.to_owned(),
        state,
        memory,
    })
}

/// Guest RAM mapped from a snapshot's memory file, privately: pages are read from the file
/// (through the page cache, shared by every restore of it) and copied only when written.
fn restored_memory(r: &Restore) -> Result<GuestMemoryMmap, Error> {
    use vm_memory::mmap::MmapRegionBuilder;
    let file = Arc::new(r.memory.try_clone().map_err(Error::SnapshotMemory)?);
    let mut regions = Vec::new();
    for reg in &r.state.regions {
        let len = usize::try_from(reg.len)
            .map_err(|_| Error::SnapshotMismatch("a region larger than memory".to_owned()))?;
        let map = MmapRegionBuilder::<()>::new(len)
            .with_file_offset(vm_memory::FileOffset::from_arc(
                file.clone(),
                reg.file_offset,
            ))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| Error::SnapshotMemory(std::io::Error::other(e.to_string())))?;
        let region = vm_memory::GuestRegionMmap::new(map, GuestAddress(reg.guest_addr))
            .ok_or_else(|| {
                Error::SnapshotMismatch("a region wraps the address space".to_owned())
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| Error::SnapshotMismatch(format!("memory regions: {e}")))
}

/// Refuses a snapshot whose machine is not the configured one: RAM, vCPUs, devices in order.
fn check_fits(cfg: &VmConfig, r: &Restore, device_types: &[u32]) -> Result<(), Error> {
    let st = &r.state;
    if st.mem_bytes != cfg.mem_bytes {
        return Err(Error::SnapshotMismatch(format!(
            "it has {} MiB of memory, this VM {} MiB",
            st.mem_bytes >> 20,
            cfg.mem_bytes >> 20
        )));
    }
    let expected: Vec<(u64, u64)> = layout::ram_ranges(cfg.mem_bytes);
    let found: Vec<(u64, u64)> = st.regions.iter().map(|r| (r.guest_addr, r.len)).collect();
    if expected != found {
        return Err(Error::SnapshotMismatch(
            "its memory layout differs".to_owned(),
        ));
    }
    if st.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(Error::SnapshotMismatch(format!(
            "it has {} vCPUs, this VM {}",
            st.vcpus.len(),
            cfg.vcpus
        )));
    }
    let theirs: Vec<u32> = st.devices.iter().map(|d| d.device_type).collect();
    if theirs != device_types {
        return Err(Error::SnapshotMismatch(format!(
            "its virtio devices are {theirs:?} (by type, in slot order), this VM's {device_types:?}"
        )));
    }
    if !cfg.gpus.is_empty() {
        return Err(Error::SnapshotMismatch(
            "a restored VM cannot have PCI passthrough devices".to_owned(),
        ));
    }
    Ok(())
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
        kernel,
        mut initrd,
        kvm,
        vfio,
        disks,
        entropy,
        console,
        console_in,
        vsock,
        api,
        restore,
        pvm,
    } = res;
    let uds = uds_inside.or_else(|| cfg.vsock.as_ref().map(|v| v.uds.clone()));
    let mem = match &restore {
        Some(r) => Arc::new(restored_memory(r)?),
        None => {
            let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.mem_bytes)
                .into_iter()
                .map(|(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
                .collect();
            Arc::new(
                GuestMemoryMmap::from_ranges(&ranges)
                    .map_err(|e| Error::GuestMemory(cfg.mem_bytes, e))?,
            )
        }
    };

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
    // A restored guest's memory already holds its kernel, command line and MP table.
    let entry = match (&restore, kernel) {
        (Some(r), _) => {
            let types: Vec<u32> = devices.iter().map(|d| d.device_type()).collect();
            check_fits(cfg, r, &types)?;
            None
        }
        (None, Some(mut kernel)) => {
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
            crate::mptable::write(&mem, cfg.vcpus).map_err(Error::MpTable)?;
            Some(entry)
        }
        (None, None) => return Err(Error::NoKernel),
    };
    drop(initrd);

    let vm = Vm::new(kvm, &mem).map_err(Error::Kvm)?;
    if let Some(r) = &restore {
        r.state
            .vm
            .restore(&vm.fd())
            .map_err(|e| Error::Kvm(kvm::Error::Restore(e)))?;
    }
    let (exits, exit_rx) = ExitSender::channel();
    let stop = Arc::new(AtomicBool::new(false));

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(Error::Kvm)?;
    // With a control socket, console input may also be handed over later (`console-input`).
    let input_slot = match api {
        Some(_) => Some(Arc::new(
            serial::InputSlot::new().map_err(Error::ConsoleInput)?,
        )),
        None => None,
    };
    let input_ready = if console_in.is_some() || input_slot.is_some() {
        Some(serial::input_ready_eventfd().map_err(Error::ConsoleInput)?)
    } else {
        None
    };
    let serial = Arc::new(Mutex::new(
        serial::serial_device(
            IrqLine(serial_irq),
            input_ready.as_ref(),
            console,
            restore.as_ref().map(|r| &r.state.serial),
        )
        .map_err(Error::EventFd)?,
    ));
    if let Some(ready) = input_ready {
        serial::spawn_input_thread(
            console_in,
            input_slot.clone(),
            ready,
            serial.clone(),
            cfg.seccomp,
        )
        .map_err(|e| Error::Thread("serial-in".to_owned(), e))?;
    }
    let i8042 = I8042::new(ResetLine::new(exits.clone(), stop.clone()));
    let mut bus = Bus::new(serial.clone(), i8042);
    let mut transports = Vec::new();
    for (i, (dev, slot)) in devices.into_iter().zip(&slots).enumerate() {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irq, slot.irq).map_err(Error::Kvm)?;
        let mut t =
            MmioTransport::new(dev, mem.clone(), Interrupt::new(irq)).map_err(Error::Transport)?;
        for (q, evt) in (0u32..).zip(t.queue_notifiers()) {
            vm.register_ioevent(evt, slot.base + QUEUE_NOTIFY_OFFSET, q)
                .map_err(Error::Kvm)?;
        }
        if let Some(state) = restore.as_ref().and_then(|r| r.state.devices.get(i)) {
            t.restore(state)
                .map_err(|e| Error::SnapshotMismatch(e.to_string()))?;
        }
        let t = Arc::new(Mutex::new(t));
        transports.push(t.clone());
        bus.add_mmio(slot.base, layout::VIRTIO_MMIO_SIZE, t);
    }
    let passthrough = attach_pci(cfg, &vm, &mem, vfio, &mut bus)?;
    let pci = !passthrough.is_empty();
    let bus = Arc::new(bus);
    let extras = seccomp::Extras {
        passthrough: pci,
        snapshot: api.is_some(),
    };
    if api.is_some() {
        kvm::vcpu::install_kick_handler().map_err(Error::ConsoleInput)?;
    }

    tracing::info!(
        pvm_workarounds = pvm,
        entry = entry.map(|e| e.entry()),
        restored = restore.is_some(),
        "starting"
    );
    let (started_tx, started_rx) = mpsc::channel::<Instant>();
    let mut vcpu_handles = Vec::new();
    for index in 0..cfg.vcpus {
        let gate = api.is_some().then(|| Arc::new(kvm::vcpu::Gate::default()));
        if cfg.start_paused
            && let Some(g) = &gate
        {
            g.request_pause();
        }
        let vcpu = match (&restore, entry) {
            (Some(r), _) => {
                let state =
                    r.state.vcpus.get(usize::from(index)).ok_or_else(|| {
                        Error::SnapshotMismatch(format!("no state for vCPU {index}"))
                    })?;
                vm.restore_vcpu(index, state, gate.clone())
            }
            (None, Some(entry)) => vm.create_vcpu(index, cfg.vcpus, entry, pvm, gate.clone()),
            (None, None) => return Err(Error::NoKernel),
        }
        .map_err(Error::Kvm)?;
        let (bus, exits, stop, mem) = (bus.clone(), exits.clone(), stop.clone(), mem.clone());
        let confine = cfg.seccomp;
        let started = (index == 0).then(|| started_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if confine && let Err(e) = seccomp::install_with(Role::Vcpu, extras) {
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
        if let Some(gate) = gate {
            vcpu_handles.push(crate::api::VcpuHandle { gate, thread });
        }
    }
    if restore.is_some() {
        // Restored devices start now that every vCPU (and its local APIC) exists.
        for t in &transports {
            if let Ok(mut t) = t.lock() {
                t.resume_device();
            }
        }
    }
    if let Some(listener) = api {
        let machine = crate::api::Machine {
            vm: vm.fd(),
            mem: mem.clone(),
            mem_bytes: cfg.mem_bytes,
            vcpus: vcpu_handles,
            transports,
            serial: serial.clone(),
            console_cap: cfg.serial_cap,
            console_input: input_slot,
            cpu: vm.cpu_identity().map_err(Error::Kvm)?,
            xsave_size: vm.xsave_size(),
            passthrough: pci,
        };
        crate::api::spawn(listener, machine, cfg.seccomp)
            .map_err(|e| Error::Thread("api".to_owned(), e))?;
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
        seccomp::install_with(Role::Main, extras).map_err(Error::Seccomp)?;
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
