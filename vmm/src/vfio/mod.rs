//! VFIO passthrough of PCI functions (GPUs): the seam over the kernel's VFIO interface, the
//! PCI function model the guest sees, and the host side.
//!
//! ```text
//! guest config cycle / BAR access (vCPU thread)
//!   -> devices/pci/bus.rs -> device.rs VfioPciDevice: BARs, ROM, MSI/MSI-X, command register
//!      virtualised; everything else passed to the kernel's vfio-pci, which filters it again
//!   -> VfioBackend (this file): host.rs (vfio-ioctls: container, group, device fds)
//!                               fake.rs (tests: a device with a doorbell that fires MSI-X)
//! guest RAM -> IommuDomain::dma_map (all of it, before the guest runs)
//! ```
//!
//! Invariants:
//! - Every VFIO file (container, groups, devices) is opened before the jail is entered; the
//!   jailed VMM opens nothing.
//! - The guest never reaches the physical MSI-X table, the ROM or the BAR registers: the VMM
//!   emulates them, and device interrupts reach the guest only through the routes the VMM
//!   programs into KVM.
//! - `unsafe` here is limited to `sys.rs` (mmap of BARs, polling eventfds) and the DMA and
//!   memory-slot calls that hand the kernel host pointers, each with its SAFETY argument.

pub mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod host;
pub mod sys;

use moat_host_probe::pci as sysfs;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

/// VFIO region index of BAR 0 (BARs are 0..=5).
pub const BAR0_REGION: u32 = 0;
/// VFIO region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;
/// VFIO region index of the configuration space.
pub const CONFIG_REGION: u32 = 7;

/// What a region allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Size in bytes.
    pub size: u64,
    /// Readable through the device fd.
    pub read: bool,
    /// Writable through the device fd.
    pub write: bool,
    /// Mappable with mmap.
    pub mmap: bool,
    /// The mappable parts when only some are (VFIO's sparse mmap capability): (offset, size).
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// Errors of the VFIO layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel VFIO call failed.
    #[error("VFIO {op} failed for {device}")]
    Vfio {
        /// What was attempted.
        op: &'static str,
        /// The device (PCI address).
        device: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A region access failed.
    #[error("cannot access region {index} of {device}")]
    Region {
        /// Region index.
        index: u32,
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device cannot be offered as it is.
    #[error("{device}: {why}")]
    Unsupported {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// A BAR does not fit.
    #[error("cannot place BAR {bar} of {device}")]
    Bar {
        /// BAR index.
        bar: u8,
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: crate::devices::pci::window::Error,
    },
    /// MSI-X state could not be created.
    #[error("cannot set up MSI-X for {device}")]
    Msix {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: crate::devices::pci::msix::Error,
    },
    /// The IOMMU group cannot be given to this VM.
    #[error("IOMMU group of {device} cannot be passed through")]
    Group {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: sysfs::Error,
    },
    /// Mapping guest RAM for device DMA failed.
    #[error("cannot map guest RAM [{iova:#x}, +{size:#x}) for device DMA")]
    DmaMap {
        /// Guest physical address (the device's I/O virtual address).
        iova: u64,
        /// Length.
        size: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One passthrough function, as the kernel's VFIO device fd offers it. Implemented by the
/// host (`host.rs`) and by the test device (`fake.rs`). Offsets come from the guest: callers
/// check them against the region size first, implementations check again.
pub trait VfioBackend: Send {
    /// A name for messages: the host PCI address.
    fn name(&self) -> &str;
    /// Region `index` (BARs 0..=5, ROM 6, config 7), or `None` if the device has none.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error>;
    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Maps `len` bytes at `offset` of region `index` into the VMM (shared, read-write).
    fn region_mmap(&self, index: u32, offset: u64, len: u64) -> Result<sys::Mapping, Error>;
    /// Hands the kernel one eventfd per MSI-X vector and enables MSI-X on the device.
    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), Error>;
    /// Disables MSI-X on the device.
    fn disable_msix(&self) -> Result<(), Error>;
    /// Hands the kernel the eventfd of the one MSI vector and enables MSI on the device.
    fn enable_msi(&self, fds: &[&EventFd]) -> Result<(), Error>;
    /// Disables MSI on the device.
    fn disable_msi(&self) -> Result<(), Error>;
    /// Resets the function (FLR or what vfio-pci offers); `false` when it cannot be reset.
    fn reset(&self) -> bool;

    /// Reads configuration space.
    fn config_read(&self, offset: u16, data: &mut [u8]) -> Result<(), Error> {
        self.region_read(CONFIG_REGION, u64::from(offset), data)
    }
    /// Writes configuration space.
    fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), Error> {
        self.region_write(CONFIG_REGION, u64::from(offset), data)
    }
}

/// An IOMMU address space (a VFIO container) into which guest RAM is mapped for device DMA.
pub trait IommuDomain: Send + Sync {
    /// Maps `[host, host + size)` at I/O virtual address `iova`, readable and writable by the
    /// devices of the domain.
    ///
    /// # Safety
    ///
    /// `[host, host + size)` must stay mapped until `dma_unmap(iova, size)` succeeds or the
    /// process exits, and nothing may hold a Rust reference into it: devices read and write it
    /// at any time (guest RAM satisfies this: the VMM touches it only through vm-memory's
    /// volatile accessors and keeps it mapped for the life of the process).
    unsafe fn dma_map(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), Error>;
    /// Unmaps what `dma_map` mapped at `iova`.
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), Error>;
}

/// Where a BAR's mmap goes in guest physical memory (KVM memory slots).
pub trait GuestMapper: Send + Sync {
    /// Maps `len` bytes at host address `host` at guest address `gpa`; returns a handle.
    ///
    /// # Safety
    ///
    /// `[host, host + len)` must stay mapped until `unmap` of the returned handle returns.
    unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> Result<u32, std::io::Error>;
    /// Removes a mapping made by `map`.
    fn unmap(&self, handle: u32);
}

/// Maps every guest RAM region 1:1 (I/O virtual address = guest physical address), so the
/// device can DMA wherever the guest's driver points it, as on bare metal.
pub fn map_guest_memory(domain: &dyn IommuDomain, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for region in mem.iter() {
        let iova = region.start_addr().0;
        let size = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::DmaMap {
                iova,
                size,
                source: Box::new(e),
            })?;
        // SAFETY: `host` is the start of the `size`-byte mapping of this guest RAM region,
        // which `mem` owns; the VMM keeps `mem` (an Arc held by the machine for the life of
        // the process) mapped until exit and accesses it only through vm-memory's volatile
        // accessors, never through Rust references that DMA could invalidate.
        unsafe { domain.dma_map(iova, size, host) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fake::FakeIommu;
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn every_guest_ram_region_is_dma_mapped_at_its_guest_address() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x20_0000),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let iommu = FakeIommu::default();
        assert!(map_guest_memory(&iommu, &mem).is_ok());
        let maps: Vec<(u64, u64)> = iommu.maps().into_iter().map(|(i, s, _)| (i, s)).collect();
        assert_eq!(maps, vec![(0, 0x10_0000), (0x1_0000_0000, 0x20_0000)]);
        let hosts: Vec<u64> = iommu.maps().into_iter().map(|(_, _, h)| h).collect();
        assert!(hosts.iter().all(|h| *h != 0));
    }
}
