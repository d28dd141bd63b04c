//! Loading a kernel and writing its boot parameters (PVH boot protocol).
//!
//! The kernel is an ELF carrying a `XEN_ELFNOTE_PHYS32_ENTRY` note (a Linux vmlinux built with
//! `CONFIG_PVH`, or the probe guest). Its segments go to their physical addresses; the command
//! line, the memory map, the initramfs (as PVH module 0) and `hvm_start_info` are written at
//! the addresses of [`crate::layout`]; the vCPU starts in 32-bit protected mode with `%ebx`
//! pointing at `hvm_start_info` (see [`crate::kvm::vcpu`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// PVH `hvm_start_info` magic.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
const E820_RESERVED: u32 = 2;

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
    /// The ELF loader refused the kernel.
    #[error("cannot load kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The ELF has no PVH entry note (bzImage and the 64-bit Linux boot protocol are not built).
    #[error("kernel has no PVH entry note (build it with CONFIG_PVH)")]
    NoPvhEntry,
    /// The command line is not acceptable.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
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
    #[error("cannot write PVH boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Too many memory-map entries.
    #[error("memory map has too many entries")]
    MemmapTooLong,
}

/// Where the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Physical address of `hvm_start_info`, for `%ebx`.
    pub start_info: u64,
}

/// What to boot.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// Kernel ELF, already open (see [`open_kernel`]).
    pub kernel: &'a mut File,
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

/// Loads the kernel and writes every boot structure; returns where the vCPU starts.
pub fn load(mem: &GuestMemoryMmap, spec: BootSpec<'_>) -> Result<BootEntry, Error> {
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

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(Error::Cmdline)?;
    cmdline.insert_str(spec.cmdline).map_err(Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline).map_err(Error::WriteCmdline)?;

    let low_ram_end = spec.mem_bytes.min(layout::MMIO_GAP_START);
    let mut modules = Vec::new();
    if let Some(file) = spec.initrd {
        let m = load_initrd(mem, file, loaded.kernel_end, low_ram_end)?;
        modules.push(m);
    }

    let memmap = memory_map(spec.mem_bytes);
    if memmap.len() > layout::PVH_MEMMAP_MAX {
        return Err(Error::MemmapTooLong);
    }
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).map_err(|_| Error::MemmapTooLong)?,
        nr_modules: u32::try_from(modules.len()).map_err(|_| Error::MemmapTooLong)?,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST_ADDR
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootParams)?;
    write_gdt(mem)?;

    Ok(BootEntry {
        entry: entry.0,
        start_info: layout::PVH_INFO_ADDR,
    })
}

/// Copies the initramfs to the top of low RAM, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<hvm_modlist_entry, Error> {
    let size = file.metadata().map_err(Error::InitrdSize)?.len();
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout::HIMEM_START))
        .ok_or(Error::InitrdTooBig(size))?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooBig(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(Error::GuestMemory)?;
    Ok(hvm_modlist_entry {
        paddr: addr,
        size,
        ..Default::default()
    })
}

/// The memory map the guest is told: low RAM, the legacy hole, high RAM around the MMIO gap.
pub fn memory_map(mem_bytes: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
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

/// The GDT of the PVH entry state: null, 32-bit code (0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, d) in (0u64..).zip(GDT) {
        mem.write_obj(d, GuestAddress(layout::GDT_ADDR + i * 8))
            .map_err(Error::GuestMemory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reports_low_and_high_ram() {
        let map = memory_map(64 << 20);
        let ram: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e.type_ == E820_RAM)
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
        for e in map.iter().filter(|e| e.type_ == E820_RAM) {
            let end = e.addr + e.size;
            assert!(end <= layout::MMIO_GAP_START || e.addr >= layout::MMIO_GAP_END);
        }
    }

    #[test]
    fn non_elf_kernel_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]);
        let Ok(mem) = mem else {
            panic!("cannot map test memory")
        };
        let dir = std::env::temp_dir().join(format!("moat-vmm-boot-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let k = dir.join("not-elf");
        assert!(std::fs::write(&k, b"MZ this is not an ELF").is_ok());
        let Ok(mut f) = open_kernel(&k) else {
            panic!("cannot open the test kernel")
        };
        let spec = BootSpec {
            kernel: &mut f,
            cmdline: "",
            initrd: None,
            mem_bytes: 16 << 20,
        };
        assert!(matches!(load(&mem, spec), Err(Error::LoadKernel(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
