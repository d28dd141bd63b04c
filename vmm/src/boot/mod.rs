//! Loading a kernel and writing its boot parameters.
//!
//! Two formats, two boot protocols, one memory map:
//!
//! - **ELF with a PVH entry note** (`XEN_ELFNOTE_PHYS32_ENTRY`: a vmlinux built with
//!   `CONFIG_PVH`, or the probe guest): segments go to their physical addresses; the command
//!   line, the memory map, the initramfs (PVH module 0) and `hvm_start_info` are written at the
//!   addresses of [`crate::layout`]; the vCPU starts in 32-bit protected mode with `%ebx`
//!   pointing at `hvm_start_info` ([`pvh`]).
//! - **bzImage** (Linux boot protocol 2.12 or later, 64-bit capable): its protected-mode part
//!   goes to 1 MiB, the zero page (`boot_params`: the image's setup header, the e820 table, the
//!   command line and initramfs fields) is written, and the vCPU starts in 64-bit long mode on
//!   an identity map with `%rsi` pointing at the zero page ([`linux`]), as Firecracker starts a
//!   vmlinux.
//!
//! The format is read from the file (ELF magic, or the `HdrS` setup-header magic at 0x202)
//! unless the configuration names it.

pub mod linux;
pub mod pvh;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::KernelFormat;
use crate::layout;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// ELF magic at offset 0.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// Linux setup-header magic ("HdrS") at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// Where the setup-header magic sits in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;

/// Errors from loading the kernel and writing boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file could not be read to find its format.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel is neither an ELF nor a bzImage.
    #[error("kernel is neither an ELF nor a bzImage (no ELF magic, no HdrS header)")]
    UnknownFormat,
    /// The ELF loader refused the kernel.
    #[error("cannot load kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The ELF has no PVH entry note.
    #[error("kernel ELF has no PVH entry note (build it with CONFIG_PVH, or boot its bzImage)")]
    NoPvhEntry,
    /// The bzImage cannot be started by the 64-bit boot protocol.
    #[error("bzImage speaks boot protocol {version:#06x} without a 64-bit entry (needs 2.12+)")]
    NoLinux64Entry {
        /// The image's boot protocol version.
        version: u16,
    },
    /// The decompressed kernel would not fit in guest RAM.
    #[error("the kernel needs guest memory up to {0:#x}, more than the guest has")]
    KernelTooBig(u64),
    /// The command line is not acceptable.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is longer than the kernel accepts.
    #[error("command line of {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLongForKernel {
        /// Its length.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The command line could not be written.
    #[error("cannot write kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs size could not be read.
    #[error("cannot read the initramfs size")]
    InitrdSize(#[source] std::io::Error),
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("initramfs of {0} bytes does not fit in guest memory")]
    InitrdTooBig(u64),
    /// Copying into guest memory failed.
    #[error("cannot write boot data to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The boot configurator refused the parameters.
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Too many memory-map entries.
    #[error("memory map has too many entries")]
    MemmapTooLong,
}

/// Where and how the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh {
        /// The 32-bit PVH entry point.
        entry: u64,
        /// Physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode on an identity map, `%rsi` = the zero page.
    Linux64 {
        /// The 64-bit entry point (load address + 0x200 for a bzImage).
        entry: u64,
        /// Physical address of `boot_params`.
        boot_params: u64,
    },
}

impl BootEntry {
    /// The first guest instruction's address.
    pub fn entry(&self) -> u64 {
        match *self {
            Self::Pvh { entry, .. } | Self::Linux64 { entry, .. } => entry,
        }
    }
}

/// What to boot.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// Kernel image, already open (see [`open_kernel`]).
    pub kernel: &'a mut File,
    /// Its format, or `Auto` to read it from the file.
    pub format: KernelFormat,
    /// Full command line.
    pub cmdline: &'a str,
    /// Initramfs, already open (see [`open_initrd`]).
    pub initrd: Option<&'a mut File>,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
}

/// Opens the kernel image (before any jail: the guest never names a host path).
pub fn open_kernel(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::OpenKernel {
        path: path.to_owned(),
        source,
    })
}

/// Opens the initramfs.
pub fn open_initrd(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::ReadInitrd {
        path: path.to_owned(),
        source,
    })
}

