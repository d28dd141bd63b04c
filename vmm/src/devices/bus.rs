//! Routing vCPU exits to devices. Port I/O: COM1, the i8042 and PCI configuration mechanism
//! #1. MMIO: one window per virtio device, then the BARs of PCI functions. Accesses nobody owns read as all ones and are otherwise ignored (logged, rate-limited):
//! a guest probing for hardware must never stop the VMM.

use std::sync::{Arc, Mutex};

use super::legacy::{I8042, I8042_COMMAND, I8042_DATA};
use super::pci::BarHit;
use super::pci::bus::PciRoot;
use super::serial::{COM1_BASE, COM1_LEN, SerialDevice};
use crate::guest_warn;

/// What a vCPU thread calls on port and MMIO exits.
pub trait IoBus: Send + Sync {
    /// `in` from `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// Load from `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// Store to `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// A device in an MMIO window.
pub trait MmioDevice: Send {
    /// Load at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Store at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// One MMIO window.
struct Window {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

/// The machine's devices.
pub struct Bus {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Mutex<I8042>,
    mmio: Vec<Window>,
    pci: Option<Mutex<PciRoot>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("mmio_windows", &self.mmio.len())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus with the legacy devices and no MMIO windows yet. COM1 is shared with the
    /// console input thread, when there is one.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, i8042: I8042) -> Self {
        Self {
            serial,
            i8042: Mutex::new(i8042),
            mmio: Vec::new(),
            pci: None,
        }
    }

    /// Puts a PCI root bus on the machine: configuration mechanism #1 and its BARs.
    pub fn set_pci(&mut self, root: PciRoot) {
        self.pci = Some(Mutex::new(root));
    }

    /// The PCI function whose BAR decodes `addr`, with the BAR and offset.
    fn pci_bar(&self, addr: u64) -> Option<BarHit> {
        let root = self.pci.as_ref()?.lock().ok()?;
        root.bar_target(addr)
    }

    /// Adds an MMIO window; windows never overlap (the caller lays them out from `layout`).
    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.mmio.push(Window { base, len, dev });
    }

    fn window(&self, addr: u64) -> Option<(&Window, u64)> {
        self.mmio
            .iter()
            .find(|w| addr >= w.base && addr - w.base < w.len)
            .map(|w| (w, addr - w.base))
    }

    fn com1_offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_BASE)
            .filter(|o| *o < COM1_LEN)
            .and_then(|o| u8::try_from(o).ok())
    }
}

impl IoBus for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if PciRoot::owns_port(port) {
            if let Some(Ok(mut root)) = self.pci.as_ref().map(|p| p.lock()) {
                root.pio_read(port, data);
            }
        } else if let Some(off) = Self::com1_offset(port) {
            if let (Ok(mut s), Some(d)) = (self.serial.lock(), data.first_mut()) {
                *d = s.read(off);
            }
        } else if (port == I8042_DATA || port == I8042_COMMAND)
            && let (Ok(mut k), Some(d)) = (self.i8042.lock(), data.first_mut())
        {
            *d = k.read(u8::try_from(port - I8042_DATA).unwrap_or(0));
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if PciRoot::owns_port(port) {
            if let Some(Ok(mut root)) = self.pci.as_ref().map(|p| p.lock()) {
                root.pio_write(port, data);
            }
        } else if let Some(off) = Self::com1_offset(port) {
            if let Ok(mut s) = self.serial.lock()
                && let Err(e) = s.write(off, value)
            {
                guest_warn!("serial write failed: {e:?}");
            }
        } else if (port == I8042_DATA || port == I8042_COMMAND)
            && let Ok(mut k) = self.i8042.lock()
        {
            let _ = k.write(u8::try_from(port - I8042_DATA).unwrap_or(0), value);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        match self.window(addr) {
            Some((w, off)) => {
                if let Ok(mut d) = w.dev.lock() {
                    d.read(off, data);
                }
            }
            None => match self.pci_bar(addr) {
                Some((dev, bar, off)) => {
                    if let Ok(mut d) = dev.lock() {
                        d.bar_read(bar.index, off, data);
                    }
                }
                None => guest_warn!(addr, "MMIO read outside every device"),
            },
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.window(addr) {
            Some((w, off)) => {
                if let Ok(mut d) = w.dev.lock() {
                    d.write(off, data);
                }
            }
            None => match self.pci_bar(addr) {
                Some((dev, bar, off)) => {
                    if let Ok(mut d) = dev.lock() {
                        d.bar_write(bar.index, off, data);
                    }
                }
                None => guest_warn!(addr, "MMIO write outside every device"),
            },
        }
    }
}
