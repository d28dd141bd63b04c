//! The passthrough function's configuration space, BARs and MSI-X, against the fake device.

use std::sync::{Arc, Mutex};

use super::*;
use crate::devices::pci::msix::MsiMessage;
use crate::devices::pci::msix::testing::{Call, RecordingRouter};
use crate::devices::pci::window::PCI_MMIO32_START;
use crate::vfio::fake::{self, FakeGpu, FakeLog};

struct Rig {
    dev: VfioPciDevice,
    log: Arc<Mutex<FakeLog>>,
    router: Arc<RecordingRouter>,
}

fn rig() -> Rig {
    let (gpu, log) = FakeGpu::new();
    let router = Arc::new(RecordingRouter::default());
    let mut windows = BarWindows::new(1 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
    let dev = VfioPciDevice::new(Box::new(gpu), &mut windows, router.clone(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    Rig { dev, log, router }
}

fn read32(dev: &mut VfioPciDevice, offset: u16) -> u32 {
    let mut d = [0u8; 4];
    dev.config_read(offset, &mut d);
    u32::from_le_bytes(d)
}

fn write32(dev: &mut VfioPciDevice, offset: u16, value: u32) {
    dev.config_write(offset, &value.to_le_bytes());
}

fn log<T>(r: &Rig, f: impl FnOnce(&FakeLog) -> T) -> T {
    let l = r.log.lock().unwrap_or_else(|e| panic!("{e}"));
    f(&l)
}

#[test]
fn identity_registers_pass_through() {
    let mut r = rig();
    assert_eq!(
        read32(&mut r.dev, 0),
        u32::from(fake::FAKE_DEVICE) << 16 | u32::from(fake::FAKE_VENDOR)
    );
    assert_eq!(read32(&mut r.dev, 8) >> 8, 0x03_0200);
}

#[test]
fn the_device_is_reset_when_created_and_when_stopped() {
    let mut r = rig();
    assert_eq!(log(&r, |l| l.resets), 1);
    r.dev.shutdown();
    assert_eq!(log(&r, |l| l.resets), 2);
}

#[test]
fn the_64_bit_prefetchable_bar_is_placed_above_ram() {
    let mut r = rig();
    assert_eq!(
        read32(&mut r.dev, 0x10),
        0xc,
        "64 GiB: low dword holds only the flags"
    );
    assert_eq!(
        read32(&mut r.dev, 0x14),
        0x10,
        "64 GiB: the high dword is 0x10"
    );
}

#[test]
fn the_32_bit_bar_is_placed_in_the_low_window() {
    let mut r = rig();
    assert_eq!(
        u64::from(read32(&mut r.dev, 0x18)),
        PCI_MMIO32_START,
        "flags 0: 32-bit, not prefetchable"
    );
}

#[test]
fn sizing_a_64_bit_bar_returns_its_size_mask_in_both_halves() {
    let mut r = rig();
    write32(&mut r.dev, 0x10, u32::MAX);
    write32(&mut r.dev, 0x14, u32::MAX);
    let size = 0u64.wrapping_sub(
        u64::from(read32(&mut r.dev, 0x14)) << 32 | u64::from(read32(&mut r.dev, 0x10) & !0xf),
    );
    assert_eq!(size, fake::BAR0_SIZE);
    assert_eq!(
        read32(&mut r.dev, 0x10) & 0xf,
        0xc,
        "type bits survive sizing"
    );
}

#[test]
fn sizing_a_32_bit_bar_returns_its_size_mask() {
    let mut r = rig();
    write32(&mut r.dev, 0x18, u32::MAX);
    assert_eq!(
        read32(&mut r.dev, 0x18),
        !(u32::try_from(fake::BAR2_SIZE).unwrap_or(0) - 1)
    );
}

#[test]
fn a_reprogrammed_bar_decodes_at_its_new_address_once_memory_is_enabled() {
    let mut r = rig();
    write32(&mut r.dev, 0x18, 0xc010_0000);
    assert!(
        r.dev.decoded_bars().is_empty(),
        "memory decoding is off after reset"
    );
    write32(&mut r.dev, 0x04, u32::from(COMMAND_MEMORY));
    let bar2 = r.dev.decoded_bars().into_iter().find(|b| b.index == 2);
    assert_eq!(
        bar2.map(|b| (b.addr, b.size)),
        Some((0xc010_0000, fake::BAR2_SIZE))
    );
}

#[test]
fn io_bars_are_hidden() {
    let mut r = rig();
    write32(&mut r.dev, 0x20, u32::MAX);
    assert_eq!(read32(&mut r.dev, 0x20), 0);
    assert!(r.dev.decoded_bars().iter().all(|b| b.index != 4));
}

#[test]
fn the_rom_bar_reads_as_absent_and_writes_never_reach_the_device() {
    let mut r = rig();
    assert_eq!(read32(&mut r.dev, 0x30), 0);
    write32(&mut r.dev, 0x30, u32::MAX);
    assert_eq!(read32(&mut r.dev, 0x30), 0);
    assert!(log(&r, |l| l.config_writes.iter().all(|(o, _)| *o != 0x30)));
}

#[test]
fn the_capability_list_is_msi_then_msi_x_then_power_management() {
    let mut r = rig();
    assert_eq!(read32(&mut r.dev, 0x34) & 0xff, u32::from(fake::MSI_CAP));
    let msi = read32(&mut r.dev, u16::from(fake::MSI_CAP));
    assert_eq!(msi & 0xffff, 0x05 | u32::from(fake::MSIX_CAP) << 8);
    assert_eq!(msi >> 16, 0x0180, "one vector, 64-bit, maskable, disabled");
}

fn msi_reg(at: u8) -> u16 {
    u16::from(fake::MSI_CAP + at)
}

#[test]
fn msi_programmed_and_enabled_gets_a_route_and_the_device_its_eventfd() {
    let mut r = rig();
    write32(&mut r.dev, msi_reg(4), 0xfee0_1000);
    write32(&mut r.dev, msi_reg(8), 0);
    write32(&mut r.dev, msi_reg(12), 0x4049);
    assert_eq!(r.router.take(), vec![]);
    r.dev.config_write(msi_reg(2), &[0x01, 0x00]);
    let msg = MsiMessage {
        addr: 0xfee0_1000,
        data: 0x4049,
    };
    assert_eq!(
        r.router.take(),
        vec![Call::Route(24, msg), Call::Attach(24)]
    );
    assert!(log(&r, |l| l.msi_enabled));
    assert_eq!(read32(&mut r.dev, msi_reg(0)) >> 16, 0x0181);
    assert_eq!(read32(&mut r.dev, msi_reg(12)), 0x4049);
    assert!(
        log(&r, |l| l.config_writes.is_empty()),
        "MSI never reaches the device"
    );
}

#[test]
fn msi_mask_bit_detaches_and_a_masked_signal_is_pending() {
    let mut r = rig();
    write32(&mut r.dev, msi_reg(4), 0xfee0_0000);
    r.dev.config_write(msi_reg(2), &[0x01, 0x00]);
    r.router.take();
    write32(&mut r.dev, msi_reg(16), 1);
    assert_eq!(r.router.take(), vec![Call::Detach(24)]);
    r.dev.bar_write(2, fake::DOORBELL, &0u32.to_le_bytes());
    assert_eq!(read32(&mut r.dev, msi_reg(20)), 1, "pending bit");
    write32(&mut r.dev, msi_reg(16), 0);
    assert_eq!(r.router.take(), vec![Call::Attach(24)]);
}

#[test]
fn msi_and_msi_x_are_never_enabled_together() {
    let mut r = rig();
    enable_msix(&mut r);
    r.dev.config_write(msi_reg(2), &[0x01, 0x00]);
    assert!(!log(&r, |l| l.msi_enabled));
    assert_eq!(read32(&mut r.dev, msi_reg(0)) >> 16, 0x0180);
}

#[test]
fn the_capability_list_after_msi_x_is_kept() {
    let mut r = rig();
    let msix = read32(&mut r.dev, u16::from(fake::MSIX_CAP));
    assert_eq!(msix & 0xff, 0x11);
    assert_eq!((msix >> 8) & 0xff, u32::from(fake::PM_CAP));
    assert_eq!(
        msix >> 16,
        u32::from(fake::VECTORS - 1),
        "table size, disabled"
    );
    assert_eq!(read32(&mut r.dev, u16::from(fake::PM_CAP)) & 0xffff, 0x0001);
}

#[test]
fn msi_x_table_location_is_the_devices_and_read_only() {
    let mut r = rig();
    let at = u16::from(fake::MSIX_CAP) + 4;
    assert_eq!(read32(&mut r.dev, at), fake::MSIX_TABLE | 2);
    write32(&mut r.dev, at, 0);
    assert_eq!(read32(&mut r.dev, at), fake::MSIX_TABLE | 2);
}

#[test]
fn no_legacy_interrupt_is_offered() {
    let mut r = rig();
    write32(&mut r.dev, 0x3c, 0xffff_ff0b);
    assert_eq!(read32(&mut r.dev, 0x3c), 0x0b, "line kept, pin 0");
}

#[test]
fn the_io_enable_bit_never_reaches_the_device() {
    let mut r = rig();
    r.dev.config_write(0x04, &[0x07, 0x00]);
    assert_eq!(
        log(&r, |l| l.config_writes.clone()),
        vec![(4, vec![0x06, 0x00])]
    );
    assert_eq!(read32(&mut r.dev, 0x04) & 0xffff, 0x0006);
}

fn enable_msix(r: &mut Rig) {
    let ctl = u16::from(fake::MSIX_CAP) + 2;
    r.dev.config_write(ctl, &msix::CONTROL_ENABLE.to_le_bytes());
}

fn program_vector(r: &mut Rig, vector: u64, addr: u32, data: u32, masked: bool) {
    let base = u64::from(fake::MSIX_TABLE) + vector * 16;
    r.dev.bar_write(2, base, &addr.to_le_bytes());
    r.dev.bar_write(2, base + 4, &0u32.to_le_bytes());
    r.dev.bar_write(2, base + 8, &data.to_le_bytes());
    r.dev
        .bar_write(2, base + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn enabling_msi_x_hands_the_device_its_eventfds() {
    let mut r = rig();
    enable_msix(&mut r);
    assert!(log(&r, |l| l.msix_enabled));
    let ctl = read32(&mut r.dev, u16::from(fake::MSIX_CAP)) >> 16;
    assert_eq!(ctl, u32::from(msix::CONTROL_ENABLE | (fake::VECTORS - 1)));
    r.dev.config_write(u16::from(fake::MSIX_CAP) + 2, &[0, 0]);
    assert!(!log(&r, |l| l.msix_enabled));
}

#[test]
fn a_programmed_unmasked_vector_gets_a_kvm_route_and_an_irqfd() {
    let mut r = rig();
    enable_msix(&mut r);
    program_vector(&mut r, 1, 0xfee0_0000, 0x45, false);
    let msg = MsiMessage {
        addr: 0xfee0_0000,
        data: 0x45,
    };
    assert_eq!(
        r.router.take(),
        vec![Call::Route(26, msg), Call::Attach(26)]
    );
}

#[test]
fn the_doorbell_signals_the_vectors_eventfd() {
    let mut r = rig();
    enable_msix(&mut r);
    r.dev.bar_write(2, fake::DOORBELL, &2u32.to_le_bytes());
    let mut pba = [0u8; 8];
    r.dev.bar_read(2, u64::from(fake::MSIX_PBA), &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b100, "masked vector 2 is pending");
}

#[test]
fn table_accesses_are_trapped_and_never_reach_the_device() {
    let mut r = rig();
    program_vector(&mut r, 0, 0xfee0_0000, 0x40, true);
    let mut d = [0u8; 4];
    r.dev.bar_read(2, u64::from(fake::MSIX_TABLE) + 8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x40);
    assert!(log(&r, |l| l.doorbells.is_empty()));
}

#[test]
fn other_bar_accesses_go_to_the_device_within_the_bar_only() {
    let mut r = rig();
    r.dev
        .bar_write(2, fake::SCRATCH, &0x1234_5678u32.to_le_bytes());
    let mut d = [0u8; 4];
    r.dev.bar_read(2, fake::SCRATCH, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    r.dev.bar_read(2, fake::BAR2_SIZE - 2, &mut d);
    assert_eq!(d, [0xff; 4], "an access past the end is refused");
}

#[test]
fn mmap_areas_leave_out_the_msix_pages() {
    let areas = mmap_areas(0x10_0000, None, &[(0x2000, 64), (0x3000, 8)]);
    assert_eq!(areas, vec![(0, 0x2000), (0x4000, 0xf_c000)]);
}

#[test]
fn mmap_areas_follow_sparse_areas_and_whole_pages() {
    let areas = mmap_areas(
        0x10000,
        Some(&[(0x100, 0x2000), (0x8000, 0x8000)]),
        &[(0x9010, 16)],
    );
    assert_eq!(
        areas,
        vec![(0x1000, 0x1000), (0x8000, 0x1000), (0xa000, 0x6000)]
    );
}

/// Records what the device asks of KVM's memory slots.
#[derive(Debug, Default)]
struct RecordingMapper {
    calls: Mutex<Vec<(&'static str, u32, u64, u64)>>,
    next: Mutex<u32>,
}

impl RecordingMapper {
    fn take(&self) -> Vec<(&'static str, u32, u64, u64)> {
        self.calls
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

impl GuestMapper for RecordingMapper {
    unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> Result<u32, std::io::Error> {
        assert!(!host.is_null());
        let mut next = self
            .next
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        *next += 1;
        if let Ok(mut c) = self.calls.lock() {
            c.push(("map", *next, gpa, len));
        }
        Ok(*next)
    }

    fn unmap(&self, handle: u32) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(("unmap", handle, 0, 0));
        }
    }
}

fn mappable_rig() -> (VfioPciDevice, Arc<RecordingMapper>) {
    let file = tempfile_of(fake::BAR2_SIZE);
    let (gpu, _log) = FakeGpu::new();
    let gpu = gpu.with_mappable_bar2(file);
    let mapper = Arc::new(RecordingMapper::default());
    let mut windows = BarWindows::new(1 << 30, 46).unwrap_or_else(|e| panic!("{e}"));
    let dev = VfioPciDevice::new(
        Box::new(gpu),
        &mut windows,
        Arc::new(RecordingRouter::default()),
        Some(mapper.clone()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (dev, mapper)
}

fn tempfile_of(len: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "moat-fake-bar-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&path);
    f.set_len(len).unwrap_or_else(|e| panic!("{e}"));
    f
}

#[test]
fn a_mappable_bar_is_mapped_without_its_msix_pages_once_memory_decodes() {
    let (mut dev, mapper) = mappable_rig();
    assert_eq!(
        mapper.take(),
        vec![],
        "nothing mapped while decoding is off"
    );
    write32(&mut dev, 0x04, u32::from(COMMAND_MEMORY));
    assert_eq!(
        mapper.take(),
        vec![("map", 1, PCI_MMIO32_START, 0x2000)],
        "BAR 2 minus the table (0x2000) and PBA (0x3000) pages"
    );
}

#[test]
fn moving_a_mapped_bar_moves_its_slot_and_disabling_memory_removes_it() {
    let (mut dev, mapper) = mappable_rig();
    write32(&mut dev, 0x04, u32::from(COMMAND_MEMORY));
    mapper.take();
    write32(&mut dev, 0x18, 0xc800_0000);
    assert_eq!(
        mapper.take(),
        vec![("unmap", 1, 0, 0), ("map", 2, 0xc800_0000, 0x2000)]
    );
    write32(&mut dev, 0x04, 0);
    assert_eq!(mapper.take(), vec![("unmap", 2, 0, 0)]);
}

#[test]
fn the_msix_table_of_a_mapped_bar_is_still_trapped() {
    let (mut dev, _mapper) = mappable_rig();
    dev.bar_write(2, u64::from(fake::MSIX_TABLE) + 8, &0x45u32.to_le_bytes());
    let mut d = [0u8; 4];
    dev.bar_read(2, u64::from(fake::MSIX_TABLE) + 8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x45);
}
