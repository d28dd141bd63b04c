//! VM configuration: a TOML file (unknown fields refused) overlaid by command-line flags.
//! Everything is parsed once here into types that cannot hold an invalid value; nothing the
//! guest sends later can choose a host path, port or identity.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::layout::CMDLINE_MAX;
use moat_host_probe::pci::PciAddress;

/// Most passthrough devices one VM takes.
pub const MAX_GPUS: usize = 8;

/// Errors from reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too many virtio devices for the MMIO window.
    #[error("{0} virtio devices is more than 16")]
    TooManyDevices(usize),
    /// The config file is not valid TOML for this schema.
    #[error("cannot parse config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// Starting paused without a control socket would never start.
    #[error("--start-paused needs --api-sock (nothing else could resume the VM)")]
    PausedWithoutApi,
    /// No kernel was given.
    #[error(
        "no kernel given (set `kernel` in the config or pass --kernel, or --restore a snapshot)"
    )]
    NoKernel,
    /// Memory size outside what the VMM supports.
    #[error("guest memory of {0} MiB is outside 16..=65536 MiB")]
    MemSize(u64),
    /// vCPU count outside what the VMM supports.
    #[error("{0} vCPUs is outside 1..=32")]
    VcpuCount(u8),
    /// The command line does not fit its slot.
    #[error("kernel command line is {0} bytes, longer than {max}", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// Console input asked for with the console going to a file.
    #[error("serial input needs the console on stdout (it is refused with serial out)")]
    SerialInputNeedsStdout,
    /// The same device named twice.
    #[error("GPU {0} is given twice")]
    DuplicateGpu(PciAddress),
    /// Too many passthrough devices.
    #[error("{0} GPUs is more than {MAX_GPUS}")]
    TooManyGpus(usize),
    /// A reserved or out-of-range guest CID.
    #[error("guest CID {0} is reserved or out of range (3..=0xfffffffe)")]
    GuestCid(u64),
}

/// A guest context id for vsock; 0, 1, 2 and `u32::MAX` are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCid(u32);

impl GuestCid {
    /// The CID as the wire carries it.
    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl TryFrom<u64> for GuestCid {
    type Error = Error;
    fn try_from(v: u64) -> Result<Self, Error> {
        match u32::try_from(v) {
            Ok(c) if (3..u32::MAX).contains(&c) => Ok(Self(c)),
            _ => Err(Error::GuestCid(v)),
        }
    }
}

/// Whether to apply the nested-PVM workarounds (hide CX16, XSAVE, SMAP and friends; report an
/// Intel vendor; append `cpuid::PVM_CMDLINE` to the guest's command line). `auto` applies them
/// when the host's KVM is the `kvm_pvm` module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    /// Decide from the host.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// The kernel image's format, and so its boot protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    /// Read it from the file: ELF magic, or a bzImage's `HdrS` setup header.
    #[default]
    Auto,
    /// An ELF with a PVH entry note, booted by the PVH protocol.
    Elf,
    /// A bzImage, booted by the Linux 64-bit boot protocol.
    #[serde(rename = "bzimage")]
    #[value(name = "bzimage")]
    BzImage,
}

/// The file form of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kernel: an ELF with a PVH entry note, or a bzImage.
    pub kernel: Option<PathBuf>,
    /// The kernel's format (`auto` reads it from the file).
    #[serde(default)]
    pub kernel_format: KernelFormat,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Initramfs, handed to the guest as PVH module 0.
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    pub mem_mib: Option<u64>,
    /// vCPU count.
    pub vcpus: Option<u8>,
    /// Serial console.
    #[serde(default)]
    pub serial: SerialFile,
    /// vsock device.
    pub vsock: Option<VsockFile>,
    /// CPU model choices.
    #[serde(default)]
    pub cpu: CpuFile,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub block: Vec<BlockFile>,
    /// Offer a virtio-rng device.
    pub rng: Option<bool>,
    /// Per-thread seccomp filters (on unless set to false; off only for debugging).
    pub seccomp: Option<bool>,
    /// Run jailed (as root, or unprivileged through a user namespace).
    pub jail: Option<JailFile>,
    /// PCI devices (GPUs) passed through with VFIO, in guest slot order.
    #[serde(default)]
    pub gpu: Vec<GpuFile>,
    /// The control socket (pause, resume, snapshot; `crate::api`).
    pub api_sock: Option<PathBuf>,
    /// Restore this snapshot directory instead of booting a kernel.
    pub restore: Option<PathBuf>,
    /// Start with every vCPU paused (until `resume` on the control socket).
    pub start_paused: Option<bool>,
    /// The fake VFIO device of the tests (never from a file; only the hidden test flag).
    #[cfg(feature = "test-utils")]
    #[serde(skip)]
    pub test_fake_gpu: bool,
}

/// `[[gpu]]` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFile {
    /// Host PCI address (`0000:41:00.0`), bound to vfio-pci.
    pub address: PciAddress,
}

