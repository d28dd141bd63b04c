//! The vsock device thread's event loop: an event-manager [`EventManager`] whose one
//! subscriber (`Handler`) owns the queues and the muxer from activation until reset. It
//! watches the kill eventfd, the three queue eventfds and the muxer's own epoll set (the
//! listener and every host stream, which come and go with connections), as Firecracker's vsock
//! device nests its muxer's epoll. After each turn the handler moves packets: expired
//! connections, then TX, then RX.

use std::cell::{Ref, RefCell};
use std::num::Wrapping;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Fill, Muxer, TOKEN_FD_BASE, TOKEN_LISTENER};
use super::packet::{RxBuffer, read_tx};
use crate::devices::virtio::Interrupt;
use crate::devices::virtio::queue_worker::event_error;
use crate::guest_warn;

/// Queue indexes.
pub const RXQ: usize = 0;
/// Transmit queue.
pub const TXQ: usize = 1;
/// Event queue.
pub const EVQ: usize = 2;

/// `struct virtio_vsock_event`'s id: the transport was reset (virtio 1.2, 5.10.6.5).
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Event data of each source the event manager watches.
const DATA_KILL: u32 = 0;
const DATA_RXQ: u32 = 1;
const DATA_TXQ: u32 = 2;
const DATA_EVQ: u32 = 3;
const DATA_MUXER: u32 = 4;

/// Most muxer events (host sockets) taken per wake-up; more stay pending in its epoll.
const MUXER_EVENTS: usize = 64;

/// Most RX buffers filled per loop turn before other events get a look.
const RX_BUDGET: usize = 256;

/// The event loop of one activation.
#[derive(Debug)]
pub struct Worker {
    em: EventManager<Rc<RefCell<Handler>>>,
    handler: Rc<RefCell<Handler>>,
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The transport reset the device.
    Killed,
}

impl Worker {
    /// Builds the handler and registers its event sources with a fresh event manager; on
    /// failure the queues come back with the error.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        mut queues: Vec<Queue>,
        evts: Vec<EventFd>,
        kill: EventFd,
        interrupt: Interrupt,
        muxer: Muxer,
    ) -> Result<Self, (Vec<Queue>, std::io::Error)> {
        if queues.len() != 3 || evts.len() != 3 {
            return Err((queues, std::io::ErrorKind::InvalidInput.into()));
        }
        let evq = queues.remove(EVQ);
        let txq = queues.remove(TXQ);
        let rxq = queues.remove(RXQ);
        let handler = Rc::new(RefCell::new(Handler {
            mem,
            rxq,
            txq,
            evq,
            evts,
            kill,
            interrupt,
            muxer,
            broken: false,
            rx_more: false,
            killed: false,
            init_error: None,
        }));
        let mut em = match EventManager::new_with_capacity(8) {
            Ok(em) => em,
            Err(e) => return Err((Handler::into_queues(handler), event_error(e))),
        };
        em.add_subscriber(handler.clone());
        let init_error = handler.borrow_mut().init_error.take();
        if let Some(e) = init_error {
            drop(em);
            return Err((Handler::into_queues(handler), event_error(e)));
        }
        Ok(Self { em, handler })
    }

    /// Puts a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue and interrupts the guest.
    pub fn send_transport_reset(&mut self) {
        self.handler.borrow_mut().send_transport_reset();
    }

    /// The muxer (for tests and metrics).
    pub fn muxer(&self) -> Ref<'_, Muxer> {
        Ref::map(self.handler.borrow(), |h| &h.muxer)
    }

    /// Runs until killed; hands back the queues (RX, TX, event) as they were left.
    pub fn run(mut self) -> Vec<Queue> {
        loop {
            let timeout = self.handler.borrow().timeout_ms();
            if self.turn(timeout).is_some() {
                let Self { em, handler } = self;
                drop(em);
                return Handler::into_queues(handler);
            }
        }
    }

    /// One turn of the loop: wait up to `timeout_ms` for events, dispatch them, move packets.
    pub fn turn(&mut self, timeout_ms: i32) -> Option<Stop> {
        if let Err(e) = self.em.run_with_timeout(timeout_ms) {
            tracing::error!(error = %event_error(e), "vsock event loop failed");
            return Some(Stop::Killed);
        }
        let mut h = self.handler.borrow_mut();
        if h.killed {
            return Some(Stop::Killed);
        }
        h.muxer.expire(Instant::now());
        h.process_tx();
        h.rx_more = h.process_rx();
        None
    }

    /// Moves every packet the guest queued on TX into the muxer.
    pub fn process_tx(&mut self) {
        self.handler.borrow_mut().process_tx();
    }

    /// Fills RX buffers; returns whether it stopped on its budget with work left.
    pub fn process_rx(&mut self) -> bool {
        self.handler.borrow_mut().process_rx()
    }
}

/// The device's running state: the event manager's subscriber.
#[derive(Debug)]
struct Handler {
    mem: Arc<GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    evts: Vec<EventFd>,
    kill: EventFd,
    interrupt: Interrupt,
    muxer: Muxer,
    broken: bool,
    rx_more: bool,
    killed: bool,
    init_error: Option<event_manager::Error>,
}

