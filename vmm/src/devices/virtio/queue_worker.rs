//! The device thread shared by single-purpose devices (rng, block): it waits on the queue
//! notification eventfds and a kill eventfd, and calls the device's handler for each notified
//! queue. The handler owns the queues; a guest-caused error inside it marks the device as
//! needing reset, never anything worse.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const TOKEN_KILL: u64 = u64::MAX;

/// A running device thread.
#[derive(Debug)]
pub struct QueueWorker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// Starts thread `name`, calling `on_notify(queue_index)` whenever queue `i` is notified
    /// (and once per queue at start, in case the driver notified before we listened).
    pub fn spawn(
        name: &str,
        evts: Vec<EventFd>,
        mut on_notify: impl FnMut(usize) + Send + 'static,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KILL),
        )?;
        for (i, e) in (0u64..).zip(evts.iter()) {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i),
            )?;
        }
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for i in 0..evts.len() {
                    on_notify(i);
                }
                let mut events = [EpollEvent::default(); 8];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "device epoll failed");
                            return;
                        }
                    };
                    for ev in events.iter().take(n) {
                        let token = ev.data();
                        if token == TOKEN_KILL {
                            return;
                        }
                        let Ok(i) = usize::try_from(token) else {
                            continue;
                        };
                        if let Some(e) = evts.get(i) {
                            let _ = e.read();
                            on_notify(i);
                        }
                    }
                }
            })?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.kill.write(1);
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("device thread panicked");
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
