//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).
//!
//! Every register access is bounds- and width-checked; a write the spec does not allow in the
//! current status is ignored (and logged, rate-limited). DRIVER_OK activates the device only if
//! FEATURES_OK was accepted and every queue the driver enabled is valid in guest memory; a
//! failed activation sets DEVICE_NEEDS_RESET instead of touching anything on the host.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::bus::MmioDevice;
use crate::guest_warn;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4f_4154; // "MOAT"

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtio device behind an MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
    /// The device was stopped for a snapshot and runs again on [`Self::resume_device`].
    paused: bool,
}

/// One queue's registers and positions (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers, its queues and whether its device runs: everything a device of
/// ours keeps that the guest relies on (block and rng keep nothing more; vsock's host
/// connections are not kept, see [`Activation::restored`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TransportState {
    pub device_type: u32,
    pub queues: Vec<QueueSnapshot>,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub active: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
}

/// Why a transport cannot take a snapshot's state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Another kind of device sits in this slot.
    #[error("the snapshot has device type {found} where this VM has {ours}")]
    DeviceType {
        /// The snapshot's.
        found: u32,
        /// Ours.
        ours: u32,
    },
    /// The queues do not match the device's.
    #[error("the snapshot's queues do not fit device type {0}")]
    Queues(u32),
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue could not be created (a max size that is not a power of two).
    #[error("invalid queue size")]
    Queue(#[source] virtio_queue::Error),
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Offset of the QueueNotify register in a device window.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

impl MmioTransport {
    /// The per-queue notification eventfds, to register as KVM ioeventfds on
    /// `base + QUEUE_NOTIFY_OFFSET` with the queue index as data: the device's thread then
    /// wakes without the vCPU leaving the kernel. They live as long as the transport.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Wraps `device`, raising its interrupts through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Interrupt,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(Error::Queue)?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            paused: false,
        })
    }

    /// Stops the device (if it runs) and keeps its queues as it left them, for a snapshot.
    pub fn pause_device(&mut self) {
        if !self.active || self.paused {
            return;
        }
        if let Some(queues) = self.device.pause() {
            if queues.len() == self.queues.len() {
                self.queues = queues;
            } else {
                // The device could not hand its queues back: the guest must start it over.
                tracing::error!("a device lost its queues while pausing");
                self.interrupt.signal_needs_reset();
            }
        }
        self.paused = true;
    }

    /// Starts the device again after [`Self::pause_device`], from where its queues were, and
    /// raises its interrupt again if the driver has not acknowledged it
    /// ([`Interrupt::raise_pending`]).
    pub fn resume_device(&mut self) {
        if self.paused {
            self.paused = false;
            self.active = false;
            self.activate_with(true);
            self.interrupt.raise_pending();
        }
    }

    /// The transport's state; the device must be paused for its queue positions to be final.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    /// Takes a snapshot's `state`; a device that was running starts from there on
    /// [`Self::resume_device`].
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let ours = self.device.device_type();
        if state.device_type != ours {
            return Err(RestoreError::DeviceType {
                found: state.device_type,
                ours,
            });
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len()
            || state
                .queues
                .iter()
                .zip(max_sizes)
                .any(|(q, m)| q.max_size != *m)
        {
            return Err(RestoreError::Queues(ours));
        }
        let queues: Result<Vec<Queue>, _> = state
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(*q)))
            .collect();
        self.queues = queues.map_err(|_| RestoreError::Queues(ours))?;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        // A running device starts on [`Self::resume_device`], once the vCPUs exist: what it
        // does first (vsock's transport reset) interrupts the guest, and KVM drops an
        // interrupt that no local APIC can take yet.
        self.active = state.active;
        self.paused = state.active;
        Ok(())
    }

    /// The device status the driver sees.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_setup_allowed() {
            guest_warn!("queue register written outside queue setup");
            return;
        }
        match self.selected() {
            Some(q) => f(q),
            None => guest_warn!("queue register written with an invalid QueueSel"),
        }
    }

    fn device_features_word(&self) -> u32 {
        let f = self.device.device_features() | VIRTIO_F_VERSION_1;
        match self.device_features_sel {
            0 => (f & 0xffff_ffff) as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits can only be added (except by reset), and FEATURES_OK only if acceptable.
        if v & self.status != self.status {
            guest_warn!(
                old = self.status,
                new = v,
                "status bits cleared without reset"
            );
            return;
        }
        let mut v = v;
        let adding = v & !self.status;
        if adding & status::FEATURES_OK != 0 {
            let offered = self.device.device_features() | VIRTIO_F_VERSION_1;
            if self.driver_features & VIRTIO_F_VERSION_1 == 0
                || self.driver_features & !offered != 0
            {
                guest_warn!(
                    features = self.driver_features,
                    "driver features refused (no VERSION_1 or unoffered bits)"
                );
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if adding & status::DRIVER_OK != 0 && !self.active {
            self.activate_with(false);
        }
    }

    fn activate_with(&mut self, restored: bool) {
        if self.status & status::FEATURES_OK == 0 {
            guest_warn!("DRIVER_OK without FEATURES_OK");
            self.interrupt.signal_needs_reset();
            return;
        }
        let mem = self.mem.as_ref();
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(mem))
        {
            guest_warn!(
                queue = i,
                "DRIVER_OK with a queue that is not ready or not valid"
            );
            self.interrupt.signal_needs_reset();
            return;
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            match e.try_clone() {
                Ok(c) => queue_evts.push(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot clone a queue eventfd");
                    self.interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.interrupt.signal_needs_reset();
            return;
        };
        let act = Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            restored,
        };
        match self.device.activate(act) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!(error = %e, "device activation failed");
                self.interrupt.signal_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        self.paused = false;
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        // Drain notifications left from before the reset.
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.active = false;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.interrupt.clear();
    }

    fn notify(&mut self, index: u32) {
        if !self.active {
            guest_warn!(queue = index, "queue notified before DRIVER_OK");
            return;
        }
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.queue_evts.get(i))
        {
            Some(e) => {
                if let Err(err) = e.write(1) {
                    guest_warn!("cannot signal queue eventfd: {err}");
                }
            }
            None => guest_warn!(queue = index, "notify for a queue that does not exist"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// Sets half of a ring address, refusing (rate-limited) a misaligned result.
fn set_ring(q: &mut Queue, ring: Ring, low: Option<u32>, high: Option<u32>) {
    let cur = match ring {
        Ring::Desc => q.desc_table(),
        Ring::Avail => q.avail_ring(),
        Ring::Used => q.used_ring(),
    };
    let lo = low.map_or(cur & 0xffff_ffff, u64::from);
    let hi = high.map_or(cur >> 32, u64::from);
    let addr = vm_memory::GuestAddress((hi << 32) | lo);
    let r = match ring {
        Ring::Desc => q.try_set_desc_table_address(addr),
        Ring::Avail => q.try_set_avail_ring_address(addr),
        Ring::Used => q.try_set_used_ring_address(addr),
    };
    if r.is_err() {
        guest_warn!(?ring, addr = addr.0, "misaligned ring address refused");
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    let b: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio register read of wrong width"
            );
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.device_features_word(),
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => 0,
            _ => {
                guest_warn!(offset, "read of an unknown virtio-mmio register");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let (Some(v), true) = (read_u32(data), offset.is_multiple_of(4)) else {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio register write of wrong width"
            );
            return;
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    guest_warn!("driver features written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    _ => guest_warn!("driver features written with a bad selector"),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            // The `try_` setters: virtio-queue's plain setters log every refusal unthrottled,
            // which a guest could turn into a log flood; ours are rate-limited.
            reg::QUEUE_NUM => self.with_queue(|q| {
                if q.try_set_size(u16::try_from(v).unwrap_or(0)).is_err() {
                    guest_warn!(
                        size = v,
                        "queue size refused (zero, too big or not a power of 2)"
                    );
                }
            }),
            reg::QUEUE_READY => self.with_queue(|q| q.set_ready(v == 1)),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| set_ring(q, Ring::Desc, Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| set_ring(q, Ring::Desc, None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| set_ring(q, Ring::Avail, Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| set_ring(q, Ring::Avail, None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| set_ring(q, Ring::Used, Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| set_ring(q, Ring::Used, None, Some(v))),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => guest_warn!(
                offset,
                "write to an unknown or read-only virtio-mmio register"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use std::sync::Mutex;

    use super::*;
    use crate::devices::virtio::testing::{DriverQueue, memory};
    use crate::devices::virtio::{ActivateError, read_config_bytes};

    #[derive(Default)]
    struct Record {
        activations: usize,
        resets: usize,
    }

    struct Fake(Arc<Mutex<Record>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
            assert_eq!(act.queues.len(), 2);
            self.0.lock().unwrap().activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn pause(&mut self) -> Option<Vec<Queue>> {
            None
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>, Arc<GuestMemoryMmap>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let mem = memory(1);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(Box::new(Fake(rec.clone())), mem.clone(), irq).unwrap();
        (t, rec, mem)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queues(t: &mut MmioTransport, mem: &GuestMemoryMmap) {
        for (i, base) in [(0u32, 0x1000u64), (1, 0x2000)] {
            let q = DriverQueue::new(base, 16);
            let _ = q.device_queue(mem);
            let (d, a, u) = q.addresses();
            w(t, reg::QUEUE_SEL, i);
            w(t, reg::QUEUE_NUM, 16);
            w(t, reg::QUEUE_DESC_LOW, d as u32);
            w(t, reg::QUEUE_DRIVER_LOW, a as u32);
            w(t, reg::QUEUE_DEVICE_LOW, u as u32);
            w(t, reg::QUEUE_READY, 1);
        }
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers_read_as_virtio_mmio_v2() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    }

    #[test]
    fn full_handshake_activates_the_device() {
        let (mut t, rec, mem) = transport();
        negotiate(&mut t, 1);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations, 1);
        assert_eq!(r(&mut t, reg::STATUS), ALL_OK);
    }

    #[test]
    fn legacy_driver_without_version_1_is_refused_features_ok() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, 0);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_with_a_queue_outside_memory_needs_reset() {
        let (mut t, rec, mem) = transport();
        negotiate(&mut t, 1);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::QUEUE_SEL, 1);
        // Move queue 1 outside the 1 MiB of guest memory.
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        w(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(rec.lock().unwrap().activations, 0);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_size_that_is_not_a_power_of_two_is_ignored() {
        let (mut t, _, mem) = transport();
        negotiate(&mut t, 1);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 1000);
        w(&mut t, reg::STATUS, ALL_OK);
        // The size stayed 16 (valid), so the device could start.
        assert_eq!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn misaligned_ring_address_is_refused() {
        let (mut t, _, mem) = transport();
        negotiate(&mut t, 1);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        w(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_setup_before_features_ok_is_ignored() {
        let (mut t, _, _) = transport();
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn writing_status_zero_resets_the_device() {
        let (mut t, rec, mem) = transport();
        negotiate(&mut t, 1);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::STATUS, ALL_OK);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert!(rec.lock().unwrap().resets >= 1);
    }

    #[test]
    fn notify_after_reset_is_ignored() {
        let (mut t, _, mem) = transport();
        negotiate(&mut t, 1);
        setup_queues(&mut t, &mem);
        w(&mut t, reg::STATUS, ALL_OK);
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(
            t.queue_evts[0].read().is_err(),
            "no notification may reach the device"
        );
    }

    #[test]
    fn wrong_width_register_access_is_harmless() {
        let (mut t, _, _) = transport();
        let mut d = [0xffu8; 2];
        t.read(reg::MAGIC, &mut d);
        assert_eq!(d, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn config_space_reads_past_the_end_as_zero() {
        let (mut t, _, _) = transport();
        let mut d = [0xffu8; 4];
        t.read(reg::CONFIG + 6, &mut d);
        assert_eq!(d, [7, 8, 0, 0]);
    }

    #[test]
    fn a_resumed_device_raises_again_what_the_driver_has_not_acknowledged() {
        for (unacknowledged, raised) in [(crate::devices::virtio::INT_USED_RING, true), (0, false)]
        {
            let (mut t, rec, mem) = transport();
            negotiate(&mut t, 1);
            setup_queues(&mut t, &mem);
            w(&mut t, reg::STATUS, ALL_OK);
            let mut state = t.state();
            state.interrupt_status = unacknowledged;
            t.restore(&state).unwrap();
            let irq = t.interrupt.clone();
            let line = irq.eventfd();
            let _ = line.read();
            t.resume_device();
            assert_eq!(rec.lock().unwrap().activations, 2);
            assert_eq!(line.read().is_ok(), raised, "status {unacknowledged}");
            assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), unacknowledged);
        }
    }

    #[test]
    fn clearing_status_bits_without_reset_is_ignored() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, 1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }
}
