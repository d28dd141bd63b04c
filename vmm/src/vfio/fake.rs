//! A fake VFIO device for tests (feature `test-utils`; never in a production build): a
//! "GPU" with a 64-bit prefetchable 8 GiB BAR 0, a 32-bit 16 KiB BAR 2 holding a doorbell, a
//! scratch register, the MSI-X table (4 vectors) and PBA, an I/O BAR 4, a 64 KiB ROM, and MSI
//! (64-bit, maskable), MSI-X and power-management capabilities. Writing a vector number to the
//! doorbell makes the device signal that vector's eventfd (MSI has one: 0), as the kernel does
//! when real hardware raises it.
//!
//! Its ids are made up (vendor 0x6d6f "mo", device 0x6174 "at") so no guest driver binds it.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{CONFIG_REGION, Error, IommuDomain, ROM_REGION, RegionInfo, VfioBackend, sys};

/// Vendor id of the fake device.
pub const FAKE_VENDOR: u16 = 0x6d6f;
/// Device id of the fake device.
pub const FAKE_DEVICE: u16 = 0x6174;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 8 << 30;
/// Size of BAR 2.
pub const BAR2_SIZE: u64 = 16 << 10;
/// BAR 2 offset of the doorbell: a dword write of `n` fires MSI-X vector `n`.
pub const DOORBELL: u64 = 0;
/// BAR 2 offset of a read-write scratch register.
pub const SCRATCH: u64 = 4;
/// BAR 2 offset of the MSI-X table.
pub const MSIX_TABLE: u32 = 0x2000;
/// BAR 2 offset of the MSI-X PBA.
pub const MSIX_PBA: u32 = 0x3000;
/// MSI-X vectors.
pub const VECTORS: u16 = 4;
/// Offset of the MSI capability.
pub const MSI_CAP: u8 = 0x40;
/// Offset of the MSI-X capability.
pub const MSIX_CAP: u8 = 0x60;
/// Offset of the power-management capability.
pub const PM_CAP: u8 = 0x70;

/// What the fake device saw, shared with the test that drives it.
#[derive(Debug, Default)]
pub struct FakeLog {
    /// Resets.
    pub resets: usize,
    /// Whether MSI-X is enabled on the "hardware".
    pub msix_enabled: bool,
    /// Whether MSI is enabled on the "hardware".
    pub msi_enabled: bool,
    /// Configuration writes that reached the device: (offset, bytes).
    pub config_writes: Vec<(u16, Vec<u8>)>,
    /// Doorbell rings.
    pub doorbells: Vec<u32>,
}

/// The fake device.
#[derive(Debug)]
pub struct FakeGpu {
    config: Mutex<[u8; 256]>,
    scratch: Mutex<u32>,
    vectors: Mutex<Vec<EventFd>>,
    log: Arc<Mutex<FakeLog>>,
    /// Backing for BAR 2 when it is offered as mappable (as VFIO offers most BARs).
    mappable_bar2: Option<std::fs::File>,
}

fn put(cfg: &mut [u8; 256], at: u8, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        if let Some(slot) = cfg.get_mut(usize::from(at) + i) {
            *slot = *b;
        }
    }
}

