//! The PCI function the guest sees for one passthrough device.
//!
//! Virtualised (held by the VMM, never reaching the device):
//! - the BARs: addresses the VMM chose, the sizing protocol (all ones in, size mask out),
//!   64-bit and prefetchable bits as the device has them; I/O BARs are hidden (read as 0);
//! - the expansion ROM BAR: reads as 0, no ROM is offered (there is no guest firmware to run
//!   one, and a ROM is code from the device);
//! - MSI-X: the control word, the table and the PBA (`devices/pci/msix.rs`);
//! - MSI: the whole capability, offered with one vector (multiple-message capable 0), kept as
//!   a one-entry table of the same MSI-X machinery (address, data, mask bit, pending bit);
//! - the interrupt line and pin: no INTx (pin 0);
//! - the I/O space enable bit of the command register (always written as 0).
//!
//! Everything else is read and written through the device's configuration region, which the
//! kernel's vfio-pci filters again with its own permission tables.
//!
//! BARs the region allows to mmap are mapped into the guest (KVM memory slots), except the
//! pages holding the MSI-X table and PBA, which are always trapped; while memory decoding is
//! off, or when a guest moves a BAR somewhere KVM refuses, the BAR is trapped too, and
//! accesses go through the device fd instead.

use std::sync::Arc;

use crate::devices::pci::msix::{self, MsiRouter, Msix};
use crate::devices::pci::window::BarWindows;
use crate::devices::pci::{
    BAR_IO, BAR_MEM64, BAR_PREFETCH, BAR0, BarRange, CAP_ID_MSI, CAP_ID_MSIX, CAP_POINTER, COMMAND,
    COMMAND_IO, COMMAND_MEMORY, CONFIG_SPACE_SIZE, INTERRUPT_LINE, PciDevice, ROM_BAR,
    STATUS_CAP_LIST, extract, le_value, merge_dword,
};
use crate::guest_warn;

use super::{Error, GuestMapper, VfioBackend, sys::Mapping};

/// Page size for the MSI-X holes in BAR mappings.
const PAGE: u64 = 4096;

/// One memory BAR offered to the guest.
#[derive(Debug)]
struct Bar {
    index: u8,
    size: u64,
    flags: u32,
    is64: bool,
    /// Guest address as programmed (masked to the BAR's alignment).
    addr: u64,
    /// mmapped parts: (offset in the BAR, host mapping, KVM mapping handle and its address).
    areas: Vec<Area>,
}

#[derive(Debug)]
struct Area {
    offset: u64,
    host: Mapping,
    mapped: Option<(u32, u64)>,
}

/// Where the MSI-X capability, table and PBA are.
#[derive(Debug)]
struct MsixCap {
    offset: u16,
    table_size_field: u16,
    table_bar: u8,
    table_offset: u64,
    pba_bar: u8,
    pba_offset: u64,
    state: Msix,
}

/// The MSI capability, virtualised with one vector.
#[derive(Debug)]
struct MsiCap {
    offset: u16,
    /// Message control bits kept from the device: 64-bit address (7), per-vector masking (8).
    flags: u16,
    state: Msix,
}

impl MsiCap {
    const CONTROL_ENABLE: u16 = 1;
    const CONTROL_64BIT: u16 = 1 << 7;
    const CONTROL_MASKABLE: u16 = 1 << 8;

    fn is64(&self) -> bool {
        self.flags & Self::CONTROL_64BIT != 0
    }

