//! The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"),
//! used for bzImage kernels: the zero page (`boot_params`), an identity map of the low 4 GiB,
//! and a GDT with the protocol's `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18).
//!
//! The vCPU then starts in long mode at the image's 64-bit entry (`startup_64`, 0x200 into
//! the protected-mode part) with `%rsi` = the zero page; the image decompresses itself to its
//! preferred address and replaces these page tables and this GDT with its own.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    E820_MAX_ENTRIES_ZEROPAGE, XLF_KERNEL_64, boot_e820_entry, boot_params, setup_header,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Error, Initrd, MemoryRange};
use crate::layout;

/// Offset of `startup_64` in a bzImage's protected-mode part.
const STARTUP_64_OFFSET: u64 = 0x200;
/// The oldest boot protocol with a 64-bit entry we rely on (2.12: `xloadflags`).
const MIN_PROTOCOL: u16 = 0x020c;
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;

/// The GDT of the 64-bit entry: null, null, 64-bit code (`__BOOT_CS` 0x10), data
/// (`__BOOT_DS` 0x18), TSS (0x20).
pub const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];
/// `__BOOT_CS`.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`.
pub const BOOT_DS: u16 = 0x18;
/// The TSS selector.
pub const BOOT_TSS: u16 = 0x20;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Where a bzImage runs, read from its setup header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlacement {
    /// The 64-bit entry point.
    pub entry: u64,
    /// End of the memory the kernel claims while it decompresses and runs: the initramfs
    /// must go above it.
    pub reserved_end: u64,
}

impl KernelPlacement {
    /// Checks `header` (of an image loaded at `load`) for a 64-bit entry, and computes where
    /// the decompressed kernel will lie: `startup_64` moves it to `load` rounded up to
    /// `kernel_alignment` (relocatable kernels) but never below `pref_address`
    /// (`LOAD_PHYSICAL_ADDR`), and it spans `init_size` bytes from there.
    pub fn of(load: u64, header: &setup_header) -> Result<Self, Error> {
        if header.version < MIN_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::NoLinux64Entry {
                version: header.version,
            });
        }
        let too_big = Error::KernelTooBig(u64::MAX);
        let base = if header.relocatable_kernel != 0 {
            let align = u64::from(header.kernel_alignment.max(1));
            if !align.is_power_of_two() {
                return Err(too_big);
            }
            load.checked_add(align - 1).ok_or(too_big)? & !(align - 1)
        } else {
            header.pref_address
        };
        let start = base.max(header.pref_address);
        let reserved_end = start
            .checked_add(u64::from(header.init_size))
            .ok_or(Error::KernelTooBig(u64::MAX))?;
        Ok(Self {
            entry: load + STARTUP_64_OFFSET,
            reserved_end,
        })
    }
}

/// Builds the zero page: the image's own setup header with our loader type, command line
/// pointer and initramfs, plus the e820 table.
pub fn boot_params(
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    map: &[MemoryRange],
) -> Result<boot_params, Error> {
    let max = header.cmdline_size;
    if u64::try_from(cmdline_len).unwrap_or(u64::MAX) > u64::from(max) {
        return Err(Error::CmdlineTooLongForKernel {
            len: cmdline_len,
            max,
        });
    }
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::MemmapTooLong);
    }
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr =
        u32::try_from(layout::CMDLINE_ADDR).map_err(|_| Error::MemmapTooLong)?;
    params.ext_cmd_line_ptr = 0;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(i.addr).map_err(|_| Error::InitrdTooBig(i.size))?;
        params.hdr.ramdisk_size = u32::try_from(i.size).map_err(|_| Error::InitrdTooBig(i.size))?;
    }
    for (slot, r) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: r.addr,
            size: r.size,
            r#type: r.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| Error::MemmapTooLong)?;
    Ok(params)
}

