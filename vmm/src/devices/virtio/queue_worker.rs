//! Device threads.
//!
//! Each device owns one thread, created with the device at start-up (so before any seccomp
//! filter exists to be inherited). The thread installs its role's filter first, then waits for
//! activations; each activation runs until the transport resets the device (the kill eventfd),
//! and the thread reports back before the transport touches the queues again.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateError, Activation, Interrupt};
use crate::seccomp::{self, Role};

const TOKEN_KILL: u64 = u64::MAX;

/// Serves every available descriptor chain of `queue` with `handle` (which returns how many
/// bytes it wrote into the chain), returns each chain to the used ring and signals the guest
/// once if it asked to be. Returns false if the device must be reset (a chain could not be
/// returned: the guest broke the ring).
pub fn serve_chains<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut handle: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = handle(chain);
        if queue.add_used(mem, head, len).is_err() {
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

/// A device's thread.
#[derive(Debug)]
pub struct DeviceThread {
    acts: Option<mpsc::Sender<Activation>>,
    done: mpsc::Receiver<()>,
    kill: EventFd,
    active: bool,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts thread `name`. It installs `role`'s seccomp filter (when `Some`), then calls
    /// `run(activation, kill)` for each activation; `run` must return once `kill` is readable.
    pub fn spawn(
        name: &str,
        role: Option<Role>,
        mut run: impl FnMut(Activation, &EventFd) + Send + 'static,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let (acts, acts_rx) = mpsc::channel::<Activation>();
        let (done_tx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Some(role) = role
                    && let Err(e) = seccomp::install(role)
                {
                    tracing::error!(error = %e, "device thread cannot confine itself; stopping");
                    return;
                }
                while let Ok(act) = acts_rx.recv() {
                    run(act, &thread_kill);
                    let _ = thread_kill.read();
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            acts: Some(acts),
            done,
            kill,
            active: false,
            handle: Some(handle),
        })
    }

    /// Hands an activation to the thread.
    pub fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        self.reset();
        let sent = self.acts.as_ref().map(|a| a.send(act));
        match sent {
            Some(Ok(())) => {
                self.active = true;
                Ok(())
            }
            _ => Err(ActivateError::Backend(std::io::Error::other(
                "device thread is not running",
            ))),
        }
    }

    /// Stops the running activation, if any, and waits until the thread has let go of it.
    pub fn reset(&mut self) {
        if self.active {
            self.active = false;
            let _ = self.kill.write(1);
            let _ = self.done.recv();
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.reset();
        self.acts = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The loop of a single-purpose device: calls `on_notify(i)` for each notified queue `i` (and
/// once per queue at start, for notifications sent before we listened) until `kill` fires.
pub fn run_queue_loop(
    evts: &[EventFd],
    kill: &EventFd,
    mut on_notify: impl FnMut(usize),
) -> std::io::Result<()> {
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
    for i in 0..evts.len() {
        on_notify(i);
    }
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in events.iter().take(n) {
            let token = ev.data();
            if token == TOKEN_KILL {
                return Ok(());
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
}