/// `[jail]` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailFile {
    /// Directory that becomes the VMM's root (created if missing, must be empty).
    pub dir: PathBuf,
    /// Unprivileged uid (default 65534).
    pub uid: Option<u32>,
    /// Unprivileged gid (default 65534).
    pub gid: Option<u32>,
    /// A user namespace first: `auto` (when not root), `on`, `off` (root only).
    #[serde(default)]
    pub user_namespace: Toggle,
}

/// `[[block]]` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockFile {
    /// Disk image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
}

/// `[serial]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialFile {
    /// File to write the console to; stdout when absent.
    pub out: Option<PathBuf>,
    /// Most bytes of console output kept.
    pub cap_bytes: Option<u64>,
    /// Feed stdin to the guest's COM1: `auto` (when the console is stdout and stdin is
    /// open), `on` (refused with `out`), `off`.
    #[serde(default)]
    pub input: Toggle,
}

/// `[vsock]` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockFile {
    /// Host Unix socket path (Firecracker's convention).
    pub uds: PathBuf,
    /// Guest CID.
    pub guest_cid: Option<u64>,
}

/// `[cpu]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFile {
    /// Nested-PVM workarounds.
    #[serde(default)]
    pub pvm_workarounds: Toggle,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

/// Default console cap: enough for a kernel boot log, small enough that a chatty guest
/// cannot fill the host disk.
pub const DEFAULT_SERIAL_CAP: u64 = 16 << 20;
/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Default guest CID.
pub const DEFAULT_CID: u64 = 3;

/// The checked configuration the VMM runs from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (`None` when restoring a snapshot).
    pub kernel: Option<PathBuf>,
    /// Its format.
    pub kernel_format: KernelFormat,
    /// Command line given by the operator (device declarations are appended by the VMM).
    pub cmdline: String,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Console file, stdout when `None`.
    pub serial_out: Option<PathBuf>,
    /// Console cap in bytes.
    pub serial_cap: u64,
    /// Console input from stdin (never with `serial_out`).
    pub serial_in: Toggle,
    /// vsock device.
    pub vsock: Option<VsockConfig>,
    /// Nested-PVM workarounds.
    pub pvm_workarounds: Toggle,
    /// Disks.
    pub disks: Vec<BlockFile>,
    /// virtio-rng.
    pub rng: bool,
    /// Per-thread seccomp filters.
    pub seccomp: bool,
    /// The jail, if any.
    pub jail: Option<JailFile>,
    /// Host PCI functions passed through with VFIO (distinct).
    pub gpus: Vec<PciAddress>,
    /// The control socket.
    pub api_sock: Option<PathBuf>,
    /// The snapshot directory to restore.
    pub restore: Option<PathBuf>,
    /// vCPUs wait for `resume` before they run.
    pub start_paused: bool,
    /// Offer the fake VFIO device (tests only).
    #[cfg(feature = "test-utils")]
    pub test_fake_gpu: bool,
}

/// A checked vsock device configuration.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// Host Unix socket path.
    pub uds: PathBuf,
    /// Guest CID.
    pub cid: GuestCid,
}