impl FakeGpu {
    /// A fake device in its reset state and the log it writes to.
    pub fn new() -> (Self, Arc<Mutex<FakeLog>>) {
        let mut c = [0u8; 256];
        put(&mut c, 0x00, &FAKE_VENDOR.to_le_bytes());
        put(&mut c, 0x02, &FAKE_DEVICE.to_le_bytes());
        put(&mut c, 0x06, &0x0010u16.to_le_bytes()); // status: capability list
        put(&mut c, 0x08, &0x0302_0001u32.to_le_bytes()); // 3D controller, revision 1
        put(&mut c, 0x10, &0x0000_000cu32.to_le_bytes()); // 64-bit prefetchable
        put(&mut c, 0x18, &0u32.to_le_bytes()); // 32-bit memory
        put(&mut c, 0x20, &1u32.to_le_bytes()); // I/O
        put(&mut c, 0x30, &0xfffe_0000u32.to_le_bytes()); // a ROM the device claims
        put(&mut c, 0x34, &[MSI_CAP]);
        put(&mut c, 0x3d, &[1]); // INTA
        put(&mut c, MSI_CAP, &[0x05, MSIX_CAP, 0x80, 0x01]); // 64-bit, maskable MSI
        put(&mut c, MSIX_CAP, &[0x11, PM_CAP]);
        put(&mut c, MSIX_CAP + 2, &(VECTORS - 1).to_le_bytes());
        put(&mut c, MSIX_CAP + 4, &(MSIX_TABLE | 2).to_le_bytes());
        put(&mut c, MSIX_CAP + 8, &(MSIX_PBA | 2).to_le_bytes());
        put(&mut c, PM_CAP, &[0x01, 0x00, 0x03, 0x00]);
        let log = Arc::new(Mutex::new(FakeLog::default()));
        let dev = Self {
            config: Mutex::new(c),
            scratch: Mutex::new(0),
            vectors: Mutex::new(Vec::new()),
            log: log.clone(),
            mappable_bar2: None,
        };
        (dev, log)
    }

    /// Offers BAR 2 as mmappable, backed by `file` (at least [`BAR2_SIZE`] bytes), as VFIO
    /// offers a BAR whose region allows mmap.
    pub fn with_mappable_bar2(mut self, file: std::fs::File) -> Self {
        self.mappable_bar2 = Some(file);
        self
    }

    fn note(&self, f: impl FnOnce(&mut FakeLog)) {
        if let Ok(mut l) = self.log.lock() {
            f(&mut l);
        }
    }
}