    fn len(&self) -> u16 {
        match (self.is64(), self.flags & Self::CONTROL_MASKABLE != 0) {
            (false, false) => 12,
            (true, false) => 16,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    /// The one-entry table offset that register `reg` (a dword offset into the capability)
    /// stands for: address low 0, address high 4, data 8, mask 12; `None` for the pending
    /// bits (read-only) and anything else.
    fn table_offset(&self, reg: u16) -> Option<u64> {
        match (reg, self.is64()) {
            (4, _) => Some(0),
            (8, true) => Some(4),
            (8, false) | (12, true) => Some(8),
            (12, false) | (16, true) => (self.flags & Self::CONTROL_MASKABLE != 0).then_some(12),
            _ => None,
        }
    }

    fn is_pending_reg(&self, reg: u16) -> bool {
        self.flags & Self::CONTROL_MASKABLE != 0 && reg == if self.is64() { 20 } else { 16 }
    }

    fn read(&self, reg: u16, head: u32) -> u32 {
        if reg == 0 {
            let enable = u16::from(self.state.enabled());
            return (head & 0xffff) | u32::from(self.flags | enable) << 16;
        }
        if self.is_pending_reg(reg) {
            let mut d = [0u8; 4];
            self.state.pba_read(0, &mut d);
            return u32::from_le_bytes(d);
        }
        let Some(at) = self.table_offset(reg) else {
            return 0;
        };
        let mut d = [0u8; 4];
        self.state.table_read(at, &mut d);
        let v = u32::from_le_bytes(d);
        if at == 8 { v & 0xffff } else { v }
    }
}

/// A passthrough function on the guest's PCI bus.
pub struct VfioPciDevice {
    backend: Box<dyn VfioBackend>,
    bars: Vec<Bar>,
    memory_enabled: bool,
    interrupt_line: u8,
    cap_pointer: u8,
    /// Capability `next` bytes the guest sees differently from the device: (offset, value).
    next_overrides: Vec<(u16, u8)>,
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
    mapper: Option<Arc<dyn GuestMapper>>,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("device", &self.backend.name())
            .field("bars", &self.bars)
            .field("msix", &self.msix)
            .finish_non_exhaustive()
    }
}

impl VfioPciDevice {
    /// Builds the guest's view of `backend`: resets the device, places its memory BARs in
    /// `windows`, maps what may be mapped (when `mapper` is given), and prepares MSI-X routes
    /// through `router`.
    pub fn new(
        backend: Box<dyn VfioBackend>,
        windows: &mut BarWindows,
        router: Arc<dyn MsiRouter>,
        mapper: Option<Arc<dyn GuestMapper>>,
    ) -> Result<Self, Error> {
        let name = backend.name().to_owned();
        let unsupported = |why: String| Error::Unsupported {
            device: name.clone(),
            why,
        };
        if !backend.reset() {
            tracing::warn!(device = %name, "device offers no reset; passing it through as it is");
        }
        let mut header = [0u8; 1];
        backend.config_read(0x0e, &mut header)?;
        if header[0] & 0x7f != 0 {
            return Err(unsupported(format!(
                "header type {:#x}: only endpoints (type 0) can be passed through",
                header[0]
            )));
        }

        let bars = discover_bars(backend.as_ref(), windows)?;
        let mut dev = Self {
            backend,
            bars,
            memory_enabled: false,
            interrupt_line: 0,
            cap_pointer: 0,
            next_overrides: Vec::new(),
            msi: None,
            msix: None,
            mapper,
        };
        dev.discover_capabilities(router)?;
        dev.map_bars()?;
        Ok(dev)
    }

    /// Stops the device: MSI and MSI-X off, routes detached, function reset. Called when the VM stops.
    pub fn shutdown(&mut self) {
        if let Some(m) = &mut self.msi
            && m.state.enabled()
        {
            m.state.reset();
            if let Err(e) = self.backend.disable_msi() {
                tracing::warn!("{e}");
            }
        }
        if let Some(m) = &mut self.msix
            && m.state.enabled()
        {
            m.state.reset();
            if let Err(e) = self.backend.disable_msix() {
                tracing::warn!("{e}");
            }
        }
        self.backend.reset();
    }

    /// Reads the device's configuration, or all ones if that fails.
    fn device_dword(&self, reg: u16) -> u32 {
        let mut d = [0xffu8; 4];
        if let Err(e) = self.backend.config_read(reg, &mut d) {
            guest_warn!("config read failed: {e}");
        }
        u32::from_le_bytes(d)
    }