/// Reads the kernel's format from its first bytes: ELF magic, or a bzImage's `HdrS`.
pub fn detect_format(kernel: &File) -> Result<KernelFormat, Error> {
    let mut magic = [0u8; 4];
    match kernel.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == ELF_MAGIC => return Ok(KernelFormat::Elf),
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Error::UnknownFormat);
        }
        Err(e) => return Err(Error::ReadKernel(e)),
    }
    match kernel.read_exact_at(&mut magic, BZIMAGE_MAGIC_OFFSET) {
        Ok(()) if magic == BZIMAGE_MAGIC => Ok(KernelFormat::BzImage),
        Ok(()) => Err(Error::UnknownFormat),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::UnknownFormat),
        Err(e) => Err(Error::ReadKernel(e)),
    }
}

/// Loads the kernel and writes every boot structure; returns where the vCPU starts.
pub fn load(mem: &GuestMemoryMmap, spec: BootSpec<'_>) -> Result<BootEntry, Error> {
    let format = match spec.format {
        KernelFormat::Auto => detect_format(spec.kernel)?,
        f => f,
    };
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(Error::Cmdline)?;
    cmdline.insert_str(spec.cmdline).map_err(Error::Cmdline)?;
    let low_ram_end = spec.mem_bytes.min(layout::MMIO_GAP_START);
    let map = memory_map(spec.mem_bytes);

    if format == KernelFormat::BzImage {
        let loaded = BzImage::load(
            mem,
            None,
            spec.kernel,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(Error::LoadKernel)?;
        let header = loaded.setup_header.ok_or(Error::UnknownFormat)?;
        let kernel = linux::KernelPlacement::of(loaded.kernel_load.0, &header)?;
        if kernel.reserved_end > low_ram_end {
            return Err(Error::KernelTooBig(kernel.reserved_end));
        }
        let initrd = match spec.initrd {
            Some(file) => {
                let top = low_ram_end.min(u64::from(header.initrd_addr_max).saturating_add(1));
                // Above the compressed image and what it decompresses into.
                let floor = kernel.reserved_end.max(loaded.kernel_end);
                Some(load_initrd(mem, file, floor, top)?)
            }
            None => None,
        };
        let params = linux::boot_params(header, spec.cmdline.len(), initrd, &map)?;
        load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
            .map_err(Error::WriteCmdline)?;
        linux::write(mem, &params)?;
        return Ok(BootEntry::Linux64 {
            entry: kernel.entry,
            boot_params: layout::ZERO_PAGE_ADDR,
        });
    }

    let loaded = Elf::load(
        mem,
        None,
        spec.kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(Error::LoadKernel)?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(Error::NoPvhEntry);
    };
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline).map_err(Error::WriteCmdline)?;
    let initrd = match spec.initrd {
        Some(file) => Some(load_initrd(mem, file, loaded.kernel_end, low_ram_end)?),
        None => None,
    };
    pvh::write(mem, &map, initrd)?;
    Ok(BootEntry::Pvh {
        entry: entry.0,
        start_info: layout::PVH_INFO_ADDR,
    })
}

/// Where the initramfs was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest physical address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Copies the initramfs as high as it fits below `top`, page aligned, and not below `floor`
/// (the end of what the kernel occupies).
fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    floor: u64,
    top: u64,
) -> Result<Initrd, Error> {
    let size = file.metadata().map_err(Error::InitrdSize)?.len();
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= floor.max(layout::HIMEM_START))
        .ok_or(Error::InitrdTooBig(size))?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooBig(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(Error::GuestMemory)?;
    Ok(Initrd { addr, size })
}

