//! The root bus: configuration mechanism #1 and the host bridge.
//!
//! The guest writes `1 << 31 | bus << 16 | device << 11 | function << 8 | register` to
//! `CONFIG_ADDRESS` (0xCF8, dword writes only) and then accesses `CONFIG_DATA` (0xCFC..0xCFF)
//! with 1, 2 or 4 bytes. Only bus 0 function 0 exists: the host bridge at device 0, the
//! passthrough functions from device 1. Everything else reads as all ones (no device), and
//! writes to it are dropped.

use std::sync::{Arc, Mutex};

use super::{BarHit, PciDevice, extract};

/// Port of CONFIG_ADDRESS.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// First port of CONFIG_DATA.
pub const CONFIG_DATA: u16 = 0xcfc;
/// Devices on bus 0 (device numbers 0..32).
pub const MAX_DEVICES: usize = 32;

/// Vendor id of the host bridge: Red Hat, Inc., whose virtual PCI devices Linux knows.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Device id of the host bridge: Red Hat's "QEMU PCIe host bridge".
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code of a host bridge (06/00/00), revision 0.
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

/// The host bridge: identity registers and nothing else (no BARs, no capabilities).
#[derive(Debug, Default)]
struct HostBridge;

impl HostBridge {
    fn read(offset: u16) -> u32 {
        match offset & !3 {
            0x00 => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
            0x08 => HOST_BRIDGE_CLASS,
            _ => 0,
        }
    }
}

/// Bus 0 and everything on it.
pub struct PciRoot {
    address: u32,
    devices: Vec<Arc<Mutex<dyn PciDevice>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("address", &self.address)
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        Self {
            address: 0,
            devices: Vec::new(),
        }
    }

    /// Adds a function at the next device number (1, 2, ...); `None` when the bus is full.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        if self.devices.len() + 1 >= MAX_DEVICES {
            return None;
        }
        self.devices.push(dev);
        u8::try_from(self.devices.len()).ok()
    }

    /// Whether `port` is one of ours.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// `in` from one of our ports.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if let Some((device, offset)) = self.data_target(port, data.len()) {
            match device {
                0 => extract(HostBridge::read(offset), offset & 3, data),
                n => {
                    if let Some(Ok(mut d)) = self.device(n).map(|d| d.lock()) {
                        d.config_read(offset, data);
                    }
                }
            }
        }
    }

    /// `out` to one of our ports.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS {
            // Byte and word writes to 0xCF8 are not configuration cycles (old mechanism #2
            // probing uses them); only dword writes latch an address.
            if data.len() == 4 {
                self.address = super::le_value(data);
            }
        } else if let Some((device, offset)) = self.data_target(port, data.len()) {
            if device == 0 {
                return; // the host bridge has nothing writable.
            }
            if let Some(Ok(mut d)) = self.device(device).map(|d| d.lock()) {
                d.config_write(offset, data);
            }
        }
    }

    /// The device a BAR access at `addr` goes to, with the BAR and offset.
    pub fn bar_target(&self, addr: u64) -> Option<BarHit> {
        self.devices.iter().find_map(|d| {
            let bars = d.lock().ok()?.decoded_bars();
            bars.into_iter()
                .find_map(|b| b.offset_of(addr).map(|o| (d.clone(), b, o)))
        })
    }

    fn device(&self, number: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        self.devices.get(usize::from(number).checked_sub(1)?)
    }

    /// Decodes the latched address for an access of `len` bytes at data port `port`:
    /// (device number, register offset), or `None` for nothing (disabled, another bus or
    /// function, an access crossing the dword).
    fn data_target(&self, port: u16, len: usize) -> Option<(u8, u16)> {
        let byte = port.checked_sub(CONFIG_DATA)?;
        if self.address & (1 << 31) == 0 || usize::from(byte) + len > 4 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let device = u8::try_from((self.address >> 11) & 0x1f).ok()?;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        if device != 0 && self.device(device).is_none() {
            return None;
        }
        let register = u16::try_from(self.address & 0xfc).ok()?;
        Some((device, register + byte))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::BarRange;

    /// A device that records configuration accesses and decodes one BAR.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            extract(0xabcd_0000 | u32::from(offset), offset & 3, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            vec![BarRange {
                index: 2,
                addr: 0xc000_0000,
                size: 0x1000,
            }]
        }
        fn bar_read(&mut self, _: u8, _: u64, _: &mut [u8]) {}
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    fn select(root: &mut PciRoot, device: u32, register: u32) {
        root.pio_write(
            CONFIG_ADDRESS,
            &(1u32 << 31 | device << 11 | register).to_le_bytes(),
        );
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut d = [0u8; 4];
        root.pio_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn the_host_bridge_is_device_zero() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        assert_eq!(read32(&mut root), 0x0008_1b36);
        select(&mut root, 0, 8);
        assert_eq!(read32(&mut root) >> 8, 0x06_0000);
    }

    #[test]
    fn empty_slots_and_other_buses_read_as_ones() {
        let mut root = PciRoot::new();
        select(&mut root, 5, 0);
        assert_eq!(read32(&mut root), u32::MAX);
        root.pio_write(CONFIG_ADDRESS, &(1u32 << 31 | 1 << 16).to_le_bytes());
        assert_eq!(read32(&mut root), u32::MAX);
    }

    #[test]
    fn the_enable_bit_gates_configuration_cycles() {
        let mut root = PciRoot::new();
        root.pio_write(CONFIG_ADDRESS, &0u32.to_le_bytes());
        assert_eq!(read32(&mut root), u32::MAX);
    }

    #[test]
    fn byte_accesses_reach_the_device_at_their_offset() {
        let mut root = PciRoot::new();
        let dev = Arc::new(Mutex::new(Probe::default()));
        assert_eq!(root.add(dev.clone()), Some(1));
        select(&mut root, 1, 0x3c);
        root.pio_write(CONFIG_DATA + 1, &[0x5a]);
        let mut b = [0u8; 2];
        root.pio_read(CONFIG_DATA + 2, &mut b);
        assert_eq!(b, [0xcd, 0xab]);
        let writes = dev.lock().map(|d| d.writes.clone()).unwrap_or_default();
        assert_eq!(writes, vec![(0x3d, vec![0x5a])]);
    }

    #[test]
    fn an_access_crossing_the_dword_is_dropped() {
        let mut root = PciRoot::new();
        let dev = Arc::new(Mutex::new(Probe::default()));
        root.add(dev.clone());
        select(&mut root, 1, 0x10);
        root.pio_write(CONFIG_DATA + 2, &[1, 2, 3, 4]);
        assert!(dev.lock().map(|d| d.writes.is_empty()).unwrap_or(false));
    }

    #[test]
    fn the_address_latch_reads_back_and_ignores_narrow_writes() {
        let mut root = PciRoot::new();
        select(&mut root, 3, 0x14);
        root.pio_write(CONFIG_ADDRESS, &[0]);
        let mut d = [0u8; 4];
        root.pio_read(CONFIG_ADDRESS, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 31 | 3 << 11 | 0x14);
    }

    #[test]
    fn bar_accesses_find_their_device() {
        let mut root = PciRoot::new();
        root.add(Arc::new(Mutex::new(Probe::default())));
        let hit = root.bar_target(0xc000_0010).map(|(_, b, o)| (b.index, o));
        assert_eq!(hit, Some((2, 0x10)));
        assert!(root.bar_target(0xc000_1000).is_none());
    }
}
