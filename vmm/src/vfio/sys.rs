//! The raw calls VFIO passthrough needs beyond vfio-ioctls: mapping a BAR of the device fd
//! into the VMM, and asking whether an eventfd holds an undelivered signal.

use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::eventfd::EventFd;

/// A shared mapping of part of a device region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain device memory with no thread affinity; `Mapping` hands out only
// its raw address, and every access through it is by the guest (through KVM) or by volatile
// accesses, never through Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`; `&Mapping` only exposes the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes at `offset` of `fd`, shared, readable and writable.
    pub fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<Self> {
        let len_usize =
            usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        if len_usize == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no address hint, no MAP_FIXED), so no
        // existing memory is replaced; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len: len_usize,
        })
    }

    /// Host address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        u64::try_from(self.len).unwrap_or(u64::MAX)
    }

    /// Whether the mapping is empty (never: `map_shared` refuses zero lengths).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once here; the owner
        // (`VfioPciDevice`) removes the guest's KVM slot over it before dropping it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `ioctl(container, VFIO_CHECK_EXTENSION, ext)`: `_IO(VFIO_TYPE, VFIO_BASE + 1)`.
const VFIO_CHECK_EXTENSION: libc::c_ulong = 0x3b65;
/// The extension "the IOMMU enforces cache-coherent DMA".
const VFIO_DMA_CC_IOMMU: libc::c_ulong = 4;

/// Whether the IOMMU behind the container `fd` (with at least one group set) enforces cache
/// coherency for device DMA.
pub fn dma_cache_coherent(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value and writes no memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret > 0)
}

/// Whether `evt` is readable (its counter is non-zero), without consuming it.
pub fn eventfd_is_signalled(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1, zero timeout: poll only writes `revents`.
    let n = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_an_eventfd_does_not_consume_it() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|e| panic!("{e}"));
        assert!(!eventfd_is_signalled(&evt));
        assert!(evt.write(1).is_ok());
        assert!(eventfd_is_signalled(&evt));
        assert!(eventfd_is_signalled(&evt));
        assert_eq!(evt.read().ok(), Some(1));
    }
}
