//! `moat-vmm`: boots one microVM from a TOML config and/or flags. Exit codes: see
//! `moat_vmm::exit`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use moat_host_probe::pci::PciAddress;
use moat_vmm::config::{
    BlockFile, FileConfig, GpuFile, JailFile, KernelFormat, SerialFile, Toggle, VmConfig, VsockFile,
};
use moat_vmm::exit::EXIT_CONFIG;
use moat_vmm::jail::{self, JailSpec};

/// Boot a moat microVM.
#[derive(Debug, Parser)]
#[command(name = "moat-vmm", version)]
struct Args {
    /// TOML config file (unknown fields are refused); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: an ELF with a PVH entry note (vmlinux with CONFIG_PVH, or the probe guest), or
    /// a bzImage (Linux 64-bit boot protocol).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The kernel's format; `auto` reads it from the file.
    #[arg(long, value_enum)]
    kernel_format: Option<KernelFormat>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    /// vCPU count.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Host Unix socket for the vsock device (guest port P connects to `<uds>_P`).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device.
    #[arg(long)]
    vsock_cid: Option<u64>,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// Most bytes of serial output kept.
    #[arg(long)]
    serial_cap: Option<u64>,
    /// Feed stdin to the guest's serial port: auto (when the console is stdout and stdin is
    /// open), on, off. The host terminal goes to raw mode while the VM runs if stdin is one.
    #[arg(long, value_enum)]
    serial_in: Option<Toggle>,
    /// Add a read-write disk (repeatable). Guest order: config-file disks, then --block-ro,
    /// then --block.
    #[arg(long = "block")]
    block: Vec<PathBuf>,
    /// Add a read-only disk (repeatable).
    #[arg(long = "block-ro")]
    block_ro: Vec<PathBuf>,
    /// Pass a host PCI function (a GPU bound to vfio-pci) through, by address (repeatable;
    /// every function of its IOMMU group must be given).
    #[arg(long = "gpu", value_name = "PCI_ADDRESS")]
    gpu: Vec<PciAddress>,
    /// Test builds only: offer the fake VFIO device (a doorbell that fires MSI-X vectors).
    #[cfg(feature = "test-utils")]
    #[arg(long, hide = true)]
    test_fake_gpu: bool,
    /// Offer a virtio-rng device fed from the host's /dev/urandom.
    #[arg(long)]
    rng: bool,
    /// Jail the VMM (as root, or unprivileged in a user namespace): this empty directory
    /// becomes its root.
    #[arg(long)]
    jail_dir: Option<PathBuf>,
    /// Unprivileged uid inside the jail.
    #[arg(long, default_value_t = 65534)]
    jail_uid: u32,
    /// Unprivileged gid inside the jail.
    #[arg(long, default_value_t = 65534)]
    jail_gid: u32,
    /// Create a user namespace for the jail: auto (when not root), on, off.
    #[arg(long, value_enum)]
    jail_userns: Option<Toggle>,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Nested-PVM CPUID workarounds.
    #[arg(long, value_enum)]
    pvm_workarounds: Option<Toggle>,
    /// Print a cost report (time and CPU to the first KVM_RUN, memory) on stderr at exit.
    #[arg(long)]
    stats: bool,
    /// Stop the VM after this many seconds (exit code 4).
    #[arg(long)]
    timeout: Option<u64>,
    /// Control socket: `pause`, `resume`, `snapshot` (see moat_vmm::api).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Restore the snapshot in this directory instead of booting a kernel; memory, vCPUs and
    /// devices must be configured as they were (other host files may be given: each restore
    /// is a new machine).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Start with the vCPUs paused until `resume` on the control socket (a warm pool).
    #[arg(long)]
    start_paused: bool,
}