impl MutEventSubscriber for Handler {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let mut sources = vec![Events::with_data(&self.kill, DATA_KILL, EventSet::IN)];
        for (e, data) in self.evts.iter().zip([DATA_RXQ, DATA_TXQ, DATA_EVQ]) {
            sources.push(Events::with_data(e, data, EventSet::IN));
        }
        sources.push(Events::with_data(
            self.muxer.epoll(),
            DATA_MUXER,
            EventSet::IN,
        ));
        for ev in sources {
            if let Err(e) = ops.add(ev) {
                self.init_error.get_or_insert(e);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        match events.data() {
            DATA_KILL => self.killed = true,
            d @ (DATA_RXQ | DATA_TXQ | DATA_EVQ) => {
                let i = usize::try_from(d - DATA_RXQ).unwrap_or(0);
                if let Some(e) = self.evts.get(i) {
                    let _ = e.read();
                }
            }
            DATA_MUXER => self.muxer_events(),
            _ => {}
        }
    }
}

impl Handler {
    /// The queues, in device order, once the event manager (the handler's other owner) is
    /// gone; none if it somehow is not.
    fn into_queues(handler: Rc<RefCell<Handler>>) -> Vec<Queue> {
        match Rc::try_unwrap(handler) {
            Ok(h) => {
                let h = h.into_inner();
                vec![h.rxq, h.txq, h.evq]
            }
            Err(_) => Vec::new(),
        }
    }

    /// See [`Worker::send_transport_reset`].
    fn send_transport_reset(&mut self) {
        let mem = self.mem.clone();
        let Some(chain) = self.evq.pop_descriptor_chain(mem.as_ref()) else {
            guest_warn!("vsock event queue has no buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let written = match virtio_queue::Writer::<()>::new(mem.as_ref(), chain) {
            Ok(mut w) => {
                use std::io::Write;
                match w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    Ok(()) => 4,
                    Err(_) => 0,
                }
            }
            Err(_) => 0,
        };
        if self.evq.add_used(mem.as_ref(), head, written).is_err() {
            self.break_device("cannot write the event queue's used ring");
            return;
        }
        self.interrupt.signal_used();
    }

    /// How long the next turn may sleep: not at all while RX work is left over, else until the
    /// muxer's next deadline (or forever).
    fn timeout_ms(&self) -> i32 {
        if self.rx_more {
            return 0;
        }
        self.muxer.next_deadline().map_or(-1, |d| {
            let ms = d.saturating_duration_since(Instant::now()).as_millis();
            i32::try_from(ms).unwrap_or(i32::MAX).saturating_add(1)
        })
    }

    /// Takes what is ready in the muxer's epoll set: the listener, host streams.
    fn muxer_events(&mut self) {
        let mut events = [EpollEvent::default(); MUXER_EVENTS];
        let n = match self.muxer.epoll().wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::error!(error = %e, "vsock muxer epoll failed");
                0
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                TOKEN_LISTENER => self.muxer.accept(),
                t if t >= TOKEN_FD_BASE => self.muxer.stream_event(t, ev.event_set()),
                _ => {}
            }
        }
    }

    /// Whether `q`'s available index is believable: never more than `size` ahead of us.
    fn queue_sane(&mut self, which: usize) -> bool {
        let mem = self.mem.as_ref();
        let q = if which == RXQ { &self.rxq } else { &self.txq };
        let Ok(avail) = q.avail_idx(mem, Ordering::Acquire) else {
            return false;
        };
        (avail - Wrapping(q.next_avail())).0 <= q.size()
    }

    fn break_device(&mut self, why: &str) {
        guest_warn!("vsock device needs reset: {why}");
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }

    /// Moves every packet the guest queued on TX into the muxer.
    pub fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        if !self.queue_sane(TXQ) {
            self.break_device("TX available index ran ahead of the queue size");
            return;
        }
        let mem = self.mem.clone();
        let mut used = false;
        while let Some(chain) = self.txq.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            match read_tx(&mem, chain) {
                Ok(pkt) => self.muxer.handle_tx(pkt),
                Err((hdr, e)) => {
                    guest_warn!(error = %e, "bad vsock TX packet");
                    self.muxer.handle_bad_packet(hdr);
                }
            }
            if self.txq.add_used(mem.as_ref(), head, 0).is_err() {
                self.break_device("cannot write the TX used ring");
                return;
            }
            used = true;
        }
        if used {
            self.notify(TXQ);
        }
    }

    /// Fills RX buffers; returns whether it stopped on its budget with work left.
    pub fn process_rx(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if !self.queue_sane(RXQ) {
            self.break_device("RX available index ran ahead of the queue size");
            return false;
        }
        let mem = self.mem.clone();
        let mut used = false;
        let mut budget = RX_BUDGET;
        let mut more = false;
        while self.muxer.has_rx_work() {
            if budget == 0 {
                more = true;
                break;
            }
            budget -= 1;
            let Some(chain) = self.rxq.pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            let head = chain.head_index();
            let written = match RxBuffer::new(&mem, chain) {
                Some(buf) => match self.muxer.fill_rx(buf) {
                    Fill::Written(n) => n,
                    Fill::Nothing => {
                        self.rxq.go_to_previous_position();
                        continue;
                    }
                    Fill::TooSmall => {
                        self.rxq.go_to_previous_position();
                        self.break_device("RX buffer has no room for data");
                        return false;
                    }
                },
                None => {
                    guest_warn!("vsock RX buffer invalid or smaller than a header; skipped");
                    0
                }
            };
            if self.rxq.add_used(mem.as_ref(), head, written).is_err() {
                self.break_device("cannot write the RX used ring");
                return false;
            }
            used = true;
        }
        if used {
            self.notify(RXQ);
        }
        more
    }

    fn notify(&mut self, which: usize) {
        let mem = self.mem.as_ref();
        let q = if which == RXQ {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        if q.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }
}
