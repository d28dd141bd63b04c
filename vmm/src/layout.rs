//! The guest physical address map. One place, so the boot code, the device manager and the
//! probe guest's expectations agree.
//!
//! ```text
//! 0x0000_0500  GDT: 32-bit segments for the PVH entry, 64-bit ones for the Linux 64-bit entry
//! 0x0000_3000  Linux zero page (`boot_params`), 64-bit boot protocol only
//! 0x0000_4000  boot stack of the 64-bit entry (grows down from 0x5000)
//! 0x0000_6000  hvm_start_info (PVH), followed by the module list at 0x6040
//! 0x0000_7000  PVH memory map (e820-style entries)
//! 0x0000_9000  page tables of the 64-bit entry: PML4, PDPT at 0xa000, 4 PDs at 0xb000..0xf000
//! 0x0002_0000  kernel command line (NUL terminated, at most CMDLINE_MAX bytes)
//! 0x0009_fc00  end of low RAM (EBDA and legacy hole above, reserved)
//! 0x0010_0000  kernel (ELF segments at their physical addresses, or a bzImage's protected-mode
//!              part, which decompresses itself to its preferred address, usually 16 MiB)
//! ...          initramfs at the top of RAM below the MMIO gap, page aligned
//! 0xc000_0000  MMIO gap: 32-bit PCI BARs up to 0xd000_0000 (`devices/pci/window.rs`),
//!              virtio-mmio devices from 0xd000_0000, 4 KiB each; IOAPIC 0xfec0_0000,
//!              LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! 64 GiB-aligned, above RAM: 64-bit PCI BARs, up to the guest's physical address width
//! ```

/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Linux `boot_params` (the zero page) for the 64-bit boot protocol.
pub const ZERO_PAGE_ADDR: u64 = 0x3000;
/// Initial stack pointer of the 64-bit entry (the kernel sets up its own stack at once).
pub const BOOT_STACK_TOP: u64 = 0x5000;
/// PML4 of the 64-bit entry's identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// The one PDPT under the PML4.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages), which identity-map the low 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs), right after `hvm_start_info`.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Most memory-map entries that fit before the next structure.
pub const PVH_MEMMAP_MAX: usize = 0x1000 / 24;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// End of the low RAM the memory map reports (start of the EBDA).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; the serial port uses 4.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// GSI of the serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// The TSS KVM needs on Intel hosts, in the top of the 32-bit space (not RAM, not MMIO).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The identity map page KVM needs on Intel hosts, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

// The virtio windows (up to 16 devices) sit inside the MMIO gap, below KVM's private pages.
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START);
const _: () = assert!(VIRTIO_MMIO_BASE + 16 * VIRTIO_MMIO_SIZE < KVM_IDENTITY_MAP_ADDR);
// The boot structures of the low 64 KiB do not overlap one another.
const _: () = assert!(GDT_ADDR + 8 * 8 <= ZERO_PAGE_ADDR);
const _: () = assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_TOP - 0x1000);
const _: () = assert!(BOOT_STACK_TOP <= PVH_INFO_ADDR);
const _: () = assert!(PVH_MEMMAP_ADDR + 0x1000 <= PML4_ADDR);
const _: () = assert!(PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);

/// The RAM ranges for a guest of `mem_bytes`: low RAM up to the MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn big_guest_skips_the_mmio_gap() {
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
