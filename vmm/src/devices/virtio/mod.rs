//! virtio 1.x over MMIO: the transport ([`mmio`]) and the device models behind it.
//!
//! A device is split in two. The transport runs on vCPU threads (register reads and writes,
//! queue setup, status); on DRIVER_OK it hands the configured queues, their notification
//! eventfds and the interrupt to the device's `activate`, which moves them to a worker thread
//! that owns them from then on. A reset (status 0) stops the worker and takes them back. The
//! only state both sides share is the interrupt status word and the needs-reset flag.

pub mod block;
pub mod mmio;
pub mod queue_worker;
pub mod rng;
pub mod vsock;

/// The driver simulator: unit tests, benchmarks and fuzz targets (feature `test-utils`).
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device is virtio 1.x (not legacy).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
/// Configuration changed (also used to announce DEVICE_NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line plus the status word the transport exposes.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    needs_reset: Arc<AtomicBool>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt raised through `evt` (an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            evt: Arc::new(evt),
        }
    }

    /// Tells the guest there are new used buffers.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Marks the device as needing reset (a guest-caused error) and tells the guest.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            crate::guest_warn!("cannot raise interrupt: {e}");
        }
    }

    /// The interrupt status word.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether the device asked to be reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Sets the status word and needs-reset flag from a snapshot.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Raises the line again if the status word holds something the driver has not
    /// acknowledged. A device resumed after a snapshot does this: KVM injects an irqfd's
    /// interrupt into the IOAPIC from a kernel worker, after the write that raised it, so
    /// one raised just before the device stopped may be in neither the saved irqchip nor
    /// the saved local APIC. Raised twice, the driver reads the status word once and finds
    /// nothing the second time: a spurious interrupt, which it ignores.
    pub fn raise_pending(&self) {
        if self.status() != 0
            && let Err(e) = self.evt.write(1)
        {
            crate::guest_warn!("cannot raise interrupt: {e}");
        }
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// The eventfd behind the line (for tests that watch it).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The queues, configured and validated by the transport.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (clones of the transport's), written when the
    /// driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Interrupt,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queues were running before (a restored snapshot, or a machine resumed after one):
    /// the device tells the guest what it could not keep (vsock: its host connections).
    pub restored: bool,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("wrong number of queues: {0}")]
    QueueCount(usize),
    /// The device's backend could not start.
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device id (vsock 19, block 2, rng 4).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VERSION_1 included).
    fn device_features(&self) -> u64;
    /// Reads device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (ignored unless the device has writable config).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with its queues.
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError>;
    /// Stops the device and drops everything `activate` gave it.
    fn reset(&mut self);
    /// Stops the device and hands back its queues as it left them, for a snapshot; `None`
    /// when it was not running. The transport activates it again (`restored`) to resume.
    fn pause(&mut self) -> Option<Vec<Queue>>;
}

/// Copies `src` (little-endian config bytes) at `offset` into `data`; out of range reads as 0.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(bytes) = src.get(start..) {
        for (d, s) in data.iter_mut().zip(bytes) {
            *d = *s;
        }
    }
}
