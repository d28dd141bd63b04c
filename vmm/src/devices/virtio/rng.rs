//! virtio-rng (device id 4): one queue of device-writable buffers, filled from the host's
//! entropy source (`/dev/urandom`, opened once at start-up so the jailed VMM needs no path).
//! A request is served at most [`MAX_PER_REQUEST`] bytes, whatever length the guest claims.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;

use super::queue_worker::QueueWorker;
use super::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::guest_warn;

/// virtio device id of the entropy device.
pub const DEVICE_ID: u32 = 4;
/// Most bytes handed out per request.
pub const MAX_PER_REQUEST: usize = 64 * 1024;
const QUEUE_SIZES: [u16; 1] = [256];

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    source: Arc<File>,
    worker: Option<QueueWorker>,
}

impl Rng {
    /// Opens the host entropy source.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self::with_source(File::open("/dev/urandom")?))
    }

    /// Uses `source` as the entropy source (tests).
    pub fn with_source(source: File) -> Self {
        Self {
            source: Arc::new(source),
            worker: None,
        }
    }
}

/// Serves every pending request on `queue`; returns false if the device must be reset.
pub fn process(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut source: &File,
    interrupt: &Interrupt,
) -> bool {
    let mut scratch = [0u8; 4096];
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = match Writer::<()>::new(mem, chain) {
            Ok(mut w) => {
                let mut left = w.available_bytes().min(MAX_PER_REQUEST);
                while left > 0 {
                    let n = left.min(scratch.len());
                    let Some(buf) = scratch.get_mut(..n) else {
                        break;
                    };
                    if source.read_exact(buf).is_err() || w.write_all(buf).is_err() {
                        break;
                    }
                    left -= n;
                }
                u32::try_from(w.bytes_written()).unwrap_or(0)
            }
            Err(_) => {
                guest_warn!("rng request outside guest memory");
                0
            }
        };
        if queue.add_used(mem, head, written).is_err() {
            interrupt.signal_needs_reset();
            return false;
        }
        used = true;
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            queue_evts,
            interrupt,
            ..
        } = act;
        let Some(mut queue) = queues.pop().filter(|_| queues.is_empty()) else {
            return Err(ActivateError::QueueCount(queues.len() + 1));
        };
        self.reset();
        let source = self.source.clone();
        let mut broken = false;
        let worker = QueueWorker::spawn("rng", queue_evts, move |_| {
            if !broken {
                broken = !process(&mem, &mut queue, &source, &interrupt);
            }
        })
        .map_err(ActivateError::Backend)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::cast_possible_truncation
    )]
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::devices::virtio::testing::{DriverQueue, memory};

    fn setup() -> (Arc<GuestMemoryMmap>, DriverQueue, Queue, Interrupt) {
        let mem = memory(4);
        let dq = DriverQueue::new(0x1000, 16);
        let q = dq.device_queue(&mem);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        (mem, dq, q, irq)
    }

    #[test]
    fn request_is_filled_with_entropy() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x10_0000, 64, true)]);
        let src = File::open("/dev/urandom").unwrap();
        assert!(process(&mem, &mut q, &src, &irq));
        assert_eq!(dq.take_used(&mem), vec![(0, 64)]);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_ne!(buf, [0u8; 64]);
        assert_eq!(irq.status() & crate::devices::virtio::INT_USED_RING, 1);
    }

    #[test]
    fn huge_request_is_capped() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x10_0000, 2 << 20, true)]);
        let src = File::open("/dev/zero").unwrap();
        assert!(process(&mem, &mut q, &src, &irq));
        assert_eq!(dq.take_used(&mem), vec![(0, MAX_PER_REQUEST as u32)]);
    }

    #[test]
    fn request_outside_memory_is_returned_empty() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x7fff_0000_0000, 64, true)]);
        let src = File::open("/dev/urandom").unwrap();
        assert!(process(&mem, &mut q, &src, &irq));
        assert_eq!(dq.take_used(&mem), vec![(0, 0)]);
    }

    #[test]
    fn device_readable_buffers_get_nothing() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x10_0000, 64, false)]);
        let src = File::open("/dev/urandom").unwrap();
        assert!(process(&mem, &mut q, &src, &irq));
        assert_eq!(dq.take_used(&mem), vec![(0, 0)]);
    }
}