/// One entry of the memory map the guest is told (e820 semantics, both protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map the guest is told: low RAM, the legacy hole, high RAM around the MMIO gap.
pub fn memory_map(mem_bytes: u64) -> Vec<MemoryRange> {
    let entry = |addr, size, kind| MemoryRange { addr, size, kind };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (start, len) in layout::ram_ranges(mem_bytes) {
        let (start, len) = if start == 0 {
            (layout::HIMEM_START, len - layout::HIMEM_START)
        } else {
            (start, len)
        };
        map.push(entry(start, len, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn test_mem(bytes: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap()
    }

    pub(super) fn temp_file(name: &str, bytes: &[u8]) -> File {
        let dir = std::env::temp_dir().join(format!("moat-vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        File::open(&p).unwrap()
    }

    #[test]
    fn memory_map_reports_low_and_high_ram() {
        let map = memory_map(64 << 20);
        let ram: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(
            ram,
            vec![
                (0, layout::EBDA_START),
                (layout::HIMEM_START, (64 << 20) - layout::HIMEM_START)
            ]
        );
    }

    #[test]
    fn memory_map_never_covers_the_mmio_gap() {
        let map = memory_map(8 << 30);
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr + e.size;
            assert!(end <= layout::MMIO_GAP_START || e.addr >= layout::MMIO_GAP_END);
        }
    }

    #[test]
    fn elf_magic_is_detected() {
        let f = temp_file("elf", b"\x7fELF\x02\x01\x01 rest of an ELF");
        assert_eq!(detect_format(&f).unwrap(), KernelFormat::Elf);
    }

    #[test]
    fn bzimage_header_magic_is_detected() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let f = temp_file("bz", &img);
        assert_eq!(detect_format(&f).unwrap(), KernelFormat::BzImage);
    }

    #[test]
    fn unknown_kernel_format_is_refused() {
        let f = temp_file(
            "neither",
            b"MZ this is not a kernel at all, not even close to 0x202",
        );
        assert!(matches!(detect_format(&f), Err(Error::UnknownFormat)));
    }

    #[test]
    fn non_elf_kernel_is_refused_when_elf_is_configured() {
        let mem = test_mem(16 << 20);
        let mut f = temp_file("not-elf", b"MZ this is not an ELF");
        let spec = BootSpec {
            kernel: &mut f,
            format: KernelFormat::Elf,
            cmdline: "",
            initrd: None,
            mem_bytes: 16 << 20,
        };
        assert!(matches!(load(&mem, spec), Err(Error::LoadKernel(_))));
    }

    /// A minimal bzImage: one setup sector after the boot sector, the setup header of a
    /// relocatable 64-bit kernel, and `payload` as the protected-mode part.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        use linux_loader::loader::bootparam::setup_header;
        use vm_memory::ByteValued;
        let hdr = setup_header {
            setup_sects: 1,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 1, // LOADED_HIGH
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: 1, // XLF_KERNEL_64
            cmdline_size: 255,
            pref_address: 0x100_0000,
            init_size: 0x40_0000,
            ..Default::default()
        };
        let mut img = vec![0u8; 1024];
        img[0x1f1..0x1f1 + hdr.as_slice().len()].copy_from_slice(hdr.as_slice());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_boots_by_the_64_bit_protocol_with_our_zero_page() {
        use linux_loader::loader::bootparam::boot_params;
        let mem = test_mem(64 << 20);
        let mut kernel = temp_file("bzimage", &fake_bzimage(&[0xf4; 4096]));
        let mut initrd = temp_file("bz-initrd", &[0x5a; 5000]);
        let entry = load(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                format: KernelFormat::Auto,
                cmdline: "console=ttyS0",
                initrd: Some(&mut initrd),
                mem_bytes: 64 << 20,
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: 0x10_0200,
                boot_params: layout::ZERO_PAGE_ADDR
            }
        );
        // The protected-mode part sits at 1 MiB.
        let first: u8 = mem.read_obj(GuestAddress(layout::HIMEM_START)).unwrap();
        assert_eq!(first, 0xf4);
        let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        let initrd_addr = ((64u64 << 20) - 5000) & !0xfff;
        assert_eq!(u64::from(zp.hdr.ramdisk_image), initrd_addr);
        assert_eq!({ zp.hdr.ramdisk_size }, 5000);
        assert_eq!(usize::from(zp.e820_entries), memory_map(64 << 20).len());
        let byte: u8 = mem.read_obj(GuestAddress(initrd_addr)).unwrap();
        assert_eq!(byte, 0x5a);
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn bzimage_whose_kernel_does_not_fit_is_refused() {
        let mem = test_mem(16 << 20);
        let mut kernel = temp_file("bzimage-big", &fake_bzimage(&[0; 512]));
        let spec = BootSpec {
            kernel: &mut kernel,
            format: KernelFormat::BzImage,
            cmdline: "",
            initrd: None,
            mem_bytes: 16 << 20,
        };
        // It would decompress into [16 MiB, 20 MiB): past the end of 16 MiB of RAM.
        assert!(matches!(
            load(&mem, spec),
            Err(Error::KernelTooBig(0x140_0000))
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_page_below_the_limit() {
        let mem = test_mem(16 << 20);
        let mut f = temp_file("initrd", &[0x5a; 5000]);
        let got = load_initrd(&mem, &mut f, 2 << 20, 8 << 20).unwrap();
        assert_eq!(
            got,
            Initrd {
                addr: ((8 << 20) - 5000) & !0xfff,
                size: 5000
            }
        );
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let mem = test_mem(16 << 20);
        let mut f = temp_file("big-initrd", &vec![0u8; 3 << 20]);
        assert!(matches!(
            load_initrd(&mem, &mut f, 6 << 20, 8 << 20),
            Err(Error::InitrdTooBig(_))
        ));
    }
}