/// Writes the zero page, the identity map and the GDT.
pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), Error> {
    let zero_page = BootParams::new(params, GuestAddress(layout::ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&zero_page, mem).map_err(Error::BootParams)?;
    write_identity_map(mem)?;
    super::pvh::write_gdt(mem, &GDT)
}

/// Identity-maps the low 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries, four page
/// directories of 512 entries each. The kernel builds its own tables before it needs more.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(Error::GuestMemory)
    };
    w(
        layout::PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE,
        layout::PML4_ADDR,
    )?;
    for gib in 0..4u64 {
        let pd = layout::PD_ADDR + gib * 0x1000;
        w(pd | PTE_PRESENT | PTE_WRITABLE, layout::PDPT_ADDR + gib * 8)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE, pd + i * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{E820_RAM, memory_map};

    fn header() -> setup_header {
        setup_header {
            header: 0x5372_6448,
            boot_flag: 0xaa55,
            version: 0x020f,
            xloadflags: XLF_KERNEL_64,
            relocatable_kernel: 1,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x80_0000,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            code32_start: 0x10_0000,
            ..Default::default()
        }
    }

    #[test]
    fn zero_page_carries_the_e820_map() {
        let map = memory_map(256 << 20);
        let p = boot_params(header(), 10, None, &map).unwrap();
        assert_eq!(usize::from(p.e820_entries), map.len());
        let table: Vec<(u64, u64, u32)> = p
            .e820_table
            .iter()
            .take(map.len())
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (
                    layout::EBDA_START,
                    layout::HIMEM_START - layout::EBDA_START,
                    crate::boot::E820_RESERVED
                ),
                (
                    layout::HIMEM_START,
                    (256 << 20) - layout::HIMEM_START,
                    E820_RAM
                ),
            ]
        );
    }

    #[test]
    fn zero_page_points_at_the_command_line_and_names_the_loader() {
        let p = boot_params(header(), 10, None, &memory_map(64 << 20)).unwrap();
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), layout::CMDLINE_ADDR);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        // The image's own header fields survive.
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.init_size }, 0x80_0000);
    }

    #[test]
    fn zero_page_carries_the_initramfs() {
        let initrd = Initrd {
            addr: 0x0f00_0000,
            size: 12345,
        };
        let p = boot_params(header(), 0, Some(initrd), &memory_map(256 << 20)).unwrap();
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 12345);
    }

    #[test]
    fn zero_page_without_initramfs_has_none() {
        let p = boot_params(header(), 0, None, &memory_map(256 << 20)).unwrap();
        assert_eq!(({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }), (0, 0));
    }

    #[test]
    fn command_line_longer_than_the_kernel_accepts_is_refused() {
        assert!(matches!(
            boot_params(header(), 2048, None, &memory_map(64 << 20)),
            Err(Error::CmdlineTooLongForKernel {
                len: 2048,
                max: 2047
            })
        ));
    }

    #[test]
    fn image_without_a_64_bit_entry_is_refused() {
        let mut h = header();
        h.xloadflags = 0;
        assert!(matches!(
            KernelPlacement::of(0x10_0000, &h),
            Err(Error::NoLinux64Entry { .. })
        ));
        let mut h = header();
        h.version = 0x020b;
        assert!(KernelPlacement::of(0x10_0000, &h).is_err());
    }

    #[test]
    fn relocatable_kernel_decompresses_at_its_preferred_address() {
        let p = KernelPlacement::of(0x10_0000, &header()).unwrap();
        assert_eq!(p.entry, 0x10_0200);
        assert_eq!(p.reserved_end, 0x100_0000 + 0x80_0000);
    }

    #[test]
    fn identity_map_covers_low_memory_with_2mib_pages() {
        let mem = crate::boot::tests::test_mem(1 << 20);
        let p = boot_params(header(), 0, None, &memory_map(64 << 20)).unwrap();
        write(&mem, &p).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4, layout::PDPT_ADDR | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(layout::PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3, (layout::PD_ADDR + 0x3000) | 3);
        // The page holding 0x4020_0000 (GiB 1, 2 MiB page 1) maps to itself.
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 0x1000 + 8))
            .unwrap();
        assert_eq!(pde, 0x4020_0000 | 0x83);
        let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ zp.hdr.type_of_loader }, 0xff);
    }
}