impl VmConfig {
    /// Checks a file config (already overlaid with flags) into a `VmConfig`.
    pub fn from_file(f: FileConfig) -> Result<Self, Error> {
        let kernel = match (f.kernel, &f.restore) {
            (Some(k), _) => Some(k),
            (None, Some(_)) => None,
            (None, None) => return Err(Error::NoKernel),
        };
        let start_paused = f.start_paused.unwrap_or(false);
        if start_paused && f.api_sock.is_none() {
            return Err(Error::PausedWithoutApi);
        }
        let cmdline = f.cmdline.unwrap_or_default();
        // Leave room for the device declarations the VMM appends.
        if cmdline.len() >= CMDLINE_MAX - 512 {
            return Err(Error::CmdlineTooLong(cmdline.len()));
        }
        let mem_mib = f.mem_mib.unwrap_or(DEFAULT_MEM_MIB);
        if !(16..=65536).contains(&mem_mib) {
            return Err(Error::MemSize(mem_mib));
        }
        let vcpus = f.vcpus.unwrap_or(1);
        if !(1..=32).contains(&vcpus) {
            return Err(Error::VcpuCount(vcpus));
        }
        let count =
            usize::from(f.vsock.is_some()) + f.block.len() + usize::from(f.rng == Some(true));
        if count > 16 {
            return Err(Error::TooManyDevices(count));
        }
        let vsock = match f.vsock {
            Some(v) => Some(VsockConfig {
                uds: v.uds,
                cid: GuestCid::try_from(v.guest_cid.unwrap_or(DEFAULT_CID))?,
            }),
            None => None,
        };
        let mut gpus: Vec<PciAddress> = Vec::new();
        for g in &f.gpu {
            if gpus.contains(&g.address) {
                return Err(Error::DuplicateGpu(g.address));
            }
            gpus.push(g.address);
        }
        if gpus.len() > MAX_GPUS {
            return Err(Error::TooManyGpus(gpus.len()));
        }
        let serial_in = match (f.serial.input, &f.serial.out) {
            (Toggle::On, Some(_)) => return Err(Error::SerialInputNeedsStdout),
            (_, Some(_)) => Toggle::Off,
            (t, None) => t,
        };
        Ok(Self {
            kernel,
            kernel_format: f.kernel_format,
            cmdline,
            initrd: f.initrd,
            mem_bytes: mem_mib << 20,
            vcpus,
            serial_out: f.serial.out,
            serial_cap: f.serial.cap_bytes.unwrap_or(DEFAULT_SERIAL_CAP),
            serial_in,
            vsock,
            pvm_workarounds: f.cpu.pvm_workarounds,
            disks: f.block,
            rng: f.rng.unwrap_or(false),
            seccomp: f.seccomp.unwrap_or(true),
            jail: f.jail,
            gpus,
            api_sock: f.api_sock,
            restore: f.restore,
            start_paused,
            #[cfg(feature = "test-utils")]
            test_fake_gpu: f.test_fake_gpu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let f = FileConfig::parse(
            r#"
            kernel = "/k"
            kernel_format = "bzimage"
            cmdline = "console=ttyS0"
            mem_mib = 128
            vcpus = 2
            rng = true
            [serial]
            out = "/tmp/s"
            cap_bytes = 1024
            [vsock]
            uds = "/tmp/v.sock"
            guest_cid = 7
            [cpu]
            pvm_workarounds = "on"
            [[block]]
            path = "/root.img"
            read_only = true
            [[block]]
            path = "/home.img"
            "#,
        );
        assert!(f.is_ok(), "{f:?}");
        let c = VmConfig::from_file(f.unwrap_or_default());
        let c = c.ok();
        assert_eq!(c.as_ref().map(|c| c.mem_bytes), Some(128 << 20));
        assert_eq!(
            c.as_ref().map(|c| c.kernel_format),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            c.as_ref()
                .and_then(|c| c.vsock.as_ref())
                .map(|v| v.cid.get()),
            Some(7)
        );
    }

    #[test]
    fn gpus_parse_in_order() {
        let f = FileConfig::parse(
            "kernel = \"/k\"\n[[gpu]]\naddress = \"0000:41:00.0\"\n[[gpu]]\naddress = \"42:00.0\"\n",
        );
        let c = VmConfig::from_file(f.unwrap_or_default()).ok();
        let names: Vec<String> = c
            .map(|c| c.gpus.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        assert_eq!(names, vec!["0000:41:00.0", "0000:42:00.0"]);
    }

    #[test]
    fn unknown_gpu_fields_and_bad_addresses_are_refused() {
        assert!(FileConfig::parse("[[gpu]]\naddress = \"41:00.0\"\nrom = true\n").is_err());
        assert!(FileConfig::parse("[[gpu]]\naddress = \"41:00\"\n").is_err());
    }

    #[test]
    fn a_gpu_given_twice_is_refused() {
        let f = FileConfig::parse(
            "kernel = \"/k\"\n[[gpu]]\naddress = \"41:00.0\"\n[[gpu]]\naddress = \"0000:41:00.0\"\n",
        );
        assert!(matches!(
            VmConfig::from_file(f.unwrap_or_default()),
            Err(Error::DuplicateGpu(_))
        ));
    }

    #[test]
    fn unknown_field_is_refused() {
        assert!(FileConfig::parse("kernel = \"/k\"\nmemory = 5\n").is_err());
    }

    #[test]
    fn unknown_kernel_format_is_refused() {
        assert!(FileConfig::parse("kernel = \"/k\"\nkernel_format = \"pe\"\n").is_err());
    }

    #[test]
    fn unknown_nested_field_is_refused() {
        assert!(FileConfig::parse("[vsock]\nuds = \"/x\"\nport = 5\n").is_err());
    }

    #[test]
    fn reserved_cids_are_refused() {
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert!(GuestCid::try_from(cid).is_err(), "cid {cid}");
        }
        assert!(GuestCid::try_from(3).is_ok());
    }

    #[test]
    fn serial_input_with_a_console_file_is_refused() {
        let f = FileConfig::parse("kernel = \"/k\"\n[serial]\nout = \"/c\"\ninput = \"on\"\n");
        assert!(matches!(
            VmConfig::from_file(f.unwrap_or_default()),
            Err(Error::SerialInputNeedsStdout)
        ));
    }

    #[test]
    fn serial_input_is_off_when_the_console_is_a_file() {
        let f = FileConfig::parse("kernel = \"/k\"\n[serial]\nout = \"/c\"\n");
        let c = VmConfig::from_file(f.unwrap_or_default()).ok();
        assert_eq!(c.map(|c| c.serial_in), Some(Toggle::Off));
    }

    #[test]
    fn missing_kernel_is_refused() {
        assert!(matches!(
            VmConfig::from_file(FileConfig::default()),
            Err(Error::NoKernel)
        ));
    }

    #[test]
    fn tiny_memory_is_refused() {
        let f = FileConfig {
            kernel: Some("/k".into()),
            mem_mib: Some(8),
            ..FileConfig::default()
        };
        assert!(matches!(VmConfig::from_file(f), Err(Error::MemSize(8))));
    }
}