    fn discover_capabilities(&mut self, router: Arc<dyn MsiRouter>) -> Result<(), Error> {
        let status = self.device_dword(COMMAND) >> 16;
        if status & u32::from(STATUS_CAP_LIST) == 0 {
            return Ok(());
        }
        // Walk the device's list (bounded: 48 capabilities fit in 192 bytes).
        let mut caps: Vec<(u16, u8)> = Vec::new();
        let mut ptr = u16::try_from(self.device_dword(CAP_POINTER) & 0xfc).unwrap_or(0);
        while ptr >= 0x40 && caps.len() < 48 && !caps.iter().any(|(o, _)| *o == ptr) {
            let head = self.device_dword(ptr);
            let id = u8::try_from(head & 0xff).unwrap_or(0);
            caps.push((ptr, id));
            ptr = u16::try_from((head >> 8) & 0xfc).unwrap_or(0);
        }
        let mut kept: Vec<u16> = Vec::new();
        for (offset, id) in caps {
            match id {
                CAP_ID_MSI => {
                    let control = u16::try_from(self.device_dword(offset) >> 16).unwrap_or(0);
                    let state = Msix::new(1, router.clone()).map_err(|source| Error::Msix {
                        device: self.backend.name().to_owned(),
                        source,
                    })?;
                    // Vectors start unmasked in MSI (there may be no mask bit at all).
                    let mut state = state;
                    state.table_write(12, &0u32.to_le_bytes());
                    self.msi = Some(MsiCap {
                        offset,
                        flags: control & (MsiCap::CONTROL_64BIT | MsiCap::CONTROL_MASKABLE),
                        state,
                    });
                    kept.push(offset);
                }
                CAP_ID_MSIX => {
                    self.msix = Some(self.msix_cap(offset, router.clone())?);
                    kept.push(offset);
                }
                _ => kept.push(offset),
            }
        }
        self.cap_pointer = kept
            .first()
            .and_then(|o| u8::try_from(*o).ok())
            .unwrap_or(0);
        for (i, offset) in kept.iter().enumerate() {
            let next = kept
                .get(i + 1)
                .and_then(|o| u8::try_from(*o).ok())
                .unwrap_or(0);
            self.next_overrides.push((offset + 1, next));
        }
        Ok(())
    }

    fn msix_cap(&self, offset: u16, router: Arc<dyn MsiRouter>) -> Result<MsixCap, Error> {
        let name = self.backend.name().to_owned();
        let control = u16::try_from(self.device_dword(offset) >> 16).unwrap_or(0);
        let table = self.device_dword(offset + 4);
        let pba = self.device_dword(offset + 8);
        let count = (control & msix::CONTROL_TABLE_SIZE) + 1;
        let state = Msix::new(count, router).map_err(|source| Error::Msix {
            device: name.clone(),
            source,
        })?;
        let cap = MsixCap {
            offset,
            table_size_field: control & msix::CONTROL_TABLE_SIZE,
            table_bar: u8::try_from(table & 7).unwrap_or(7),
            table_offset: u64::from(table & !7),
            pba_bar: u8::try_from(pba & 7).unwrap_or(7),
            pba_offset: u64::from(pba & !7),
            state,
        };
        for (bar, off, len) in [
            (cap.table_bar, cap.table_offset, cap.state.table_len()),
            (cap.pba_bar, cap.pba_offset, cap.state.pba_len()),
        ] {
            let fits = self
                .bars
                .iter()
                .find(|b| b.index == bar)
                .is_some_and(|b| off.checked_add(len).is_some_and(|end| end <= b.size));
            if !fits {
                return Err(Error::Unsupported {
                    device: name,
                    why: format!("MSI-X structure at BAR {bar} offset {off:#x} is outside it"),
                });
            }
        }
        Ok(cap)
    }

    /// mmaps the mappable parts of every BAR, leaving out the MSI-X pages.
    fn map_bars(&mut self) -> Result<(), Error> {
        if self.mapper.is_none() {
            return Ok(());
        }
        let mut holes: Vec<(u8, u64, u64)> = Vec::new();
        if let Some(m) = &self.msix {
            holes.push((m.table_bar, m.table_offset, m.state.table_len()));
            holes.push((m.pba_bar, m.pba_offset, m.state.pba_len()));
        }
        for bar in &mut self.bars {
            let index = u32::from(bar.index);
            let Some(info) = self.backend.region_info(index).filter(|i| i.mmap) else {
                continue;
            };
            let bar_holes: Vec<(u64, u64)> = holes
                .iter()
                .filter(|(b, _, _)| *b == bar.index)
                .map(|(_, o, l)| (*o, *l))
                .collect();
            for (offset, len) in mmap_areas(bar.size, info.sparse.as_deref(), &bar_holes) {
                let host = self.backend.region_mmap(index, offset, len)?;
                bar.areas.push(Area {
                    offset,
                    host,
                    mapped: None,
                });
            }
        }
        Ok(())
    }

