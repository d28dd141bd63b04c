//! virtio-rng (device id 4): one queue of device-writable buffers, filled from the host's
//! entropy source (`/dev/urandom`, opened once at start-up so the jailed VMM needs no path).
//! A request is served at most [`MAX_PER_REQUEST`] bytes, whatever length the guest claims.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::{Queue, Writer};
use vm_memory::GuestMemoryMmap;

use super::queue_worker::{DeviceThread, run_queue_loop, serve_chains};
use super::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::devices::metrics::{DeviceMetrics, add, render};
use crate::guest_warn;
use crate::seccomp::Role;
use std::sync::atomic::AtomicU64;

/// virtio device id of the entropy device.
pub const DEVICE_ID: u32 = 4;
/// Most bytes handed out per request.
pub const MAX_PER_REQUEST: usize = 64 * 1024;
const QUEUE_SIZES: [u16; 1] = [256];

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    thread: DeviceThread,
    metrics: Arc<RngMetrics>,
}

/// Counters of the entropy device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes of entropy handed to the guest.
    pub bytes: AtomicU64,
}

impl DeviceMetrics for RngMetrics {
    fn json(&self) -> String {
        render(&[("requests", &self.requests), ("bytes", &self.bytes)])
    }
}

impl Rng {
    /// Opens the host entropy source and starts the device thread (confined when `seccomp`).
    pub fn new(seccomp: bool) -> std::io::Result<Self> {
        Self::with_source(File::open("/dev/urandom")?, seccomp)
    }

    /// Uses `source` as the entropy source.
    pub fn with_source(source: File, seccomp: bool) -> std::io::Result<Self> {
        let source = Arc::new(source);
        let metrics = Arc::new(RngMetrics::default());
        let m = metrics.clone();
        let thread = DeviceThread::spawn("rng", seccomp.then_some(Role::Rng), move |act, kill| {
            let Activation {
                mem,
                mut queues,
                queue_evts,
                interrupt,
                ..
            } = act;
            let Some(queue) = queues.first_mut() else {
                return queues;
            };
            let mut broken = false;
            let result = run_queue_loop(&queue_evts, kill, |_| {
                if !broken {
                    broken = !process(&mem, queue, &source, &interrupt, &m);
                }
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "rng device loop failed");
                interrupt.signal_needs_reset();
            }
            queues
        })?;
        Ok(Self { thread, metrics })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

/// Serves every pending request on `queue`; returns false if the device must be reset.
pub fn process(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut source: &File,
    interrupt: &Interrupt,
    metrics: &RngMetrics,
) -> bool {
    let mut scratch = [0u8; 4096];
    serve_chains(mem, queue, interrupt, |chain| {
        match Writer::<()>::new(mem, chain) {
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
                add(&metrics.requests, 1);
                add(&metrics.bytes, w.bytes_written() as u64);
                u32::try_from(w.bytes_written()).unwrap_or(0)
            }
            Err(_) => {
                guest_warn!("rng request outside guest memory");
                0
            }
        }
    })
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
        if act.queues.len() != 1 {
            return Err(ActivateError::QueueCount(act.queues.len()));
        }
        self.thread.activate(act)
    }

    fn reset(&mut self) {
        self.thread.reset();
    }

    fn pause(&mut self) -> Option<Vec<Queue>> {
        self.thread.pause()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
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
        assert!(process(&mem, &mut q, &src, &irq, &RngMetrics::default()));
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
        assert!(process(&mem, &mut q, &src, &irq, &RngMetrics::default()));
        assert_eq!(dq.take_used(&mem), vec![(0, MAX_PER_REQUEST as u32)]);
    }

    #[test]
    fn request_outside_memory_is_returned_empty() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x7fff_0000_0000, 64, true)]);
        let src = File::open("/dev/urandom").unwrap();
        assert!(process(&mem, &mut q, &src, &irq, &RngMetrics::default()));
        assert_eq!(dq.take_used(&mem), vec![(0, 0)]);
    }

    #[test]
    fn device_readable_buffers_get_nothing() {
        let (mem, mut dq, mut q, irq) = setup();
        dq.add_chain(&mem, &[(0x10_0000, 64, false)]);
        let src = File::open("/dev/urandom").unwrap();
        assert!(process(&mem, &mut q, &src, &irq, &RngMetrics::default()));
        assert_eq!(dq.take_used(&mem), vec![(0, 0)]);
    }
}
