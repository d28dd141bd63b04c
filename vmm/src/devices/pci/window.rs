//! Guest physical windows for BARs, in the role firmware plays on a PC: the VMM places every
//! BAR before the guest starts, and Linux keeps those assignments (it reassigns only BARs it
//! finds unset or conflicting).
//!
//! - 32-bit BARs: `[PCI_MMIO32_START, PCI_MMIO32_END)`, the part of the MMIO gap below the
//!   virtio-mmio windows (so clear of them, of the IOAPIC at 0xfec0_0000 and the LAPIC at
//!   0xfee0_0000).
//! - 64-bit BARs (a GPU's BAR1 is tens to hundreds of GiB): from the first 64 GiB boundary
//!   at or above the end of guest RAM up to the guest's physical address limit, which the
//!   host's address width bounds (a guest address the host cannot translate would fault).
//!
//! Each BAR is naturally aligned (to its size), as the BAR sizing protocol requires.

use crate::layout;

/// Start of the 32-bit BAR window.
pub const PCI_MMIO32_START: u64 = layout::MMIO_GAP_START;
/// End of the 32-bit BAR window (the virtio-mmio windows start here).
pub const PCI_MMIO32_END: u64 = layout::VIRTIO_MMIO_BASE;
/// Alignment of the 64-bit window's start.
pub const PCI_MMIO64_ALIGN: u64 = 64 << 30;
/// Smallest BAR handed out: a page, so a mappable BAR never shares a page with another.
pub const MIN_BAR: u64 = 4096;

/// Errors placing BARs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A size that is not a power of two.
    #[error("BAR size {0:#x} is not a power of two")]
    NotPowerOfTwo(u64),
    /// The window is full.
    #[error(
        "a BAR of {size:#x} bytes does not fit the {kind} window [{start:#x}, {end:#x}) \
         (next free {next:#x})"
    )]
    Full {
        /// Which window.
        kind: &'static str,
        /// The BAR's size.
        size: u64,
        /// Window start.
        start: u64,
        /// Window end.
        end: u64,
        /// First free address.
        next: u64,
    },
    /// No room above RAM for a 64-bit window.
    #[error(
        "no 64-bit BAR window: guest RAM ends at {ram_end:#x}, beyond {phys_bits} address bits"
    )]
    NoHighWindow {
        /// End of guest RAM.
        ram_end: u64,
        /// The guest's physical address width.
        phys_bits: u8,
    },
}

/// A bump allocator over one window.
#[derive(Debug, Clone)]
struct Window {
    kind: &'static str,
    start: u64,
    end: u64,
    next: u64,
}

impl Window {
    fn allocate(&mut self, size: u64) -> Result<u64, Error> {
        if !size.is_power_of_two() {
            return Err(Error::NotPowerOfTwo(size));
        }
        let size = size.max(MIN_BAR);
        let full = || Error::Full {
            kind: self.kind,
            size,
            start: self.start,
            end: self.end,
            next: self.next,
        };
        let base = self.next.checked_next_multiple_of(size).ok_or_else(full)?;
        let end = base.checked_add(size).ok_or_else(full)?;
        if end > self.end {
            return Err(full());
        }
        self.next = end;
        Ok(base)
    }
}

/// The two BAR windows of the root bus.
#[derive(Debug, Clone)]
pub struct BarWindows {
    low: Window,
    high: Window,
}

impl BarWindows {
    /// Windows for a guest whose RAM ends at `ram_end` and whose physical addresses have
    /// `phys_bits` bits.
    pub fn new(ram_end: u64, phys_bits: u8) -> Result<Self, Error> {
        let limit = 1u64
            .checked_shl(u32::from(phys_bits))
            .filter(|_| phys_bits < 64)
            .unwrap_or(u64::MAX);
        let start = ram_end
            .max(layout::MMIO_GAP_END)
            .checked_next_multiple_of(PCI_MMIO64_ALIGN)
            .filter(|s| *s < limit)
            .ok_or(Error::NoHighWindow { ram_end, phys_bits })?;
        Ok(Self {
            low: Window {
                kind: "32-bit",
                start: PCI_MMIO32_START,
                end: PCI_MMIO32_END,
                next: PCI_MMIO32_START,
            },
            high: Window {
                kind: "64-bit",
                start,
                end: limit,
                next: start,
            },
        })
    }

    /// Places a 32-bit BAR of `size` bytes.
    pub fn allocate32(&mut self, size: u64) -> Result<u64, Error> {
        self.low.allocate(size)
    }

    /// Places a 64-bit BAR of `size` bytes.
    pub fn allocate64(&mut self, size: u64) -> Result<u64, Error> {
        self.high.allocate(size)
    }

    /// The 64-bit window, `[start, end)`.
    pub fn high_window(&self) -> (u64, u64) {
        (self.high.start, self.high.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_window_starts_above_ram_on_a_64_gib_boundary() {
        let w = BarWindows::new(2 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.high_window(), (64 << 30, 1 << 46));
        let w = BarWindows::new(100 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.high_window().0, 128 << 30);
    }

    #[test]
    fn a_256_gib_bar_is_naturally_aligned() {
        let mut w = BarWindows::new(1 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.allocate64(32 << 20), Ok(64 << 30));
        assert_eq!(w.allocate64(256 << 30), Ok(256 << 30));
        assert_eq!(w.allocate64(32 << 20), Ok(512 << 30));
    }

    #[test]
    fn a_bar_larger_than_the_address_space_is_refused() {
        let mut w = BarWindows::new(1 << 30, 39).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(w.allocate64(512 << 30), Err(Error::Full { .. })));
    }

    #[test]
    fn ram_beyond_the_address_width_leaves_no_high_window() {
        assert!(matches!(
            BarWindows::new(1 << 40, 40),
            Err(Error::NoHighWindow { .. })
        ));
    }

    #[test]
    fn low_bars_stay_below_the_virtio_windows_and_are_page_sized_at_least() {
        let mut w = BarWindows::new(1 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.allocate32(0x80), Ok(PCI_MMIO32_START));
        assert_eq!(w.allocate32(16 << 20), Ok(PCI_MMIO32_START + (16 << 20)));
        assert!(w.allocate32(256 << 20).is_err());
        assert_eq!(w.allocate32(3), Err(Error::NotPowerOfTwo(3)));
    }
}