    /// Brings the KVM slots over mmapped BARs in line with the BAR addresses and the memory
    /// decoding bit.
    fn sync_mappings(&mut self) {
        let Some(mapper) = self.mapper.clone() else {
            return;
        };
        let decoding = self.memory_enabled;
        for bar in &mut self.bars {
            let base = decoding.then_some(bar.addr).filter(|a| *a != 0);
            for area in &mut bar.areas {
                let want = base.and_then(|b| b.checked_add(area.offset));
                if area.mapped.map(|(_, gpa)| gpa) == want {
                    continue;
                }
                if let Some((handle, _)) = area.mapped.take() {
                    mapper.unmap(handle);
                }
                if let Some(gpa) = want {
                    // SAFETY: `area.host` is a live mapping of `area.host.len()` bytes owned
                    // by this device; its KVM mapping is removed (here, or in `Drop`) before
                    // the mapping itself is dropped.
                    match unsafe { mapper.map(gpa, area.host.len(), area.host.as_ptr()) } {
                        Ok(handle) => area.mapped = Some((handle, gpa)),
                        Err(e) => {
                            guest_warn!(gpa, "BAR not mappable there, trapping it: {e}");
                        }
                    }
                }
            }
        }
    }

    fn bar_of_register(&self, reg: u16) -> Option<(usize, bool)> {
        let slot = u8::try_from(reg.checked_sub(BAR0)? / 4).ok()?;
        self.bars.iter().enumerate().find_map(|(i, b)| {
            if b.index == slot {
                Some((i, false))
            } else if b.is64 && b.index + 1 == slot {
                Some((i, true))
            } else {
                None
            }
        })
    }

    /// The guest's view of the dword at `reg`.
    fn virtual_dword(&self, reg: u16) -> u32 {
        if (BAR0..BAR0 + 24).contains(&reg) {
            return match self
                .bar_of_register(reg)
                .and_then(|(i, hi)| Some((self.bars.get(i)?, hi)))
            {
                Some((b, false)) => {
                    u32::try_from(b.addr & 0xffff_ffff & !(b.size - 1)).unwrap_or(0) | b.flags
                }
                Some((b, true)) => u32::try_from((b.addr & !(b.size - 1)) >> 32).unwrap_or(0),
                None => 0,
            };
        }
        match reg {
            ROM_BAR => return 0,
            CAP_POINTER => return u32::from(self.cap_pointer),
            INTERRUPT_LINE => return u32::from(self.interrupt_line),
            _ => {}
        }
        let mut value = self.device_dword(reg);
        if reg == COMMAND {
            value &= !u32::from(COMMAND_IO);
        }
        for (at, next) in &self.next_overrides {
            if *at & !3 == reg {
                let shift = (at & 3) * 8;
                value = (value & !(0xff << shift)) | (u32::from(*next) << shift);
            }
        }
        if let Some(m) = &self.msix
            && reg == m.offset
        {
            let control = m.table_size_field | m.state.control_bits();
            value = (value & 0xffff) | (u32::from(control) << 16);
        }
        if let Some(m) = &self.msi
            && let Some(rel) = reg.checked_sub(m.offset).filter(|r| *r < m.len())
        {
            value = m.read(rel, value);
        }
        value
    }

    fn write_msi(&mut self, rel: u16, value: u32) {
        let msix_on = self.msix.as_ref().is_some_and(|m| m.state.enabled());
        let Some(m) = &mut self.msi else { return };
        if rel == 0 {
            let enable = (value >> 16) & u32::from(MsiCap::CONTROL_ENABLE) != 0;
            if enable == m.state.enabled() {
                return;
            }
            if enable && msix_on {
                guest_warn!("MSI enable refused while MSI-X is enabled");
                return;
            }
            m.state
                .write_control(if enable { msix::CONTROL_ENABLE } else { 0 });
            let result = if enable {
                self.backend.enable_msi(&m.state.eventfds())
            } else {
                self.backend.disable_msi()
            };
            if let Err(e) = result {
                guest_warn!("MSI enable or disable failed: {e}");
            }
        } else if let Some(at) = m.table_offset(rel) {
            let value = match at {
                8 => value & 0xffff,
                12 => value & 1,
                _ => value,
            };
            m.state.table_write(at, &value.to_le_bytes());
        }
    }

