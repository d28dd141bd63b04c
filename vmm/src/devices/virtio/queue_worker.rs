//! Device threads.
//!
//! Each device owns one thread; each activation runs on its own event-manager
//! [`EventManager`] (an epoll set dispatching to a `MutEventSubscriber`). The thread is
//! created with the device at start-up (so before any seccomp filter exists to be inherited). The thread installs its role's filter first, then waits for
//! activations; each activation runs until the transport resets the device (the kill eventfd),
//! and the thread reports back before the transport touches the queues again.

use std::sync::mpsc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateError, Activation, Interrupt};
use crate::seccomp::{self, Role};

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
    done: mpsc::Receiver<Vec<Queue>>,
    kill: EventFd,
    active: bool,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts thread `name`. It installs `role`'s seccomp filter (when `Some`), then calls
    /// `run(activation, kill)` for each activation; `run` must return once `kill` is readable,
    /// handing back the queues as it left them (a snapshot saves their positions).
    pub fn spawn(
        name: &str,
        role: Option<Role>,
        mut run: impl FnMut(Activation, &EventFd) -> Vec<Queue> + Send + 'static,
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
                    let queues = run(act, &thread_kill);
                    let _ = thread_kill.read();
                    if done_tx.send(queues).is_err() {
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
        let _ = self.pause();
    }

    /// Stops the running activation and returns its queues as the device left them (every
    /// chain it took is back in the used ring); `None` when it was not running.
    pub fn pause(&mut self) -> Option<Vec<Queue>> {
        if !self.active {
            return None;
        }
        self.active = false;
        let _ = self.kill.write(1);
        self.done.recv().ok()
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

/// Turns an event-manager error into the I/O error device threads report.
pub fn event_error(e: event_manager::Error) -> std::io::Error {
    match e {
        event_manager::Error::Epoll(errno) => std::io::Error::from_raw_os_error(errno.errno()),
        other => std::io::Error::other(other.to_string()),
    }
}

/// Event data of the kill eventfd; queue eventfds carry their queue index.
const DATA_KILL: u32 = u32::MAX;

/// The event subscriber of a single-purpose device: its queue eventfds and the kill eventfd.
struct QueueEvents<'a, F> {
    evts: &'a [EventFd],
    kill: &'a EventFd,
    on_notify: F,
    killed: bool,
    init_error: Option<event_manager::Error>,
}

impl<F: FnMut(usize)> MutEventSubscriber for QueueEvents<'_, F> {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let mut add = |ev| {
            if let Err(e) = ops.add(ev) {
                self.init_error.get_or_insert(e);
            }
        };
        add(Events::with_data(self.kill, DATA_KILL, EventSet::IN));
        for (i, e) in (0u32..).zip(self.evts) {
            add(Events::with_data(e, i, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        let data = events.data();
        if data == DATA_KILL {
            self.killed = true;
            return;
        }
        let Ok(i) = usize::try_from(data) else { return };
        if let Some(e) = self.evts.get(i) {
            let _ = e.read();
            (self.on_notify)(i);
        }
    }
}

/// The loop of a single-purpose device, on an [`EventManager`]: calls `on_notify(i)` for each
/// notified queue `i` (and once per queue at start, for notifications sent before we
/// listened) until `kill` fires.
pub fn run_queue_loop(
    evts: &[EventFd],
    kill: &EventFd,
    on_notify: impl FnMut(usize),
) -> std::io::Result<()> {
    let mut em = EventManager::new_with_capacity(evts.len() + 1).map_err(event_error)?;
    let id = em.add_subscriber(QueueEvents {
        evts,
        kill,
        on_notify,
        killed: false,
        init_error: None,
    });
    {
        let sub = em.subscriber_mut(id).map_err(event_error)?;
        if let Some(e) = sub.init_error.take() {
            return Err(event_error(e));
        }
        for i in 0..evts.len() {
            (sub.on_notify)(i);
        }
    }
    loop {
        em.run().map_err(event_error)?;
        if em.subscriber_mut(id).map_err(event_error)?.killed {
            return Ok(());
        }
    }
}
