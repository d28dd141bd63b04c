//! The PVH boot protocol's structures: `hvm_start_info`, its memory map and module list, and
//! the GDT of the 32-bit entry state (flat code and data, and a TSS descriptor KVM requires).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Error, Initrd, MemoryRange};
use crate::layout;

/// PVH `hvm_start_info` magic.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The GDT of the PVH entry state: null, 32-bit code (0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

/// Writes `hvm_start_info` (command line at `CMDLINE_ADDR`, `map`, the initramfs as module 0)
/// and the GDT.
pub fn write(
    mem: &GuestMemoryMmap,
    map: &[MemoryRange],
    initrd: Option<Initrd>,
) -> Result<(), Error> {
    if map.len() > layout::PVH_MEMMAP_MAX {
        return Err(Error::MemmapTooLong);
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.addr,
            size: r.size,
            type_: r.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .collect();
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
    write_gdt(mem, &GDT)
}

/// Writes `gdt` at `GDT_ADDR`.
pub(super) fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), Error> {
    for (i, d) in (0u64..).zip(gdt) {
        mem.write_obj(*d, GuestAddress(layout::GDT_ADDR + i * 8))
            .map_err(Error::GuestMemory)?;
    }
    Ok(())
}