fn oob(index: u32) -> Error {
    Error::Region {
        index,
        device: "fake".to_owned(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

fn check(index: u32, offset: u64, len: usize, size: u64) -> Result<usize, Error> {
    let len = u64::try_from(len).map_err(|_| oob(index))?;
    match offset.checked_add(len) {
        Some(end) if end <= size => usize::try_from(offset).map_err(|_| oob(index)),
        _ => Err(oob(index)),
    }
}

impl VfioBackend for FakeGpu {
    fn name(&self) -> &str {
        "fake"
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = |size| RegionInfo {
            size,
            read: true,
            write: true,
            mmap: false,
            sparse: None,
        };
        match index {
            0 => Some(rw(BAR0_SIZE)),
            2 => Some(RegionInfo {
                mmap: self.mappable_bar2.is_some(),
                ..rw(BAR2_SIZE)
            }),
            4 => Some(rw(128)),
            ROM_REGION => Some(RegionInfo {
                write: false,
                ..rw(64 << 10)
            }),
            CONFIG_REGION => Some(rw(256)),
            _ => None,
        }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        match index {
            CONFIG_REGION => {
                let at = check(index, offset, data.len(), 256)?;
                let cfg = self.config.lock().map_err(|_| oob(index))?;
                data.copy_from_slice(cfg.get(at..at + data.len()).ok_or_else(|| oob(index))?);
            }
            2 => {
                check(index, offset, data.len(), BAR2_SIZE)?;
                let v = if offset == SCRATCH {
                    self.scratch.lock().map(|s| *s).unwrap_or(0)
                } else {
                    0
                };
                super::super::devices::pci::extract(v, 0, data);
            }
            0 => {
                check(index, offset, data.len(), BAR0_SIZE)?;
                // A recognisable pattern: each byte is the low byte of its offset.
                for (i, d) in data.iter_mut().enumerate() {
                    *d = (offset.wrapping_add(u64::try_from(i).unwrap_or(0)) & 0xff).to_le_bytes()
                        [0];
                }
            }
            _ => return Err(oob(index)),
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        match index {
            CONFIG_REGION => {
                let at = check(index, offset, data.len(), 256)?;
                self.note(|l| {
                    l.config_writes
                        .push((u16::try_from(at).unwrap_or(0), data.to_vec()));
                });
                // Only the command register is writable on this device.
                let mut cfg = self.config.lock().map_err(|_| oob(index))?;
                for (i, b) in data.iter().enumerate() {
                    if (4..6).contains(&(at + i))
                        && let Some(slot) = cfg.get_mut(at + i)
                    {
                        *slot = *b;
                    }
                }
            }
            2 => {
                check(index, offset, data.len(), BAR2_SIZE)?;
                let value = crate::devices::pci::le_value(data);
                if offset == DOORBELL {
                    self.note(|l| l.doorbells.push(value));
                    let vectors = self.vectors.lock().map_err(|_| oob(index))?;
                    if let Some(evt) = usize::try_from(value).ok().and_then(|v| vectors.get(v)) {
                        evt.write(1).map_err(|source| Error::Region {
                            index,
                            device: "fake".to_owned(),
                            source,
                        })?;
                    }
                } else if offset == SCRATCH
                    && let Ok(mut s) = self.scratch.lock()
                {
                    *s = value;
                }
            }
            0 => {
                check(index, offset, data.len(), BAR0_SIZE)?;
            }
            _ => return Err(oob(index)),
        }
        Ok(())
    }

    fn region_mmap(&self, index: u32, offset: u64, len: u64) -> Result<sys::Mapping, Error> {
        use std::os::fd::AsFd;
        match (&self.mappable_bar2, index) {
            (Some(file), 2) => {
                check(
                    index,
                    offset,
                    usize::try_from(len).unwrap_or(usize::MAX),
                    BAR2_SIZE,
                )?;
                sys::Mapping::map_shared(file.as_fd(), offset, len).map_err(|source| {
                    Error::Region {
                        index,
                        device: "fake".to_owned(),
                        source,
                    }
                })
            }
            _ => Err(oob(index)),
        }
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), Error> {
        let clones = fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Region {
                index: 0,
                device: "fake".to_owned(),
                source,
            })?;
        if let Ok(mut v) = self.vectors.lock() {
            *v = clones;
        }
        self.note(|l| l.msix_enabled = true);
        Ok(())
    }

    fn disable_msix(&self) -> Result<(), Error> {
        if let Ok(mut v) = self.vectors.lock() {
            v.clear();
        }
        self.note(|l| l.msix_enabled = false);
        Ok(())
    }

    fn enable_msi(&self, fds: &[&EventFd]) -> Result<(), Error> {
        self.enable_msix(fds)?;
        self.note(|l| {
            l.msix_enabled = false;
            l.msi_enabled = true;
        });
        Ok(())
    }

    fn disable_msi(&self) -> Result<(), Error> {
        self.disable_msix()?;
        self.note(|l| l.msi_enabled = false);
        Ok(())
    }

    fn reset(&self) -> bool {
        if let Ok(mut cfg) = self.config.lock() {
            put(&mut cfg, 0x04, &[0, 0]);
        }
        self.note(|l| l.resets += 1);
        true
    }
}

/// An IOMMU domain that records DMA mappings.
#[derive(Debug, Default)]
pub struct FakeIommu {
    maps: Mutex<Vec<(u64, u64, u64)>>,
}

impl FakeIommu {
    /// The mappings made: (iova, size, host address).
    pub fn maps(&self) -> Vec<(u64, u64, u64)> {
        self.maps.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl IommuDomain for FakeIommu {
    unsafe fn dma_map(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), Error> {
        if let Ok(mut m) = self.maps.lock() {
            m.push((iova, size, host as u64));
        }
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), Error> {
        if let Ok(mut m) = self.maps.lock() {
            m.retain(|(i, s, _)| (*i, *s) != (iova, size));
        }
        Ok(())
    }
}
