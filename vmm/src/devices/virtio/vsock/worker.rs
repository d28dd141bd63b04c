//! The vsock device thread: one epoll loop over the queue notifications, the listener and every
//! host stream; it owns the queues and the muxer from activation until reset.

use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Fill, Muxer, TOKEN_FD_BASE, TOKEN_LISTENER};
use super::packet::{RxBuffer, read_tx};
use crate::devices::virtio::Interrupt;
use crate::guest_warn;

/// Queue indexes.
pub const RXQ: usize = 0;
/// Transmit queue.
pub const TXQ: usize = 1;
/// Event queue.
pub const EVQ: usize = 2;

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_EVQ: u64 = 3;

/// Most RX buffers filled per loop turn before other events get a look.
const RX_BUDGET: usize = 256;

/// The device's running state.
#[derive(Debug)]
pub struct Worker {
    mem: Arc<GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    evts: Vec<EventFd>,
    // Held so the fd registered in epoll stays open for the worker's life.
    _kill: EventFd,
    interrupt: Interrupt,
    muxer: Muxer,
    broken: bool,
    rx_more: bool,
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The transport reset the device.
    Killed,
}

impl Worker {
    /// Builds the worker and registers its eventfds in the muxer's epoll.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        mut queues: Vec<Queue>,
        evts: Vec<EventFd>,
        kill: EventFd,
        interrupt: Interrupt,
        muxer: Muxer,
    ) -> std::io::Result<Self> {
        if queues.len() != 3 || evts.len() != 3 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        let txq = queues.remove(TXQ);
        let rxq = queues.remove(RXQ);
        let ep = muxer.epoll();
        ep.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&kill),
            EpollEvent::new(EventSet::IN, TOKEN_KILL),
        )?;
        for (e, token) in evts.iter().zip([TOKEN_RXQ, TOKEN_TXQ, TOKEN_EVQ]) {
            ep.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(e),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            mem,
            rxq,
            txq,
            evts,
            _kill: kill,
            interrupt,
            muxer,
            broken: false,
            rx_more: false,
        })
    }

    /// The muxer (for tests and metrics).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Runs until killed.
    pub fn run(mut self) -> Stop {
        loop {
            let timeout = if self.rx_more {
                0
            } else {
                self.muxer.next_deadline().map_or(-1, |d| {
                    let ms = d.saturating_duration_since(Instant::now()).as_millis();
                    i32::try_from(ms).unwrap_or(i32::MAX).saturating_add(1)
                })
            };
            if let Some(stop) = self.turn(timeout) {
                return stop;
            }
        }
    }

    /// One turn of the loop: wait up to `timeout_ms` for events, handle them, move packets.
    pub fn turn(&mut self, timeout_ms: i32) -> Option<Stop> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.muxer.epoll().wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::error!(error = %e, "vsock epoll failed");
                return Some(Stop::Killed);
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                TOKEN_KILL => return Some(Stop::Killed),
                t @ (TOKEN_RXQ | TOKEN_TXQ | TOKEN_EVQ) => {
                    let i = usize::try_from(t - TOKEN_RXQ).unwrap_or(0);
                    if let Some(e) = self.evts.get(i) {
                        let _ = e.read();
                    }
                }
                TOKEN_LISTENER => self.muxer.accept(),
                t if t >= TOKEN_FD_BASE => self.muxer.stream_event(t, ev.event_set()),
                _ => {}
            }
        }
        self.muxer.expire(Instant::now());
        self.process_tx();
        self.rx_more = self.process_rx();
        None
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
