//! PCI: a root bus reached through configuration mechanism #1 (ports 0xCF8/0xCFC), a host
//! bridge at 00:00.0, BAR windows, and MSI-X emulation.
//!
//! Why port I/O and not ECAM: the VMM hands the guest no ACPI tables, and Linux finds an ECAM
//! window only through ACPI's MCFG table. Without it Linux probes mechanism #1 itself
//! (`pci_direct_probe`, `CONFIG_PCI_DIRECT`), so this works with the boot we have. The price is
//! the 256-byte legacy configuration space: PCIe extended capabilities (offset 0x100 and up)
//! are invisible to the guest. See `vmm/README.md`.
//!
//! ```text
//! vCPU port exit 0xCF8..0xCFF -> bus.rs (address latch, host bridge, device slots)
//!                                   -> PciDevice::config_read/config_write
//! vCPU MMIO exit outside the virtio windows -> bus.rs (which BAR decodes it)
//!                                   -> PciDevice::bar_read/bar_write (msix.rs for the table)
//! ```

pub mod bus;
pub mod msix;
pub mod window;

/// Offset of the vendor id.
pub const VENDOR_ID: u16 = 0x00;
/// Offset of the command register.
pub const COMMAND: u16 = 0x04;
/// Offset of the status register.
pub const STATUS: u16 = 0x06;
/// Offset of the first BAR.
pub const BAR0: u16 = 0x10;
/// Offset of the expansion ROM BAR of a type 0 header.
pub const ROM_BAR: u16 = 0x30;
/// Offset of the capabilities pointer.
pub const CAP_POINTER: u16 = 0x34;
/// Offset of the interrupt line (byte) and pin (byte above it).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Size of the configuration space mechanism #1 reaches.
pub const CONFIG_SPACE_SIZE: u16 = 256;

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Status register: the capability list is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability id of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability id of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// BAR low bits: an I/O BAR.
pub const BAR_IO: u32 = 1;
/// BAR low bits: a 64-bit memory BAR (type 10b in bits 2:1).
pub const BAR_MEM64: u32 = 0b100;
/// BAR low bits: prefetchable memory.
pub const BAR_PREFETCH: u32 = 0b1000;

/// A BAR as the guest currently has it programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    /// BAR index (0..=5); a 64-bit BAR has the index of its low half.
    pub index: u8,
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl BarRange {
    /// The offset of `addr` in this BAR, if it falls inside.
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.addr).filter(|o| *o < self.size)
    }
}

/// A PCI function on the root bus. Called from vCPU threads; the bus serialises calls to one
/// device. Every argument comes from the guest: implementations bound and check all of it.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset` (< 256, never crossing a dword).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset`, under the same rules.
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// The memory BARs that decode now (memory space enabled, an address programmed).
    fn decoded_bars(&self) -> Vec<BarRange>;
    /// A load at `offset` into BAR `index`.
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// A store at `offset` into BAR `index`.
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]);
}

/// A BAR access's target: the function, the BAR as it decodes, and the offset into it.
pub type BarHit = (
    std::sync::Arc<std::sync::Mutex<dyn PciDevice>>,
    BarRange,
    u64,
);

/// Little-endian value of up to 4 bytes.
pub fn le_value(data: &[u8]) -> u32 {
    let mut raw = [0u8; 4];
    for (d, s) in raw.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(raw)
}

/// Merges a write of `data` at byte `shift` (0..=3) of the dword `old`.
pub fn merge_dword(old: u32, shift: u16, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(usize::from(shift) + i) {
            *slot = *b;
        }
    }
    u32::from_le_bytes(bytes)
}

/// Copies the bytes at `shift` of `value` into `data`.
pub fn extract(value: u32, shift: u16, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(usize::from(shift) + i).copied().unwrap_or(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_and_word_writes_merge_into_the_dword() {
        assert_eq!(merge_dword(0x1122_3344, 1, &[0xaa]), 0x1122_aa44);
        assert_eq!(merge_dword(0x1122_3344, 2, &[0xbb, 0xcc]), 0xccbb_3344);
        assert_eq!(merge_dword(0, 0, &[1, 2, 3, 4]), 0x0403_0201);
    }

    #[test]
    fn reads_extract_the_addressed_bytes() {
        let mut b = [0u8; 2];
        extract(0x1122_3344, 2, &mut b);
        assert_eq!(b, [0x22, 0x11]);
    }
}