    fn write_bar(&mut self, reg: u16, value: u32) {
        let Some((i, high)) = self.bar_of_register(reg) else {
            return;
        };
        if let Some(b) = self.bars.get_mut(i) {
            let addr = if high {
                (b.addr & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (b.addr & !0xffff_ffff) | u64::from(value & !0xf)
            };
            b.addr = addr & !(b.size - 1);
        }
        self.sync_mappings();
    }

    fn write_msix_control(&mut self, value: u16) {
        let msi_on = self.msi.as_ref().is_some_and(|m| m.state.enabled());
        let Some(m) = &mut self.msix else { return };
        if msi_on && value & msix::CONTROL_ENABLE != 0 && !m.state.enabled() {
            guest_warn!("MSI-X enable refused while MSI is enabled");
            return;
        }
        if !m.state.write_control(value) {
            return;
        }
        let result = if m.state.enabled() {
            self.backend.enable_msix(&m.state.eventfds())
        } else {
            self.backend.disable_msix()
        };
        if let Err(e) = result {
            guest_warn!("MSI-X enable or disable failed: {e}");
        }
    }

    fn msix_target(&self, index: u8, offset: u64) -> Option<(bool, u64)> {
        let m = self.msix.as_ref()?;
        if index == m.table_bar
            && let Some(o) = offset
                .checked_sub(m.table_offset)
                .filter(|o| *o < m.state.table_len())
        {
            return Some((true, o));
        }
        if index == m.pba_bar
            && let Some(o) = offset
                .checked_sub(m.pba_offset)
                .filter(|o| *o < m.state.pba_len())
        {
            return Some((false, o));
        }
        None
    }

    fn bar_size(&self, index: u8) -> Option<u64> {
        self.bars.iter().find(|b| b.index == index).map(|b| b.size)
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_SIZE {
            data.fill(0xff);
            return;
        }
        extract(self.virtual_dword(offset & !3), offset & 3, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if offset >= CONFIG_SPACE_SIZE {
            return;
        }
        let reg = offset & !3;
        let shift = offset & 3;
        if (BAR0..BAR0 + 24).contains(&reg) {
            let value = merge_dword(self.virtual_dword(reg), shift, data);
            self.write_bar(reg, value);
            return;
        }
        match reg {
            ROM_BAR | CAP_POINTER | 0x38 => return,
            INTERRUPT_LINE => {
                if shift == 0
                    && let Some(b) = data.first()
                {
                    self.interrupt_line = *b;
                }
                return;
            }
            _ => {}
        }
        if let Some(m) = &self.msi
            && let Some(rel) = reg.checked_sub(m.offset).filter(|r| *r < m.len())
        {
            let value = merge_dword(self.virtual_dword(reg), shift, data);
            self.write_msi(rel, value);
            return;
        }
        if let Some(m) = &self.msix
            && reg == m.offset
        {
            // Only the control word is writable; the device's own MSI-X control is left to
            // vfio-pci, which drives it from `enable_msix`.
            let value = merge_dword(self.virtual_dword(reg), shift, data);
            if shift + u16::try_from(data.len()).unwrap_or(0) > 2 {
                self.write_msix_control(u16::try_from(value >> 16).unwrap_or(0));
            }
            return;
        }
        if let Some(m) = &self.msix
            && reg > m.offset
            && reg < m.offset + 12
        {
            return; // table and PBA locations are read-only.
        }
        let mut bytes = data.to_vec();
        if reg == COMMAND
            && shift == 0
            && let Some(b) = bytes.first_mut()
        {
            *b &= !u8::try_from(COMMAND_IO).unwrap_or(1);
            self.memory_enabled = *b & u8::try_from(COMMAND_MEMORY).unwrap_or(2) != 0;
        }
        if let Err(e) = self.backend.config_write(offset, &bytes) {
            guest_warn!("config write failed: {e}");
        }
        if reg == COMMAND {
            self.sync_mappings();
        }
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        if !self.memory_enabled {
            return Vec::new();
        }
        self.bars
            .iter()
            .filter(|b| b.addr != 0 && b.addr.checked_add(b.size).is_some())
            .map(|b| BarRange {
                index: b.index,
                addr: b.addr,
                size: b.size,
            })
            .collect()
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match self.msix_target(index, offset) {
            Some((true, o)) => {
                if let Some(m) = &self.msix {
                    m.state.table_read(o, data);
                }
            }
            Some((false, o)) => {
                if let Some(m) = &self.msix {
                    m.state.pba_read(o, data);
                }
            }
            None => {
                let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                if self
                    .bar_size(index)
                    .is_some_and(|s| offset.checked_add(len).is_some_and(|e| e <= s))
                    && let Err(e) = self.backend.region_read(u32::from(index), offset, data)
                {
                    guest_warn!(offset, "BAR read failed: {e}");
                }
            }
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        match self.msix_target(index, offset) {
            Some((true, o)) => {
                if let Some(m) = &mut self.msix {
                    m.state.table_write(o, data);
                }
            }
            Some((false, _)) => {} // the PBA is read-only.
            None => {
                let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                if self
                    .bar_size(index)
                    .is_some_and(|s| offset.checked_add(len).is_some_and(|e| e <= s))
                    && let Err(e) = self.backend.region_write(u32::from(index), offset, data)
                {
                    guest_warn!(offset, "BAR write failed: {e}");
                }
            }
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if let Some(mapper) = &self.mapper {
            for area in self.bars.iter_mut().flat_map(|b| b.areas.iter_mut()) {
                if let Some((handle, _)) = area.mapped.take() {
                    mapper.unmap(handle);
                }
            }
        }
    }
}

/// Reads the device's BARs and places every memory BAR in `windows`; I/O BARs are hidden.
fn discover_bars(backend: &dyn VfioBackend, windows: &mut BarWindows) -> Result<Vec<Bar>, Error> {
    let name = backend.name().to_owned();
    let mut bars = Vec::new();
    let mut slot = 0u8;
    while slot < 6 {
        let mut raw = [0u8; 4];
        backend.config_read(BAR0 + u16::from(slot) * 4, &mut raw)?;
        let raw = le_value(&raw);
        let index = slot;
        let info = backend.region_info(u32::from(index));
        let is64 = raw & BAR_IO == 0 && raw & 0b110 == BAR_MEM64;
        slot += if is64 { 2 } else { 1 };
        let Some(info) = info.filter(|i| i.size != 0) else {
            continue;
        };
        if raw & BAR_IO != 0 {
            tracing::info!(device = %name, bar = index, "I/O BAR hidden from the guest");
            continue;
        }
        if !info.size.is_power_of_two() || (!is64 && info.size > 1 << 31) {
            return Err(Error::Unsupported {
                device: name,
                why: format!("BAR {index} has size {:#x}", info.size),
            });
        }
        let place = if is64 {
            windows.allocate64(info.size)
        } else {
            windows.allocate32(info.size)
        };
        let addr = place.map_err(|source| Error::Bar {
            bar: index,
            device: name.clone(),
            source,
        })?;
        bars.push(Bar {
            index,
            size: info.size,
            flags: raw & (BAR_MEM64 | BAR_PREFETCH),
            is64,
            addr,
            areas: Vec::new(),
        });
    }
    Ok(bars)
}

/// The parts of a BAR of `size` bytes to mmap: the region's mappable areas (`sparse`, or all
/// of it), page-aligned inwards, minus `holes` (offset, length) widened to whole pages.
pub fn mmap_areas(
    size: u64,
    sparse: Option<&[(u64, u64)]>,
    holes: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let mut areas: Vec<(u64, u64)> = match sparse {
        Some(s) => s
            .iter()
            .filter_map(|(o, l)| Some((*o, o.checked_add(*l)?.min(size))))
            .collect(),
        None => vec![(0, size)],
    };
    for (off, len) in holes {
        let start = off - off % PAGE;
        let end = off.saturating_add(*len).saturating_add(PAGE - 1) / PAGE * PAGE;
        areas = areas
            .into_iter()
            .flat_map(|(s, e)| {
                if end <= s || start >= e {
                    vec![(s, e)]
                } else {
                    vec![(s, start.max(s)), (end.min(e), e)]
                }
            })
            .collect();
    }
    areas
        .into_iter()
        .filter_map(|(s, e)| {
            let s = s.checked_next_multiple_of(PAGE)?;
            let e = e / PAGE * PAGE;
            (e > s).then_some((s, e - s))
        })
        .collect()
}

#[cfg(test)]
mod tests;
