//! virtio-vsock in user space (device id 19), bridged to host Unix sockets.
//!
//! - `packet`: the wire header and the one-time copy of TX chains out of guest memory.
//! - `muxer`: connections, the Unix-socket convention, credit flow control.
//! - `worker`: the device thread's epoll loop and queue processing.
//!
//! The listener on `<uds>` is bound when the VMM starts, so host clients may connect before the
//! guest driver is up; it survives device resets (each activation gets a duplicate of it).

pub mod metrics;
pub mod muxer;
pub mod packet;
pub mod worker;

#[cfg(test)]
mod tests;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::queue_worker::DeviceThread;
use super::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::config::GuestCid;
use crate::seccomp::Role;

/// virtio device id of vsock.
pub const DEVICE_ID: u32 = 19;
/// Queue size offered for each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something that is not a socket is in the way of the listener.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    PathInUse(PathBuf),
    /// The device thread could not start.
    #[error("cannot start the vsock device thread")]
    Thread(#[source] std::io::Error),
    /// The listener could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: GuestCid,
    uds: PathBuf,
    thread: DeviceThread,
    metrics: Arc<metrics::VsockMetrics>,
}

impl Vsock {
    /// Binds `uds` and starts the device.
    pub fn new(cid: GuestCid, uds: &Path, seccomp: bool) -> Result<Self, Error> {
        let listener = bind(uds)?;
        Self::with_listener(cid, listener, uds, seccomp)
    }

    /// Starts the device on a listener bound earlier; guest connections to port P go to
    /// `<uds>_P`, where `uds` is the socket's path as this process sees it (inside the jail).
    pub fn with_listener(
        cid: GuestCid,
        listener: UnixListener,
        uds: &Path,
        seccomp: bool,
    ) -> Result<Self, Error> {
        let path = uds.to_owned();
        let guest_cid = cid.get();
        let metrics = Arc::new(metrics::VsockMetrics::default());
        let m = metrics.clone();
        let thread =
            DeviceThread::spawn("vsock", seccomp.then_some(Role::Vsock), move |act, kill| {
                let interrupt = act.interrupt.clone();
                match run(act, kill, &listener, guest_cid, &path, &m) {
                    Ok(queues) => queues,
                    Err((queues, e)) => {
                        tracing::error!(error = %e, "vsock device failed to start");
                        interrupt.signal_needs_reset();
                        queues
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            cid,
            uds: uds.to_owned(),
            thread,
            metrics,
        })
    }
}

/// Binds the host listener on `uds`, replacing a stale socket there, never another kind of file.
pub fn bind(uds: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(uds) {
        if !meta.file_type().is_socket() {
            return Err(Error::PathInUse(uds.to_owned()));
        }
        let _ = std::fs::remove_file(uds);
    }
    UnixListener::bind(uds).map_err(|source| Error::Bind {
        path: uds.to_owned(),
        source,
    })
}

/// One activation of the device, on its thread; hands back the queues (also when it could
/// not start).
fn run(
    act: Activation,
    kill: &EventFd,
    listener: &UnixListener,
    guest_cid: u64,
    uds: &Path,
    metrics: &Arc<metrics::VsockMetrics>,
) -> Result<Vec<Queue>, (Vec<Queue>, std::io::Error)> {
    let Activation {
        mem,
        queues,
        queue_evts,
        interrupt,
        restored,
        ..
    } = act;
    let parts = (|| {
        let mut muxer = muxer::Muxer::new(guest_cid, uds, listener.try_clone()?, Epoll::new()?)?;
        muxer.set_metrics(metrics.clone());
        Ok::<_, std::io::Error>((muxer, kill.try_clone()?))
    })();
    let (muxer, kill) = match parts {
        Ok(p) => p,
        Err(e) => return Err((queues, e)),
    };
    let mut worker = worker::Worker::new(mem, queues, queue_evts, kill, interrupt, muxer)?;
    if restored {
        // Every host connection the guest had is gone (this activation's muxer is new): say
        // so, and Linux's driver resets its connected sockets (Firecracker does the same).
        worker.send_transport_reset();
    }
    Ok(worker.run())
}

impl Vsock {
    /// The device's counters.
    pub fn metrics(&self) -> Arc<metrics::VsockMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.get().to_le_bytes(), offset, data);
    }

    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        if act.queues.len() != 3 {
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

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds);
    }
}
