//! The host side of passthrough, through vfio-ioctls: one VFIO container (an IOMMU domain) per
//! VM, the groups of the named devices attached to it, and a device fd per function.
//!
//! Everything here opens files (`/dev/vfio/vfio`, `/dev/vfio/<group>`) and so runs before the
//! jail, in `vmm::Resources::open`. The KVM VM does not exist yet then (it is created after the
//! jail's fork, since a VM belongs to the address space that created it), so the groups are
//! not registered with KVM's VFIO pseudo-device. What KVM would learn from it on x86 is
//! whether device DMA may bypass the CPU caches (then KVM honours the guest's memory types);
//! instead the container is refused unless the IOMMU enforces cache coherency
//! (`VFIO_DMA_CC_IOMMU`), so that case never arises.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::{Error, IommuDomain, RegionInfo, VfioBackend, sys};
use moat_host_probe::pci::{self as sysfs, PciAddress};

const FLAG_READ: u32 = 1;
const FLAG_WRITE: u32 = 2;
const FLAG_MMAP: u32 = 4;

fn vfio_err(
    op: &'static str,
    device: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Vfio {
        op,
        device: device.to_owned(),
        source: Box::new(e),
    }
}

/// The container every passthrough device of the VM shares.
pub struct Container(Arc<VfioContainer>);

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container").finish_non_exhaustive()
    }
}

impl IommuDomain for Container {
    unsafe fn dma_map(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), Error> {
        let len = usize::try_from(size).map_err(|_| Error::DmaMap {
            iova,
            size,
            source: "size does not fit the address space".into(),
        })?;
        // SAFETY: the caller upholds this function's contract, which is the container's.
        unsafe { self.0.vfio_dma_map(iova, len, host) }.map_err(|e| Error::DmaMap {
            iova,
            size,
            source: Box::new(e),
        })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), Error> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        self.0.vfio_dma_unmap(iova, len).map_err(|e| Error::DmaMap {
            iova,
            size,
            source: Box::new(e),
        })
    }
}

/// A passthrough function on this host.
pub struct HostDevice {
    dev: VfioDevice,
    name: String,
}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Opens the container and every device in `addresses`, after checking that each device's
/// IOMMU group is whole (every member bound to vfio-pci and in `addresses`).
pub fn open(
    addresses: &[PciAddress],
    sysfs_root: &Path,
) -> Result<(Container, Vec<HostDevice>), Error> {
    for a in addresses {
        sysfs::check_group(sysfs_root, a, addresses).map_err(|source| Error::Group {
            device: a.to_string(),
            source,
        })?;
    }
    let all = addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let container =
        Arc::new(VfioContainer::new(None).map_err(|e| vfio_err("container setup", &all, e))?);
    let mut devices = Vec::new();
    for a in addresses {
        let name = a.to_string();
        let ops: Arc<dyn VfioOps> = container.clone();
        let dev = VfioDevice::new(&sysfs::device_dir(sysfs_root, a), ops, false)
            .map_err(|e| vfio_err("device open", &name, e))?;
        devices.push(HostDevice { dev, name });
    }
    // SAFETY: the container fd is owned by `container`, alive for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(container.as_raw_fd()) };
    match sys::dma_cache_coherent(fd) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::Unsupported {
                device: all,
                why: "the IOMMU does not enforce cache-coherent DMA (VFIO_DMA_CC_IOMMU), which \
                      this VMM requires"
                    .to_owned(),
            });
        }
        Err(e) => return Err(vfio_err("VFIO_CHECK_EXTENSION(DMA_CC_IOMMU)", &all, e)),
    }
    Ok((Container(container), devices))
}

impl HostDevice {
    fn check(&self, index: u32, offset: u64, len: usize) -> Result<(), Error> {
        let size = self.dev.get_region_size(index);
        let end = u64::try_from(len).ok().and_then(|l| offset.checked_add(l));
        match end {
            Some(e) if e <= size => Ok(()),
            _ => Err(Error::Region {
                index,
                device: self.name.clone(),
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            }),
        }
    }
}

impl VfioBackend for HostDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = self.dev.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.dev.get_region_flags(index);
        let sparse = self
            .dev
            .get_region_caps(index)
            .into_iter()
            .find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            });
        Some(RegionInfo {
            size,
            read: flags & FLAG_READ != 0,
            write: flags & FLAG_WRITE != 0,
            mmap: flags & FLAG_MMAP != 0,
            sparse,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        self.check(index, offset, data.len())?;
        self.dev.region_read(index, data, offset);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check(index, offset, data.len())?;
        self.dev.region_write(index, data, offset);
        Ok(())
    }

    fn region_mmap(&self, index: u32, offset: u64, len: u64) -> Result<sys::Mapping, Error> {
        self.check(index, offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let at = self.dev.get_region_offset(index).checked_add(offset);
        // SAFETY: the device fd is owned by `self.dev` and open for as long as `self` lives;
        // the borrow does not outlive this call (the mapping does not need the fd open).
        let fd = unsafe { BorrowedFd::borrow_raw(self.dev.as_raw_fd()) };
        at.ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|at| sys::Mapping::map_shared(fd, at, len))
            .map_err(|source| Error::Region {
                index,
                device: self.name.clone(),
                source,
            })
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), Error> {
        self.dev
            .enable_msix(fds.to_vec())
            .map_err(|e| vfio_err("MSI-X enable", &self.name, e))
    }

    fn disable_msix(&self) -> Result<(), Error> {
        self.dev
            .disable_msix()
            .map_err(|e| vfio_err("MSI-X disable", &self.name, e))
    }

    fn enable_msi(&self, fds: &[&EventFd]) -> Result<(), Error> {
        self.dev
            .enable_msi(fds.to_vec())
            .map_err(|e| vfio_err("MSI enable", &self.name, e))
    }

    fn disable_msi(&self) -> Result<(), Error> {
        self.dev
            .disable_msi()
            .map_err(|e| vfio_err("MSI disable", &self.name, e))
    }

    fn reset(&self) -> bool {
        // vfio-ioctls issues VFIO_DEVICE_RESET only when the device advertises a reset.
        self.dev.reset();
        true
    }
}