fn merged(args: Args) -> Result<(FileConfig, Option<Duration>), Box<dyn std::error::Error>> {
    let mut f = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    f.kernel = args.kernel.or(f.kernel);
    if let Some(k) = args.kernel_format {
        f.kernel_format = k;
    }
    f.cmdline = args.cmdline.or(f.cmdline);
    f.initrd = args.initrd.or(f.initrd);
    f.mem_mib = args.mem.or(f.mem_mib);
    f.vcpus = args.vcpus.or(f.vcpus);
    f.serial = SerialFile {
        out: args.serial_out.or(f.serial.out),
        cap_bytes: args.serial_cap.or(f.serial.cap_bytes),
        input: args.serial_in.unwrap_or(f.serial.input),
    };
    if let Some(uds) = args.vsock_uds {
        let cid = args
            .vsock_cid
            .or(f.vsock.as_ref().and_then(|v| v.guest_cid));
        f.vsock = Some(VsockFile {
            uds,
            guest_cid: cid,
        });
    }
    for path in args.block_ro {
        f.block.push(BlockFile {
            path,
            read_only: true,
        });
    }
    for path in args.block {
        f.block.push(BlockFile {
            path,
            read_only: false,
        });
    }
    if let Some(dir) = args.jail_dir {
        f.jail = Some(JailFile {
            dir,
            uid: Some(args.jail_uid),
            gid: Some(args.jail_gid),
            user_namespace: args.jail_userns.unwrap_or_default(),
        });
    } else if let (Some(j), Some(t)) = (f.jail.as_mut(), args.jail_userns) {
        j.user_namespace = t;
    }
    for address in args.gpu {
        f.gpu.push(GpuFile { address });
    }
    #[cfg(feature = "test-utils")]
    {
        f.test_fake_gpu = args.test_fake_gpu;
    }
    if args.no_seccomp {
        f.seccomp = Some(false);
    }
    if args.rng {
        f.rng = Some(true);
    }
    if let Some(t) = args.pvm_workarounds {
        f.cpu.pvm_workarounds = t;
    }
    f.api_sock = args.api_sock.or(f.api_sock);
    f.restore = args.restore.or(f.restore);
    if args.start_paused {
        f.start_paused = Some(true);
    }
    Ok((f, args.timeout.map(Duration::from_secs)))
}

/// Runs the VM, jailed when the config asks for it.
fn run(
    cfg: &VmConfig,
    timeout: Option<Duration>,
    stats: Option<std::time::Instant>,
) -> Result<moat_vmm::exit::VmExit, Box<dyn std::error::Error>> {
    let Some(j) = &cfg.jail else {
        return Ok(moat_vmm::vmm::run(cfg, timeout, stats)?);
    };
    jail::close_inherited_fds()?;
    let snapshot_files = cfg.restore.iter().flat_map(|d| {
        [
            d.join(moat_vmm::snapshot::STATE_FILE),
            d.join(moat_vmm::snapshot::MEMORY_FILE),
        ]
    });
    let exposed: Vec<PathBuf> = cfg
        .kernel
        .iter()
        .chain(cfg.initrd.iter())
        .chain(cfg.disks.iter().map(|d| &d.path))
        .cloned()
        .chain(snapshot_files)
        .collect();
    for path in &exposed {
        jail::check_exposed(path)?;
    }
    let res = moat_vmm::vmm::Resources::open(cfg)?;
    let inside = jail::enter(&JailSpec {
        dir: j.dir.clone(),
        uid: j.uid.unwrap_or(65534),
        gid: j.gid.unwrap_or(65534),
        uds: cfg.vsock.as_ref().map(|v| v.uds.clone()),
        max_files: 4096,
        user_ns: match j.user_namespace {
            Toggle::On => true,
            Toggle::Off => false,
            Toggle::Auto => !jail::is_root(),
        },
    })?;
    Ok(moat_vmm::vmm::run_with(
        cfg, res, inside.uds, timeout, stats,
    )?)
}

/// Prints an error and its causes, on one line.
fn print_chain(err: &(dyn std::error::Error + 'static)) {
    eprintln!("moat-vmm: {}", moat_log::error_chain(err));
}

fn main() -> ExitCode {
    let t0 = std::time::Instant::now();
    // virtio-queue logs through `log` without throttling; our own rate-limited warnings cover
    // what it would say.
    moat_log::init("MOAT_VMM_LOG", "warn,virtio_queue=off");
    let args = Args::parse();
    let stats = args.stats.then_some(t0);
    let cfg = match merged(args).and_then(|(f, t)| Ok((VmConfig::from_file(f)?, t))) {
        Ok(c) => c,
        Err(e) => {
            print_chain(e.as_ref());
            // Nothing touched the terminal yet.
            return ExitCode::from(u8::try_from(EXIT_CONFIG).unwrap_or(2));
        }
    };
    let (cfg, timeout) = cfg;
    let code = match run(&cfg, timeout, stats) {
        Ok(exit) => {
            tracing::info!(?exit, "VM stopped");
            if exit.code() != 0 {
                eprintln!("moat-vmm: {exit:?}");
            }
            exit.code()
        }
        Err(e) => {
            print_chain(e.as_ref());
            1
        }
    };
    moat_vmm::terminal::restore();
    // vCPU threads may still sit in KVM_RUN; leave without unwinding them.
    std::process::exit(code)
}
