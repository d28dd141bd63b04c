//! The serial console: a 16550 (vm-superio) on COM1 whose output goes to stdout or a file,
//! with a byte cap so a chatty or hostile guest cannot fill the host disk; and, for an
//! interactive console, its input: a thread that feeds the VMM's stdin into the receive FIFO.
//! With a control socket the input can also come later, from a descriptor handed over it
//! ([`InputSlot`]: a warm pool's machine takes the input of whoever claims it).
//!
//! Input flow control: the thread reads stdin only while it holds no bytes the FIFO refused.
//! When the FIFO (64 bytes) is full it stops watching stdin until the guest empties the FIFO,
//! which vm-superio reports through [`SerialEvents::in_buffer_empty`] ([`InputReady`], an
//! eventfd). So at most [`INPUT_CHUNK`] bytes of input wait in the VMM, whatever the guest does.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::virtio::queue_worker::event_error;
use crate::seccomp::{self, Role};

/// First COM1 port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 ports: 0x3f8..=0x3ff.
pub const COM1_LEN: u16 = 8;

/// An interrupt line: an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that keeps at most `cap` bytes and then drops the rest (once saying so).
#[derive(Debug)]
pub struct CappedWriter<W: Write> {
    inner: W,
    left: u64,
    line: Vec<u8>,
    capped: bool,
}

impl<W: Write> CappedWriter<W> {
    /// Wraps `inner`, keeping at most `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            left: cap,
            line: Vec::with_capacity(256),
            capped: false,
        }
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if self.left == 0 {
                if !self.capped {
                    self.capped = true;
                    self.flush()?;
                    tracing::warn!("serial output reached its cap; dropping the rest");
                }
                break;
            }
            self.left -= 1;
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.write_all(&self.line)?;
        self.line.clear();
        self.inner.flush()
    }
}

/// Where console output goes.
pub type ConsoleOut = CappedWriter<Box<dyn Write + Send>>;

/// Opens the console sink: `path` (created or truncated) or stdout.
pub fn console_out(path: Option<&Path>, cap: u64) -> io::Result<ConsoleOut> {
    let sink: Box<dyn Write + Send> = match path {
        Some(p) => Box::new(File::create(p)?),
        None => Box::new(io::stdout()),
    };
    Ok(CappedWriter::new(sink, cap))
}

/// The COM1 device.
pub type SerialDevice = Serial<IrqLine, InputReady, ConsoleOut>;

/// Most stdin bytes read at once (and so held while the guest has not taken them).
pub const INPUT_CHUNK: usize = 256;

/// vm-superio's events of COM1: when the guest empties the receive FIFO, wake the input thread
/// (if there is one).
#[derive(Debug)]
pub struct InputReady(Option<EventFd>);

impl InputReady {
    /// No console input: nobody to wake.
    pub fn none() -> Self {
        Self(None)
    }
}

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            // Only fails if the counter would overflow: the thread is then awake anyway.
            let _ = evt.write(1);
        }
    }
}

/// COM1 with its events: `ready`, when console input is on, is written whenever the guest
/// empties the receive FIFO.
pub fn serial_device(
    irq: IrqLine,
    ready: Option<&EventFd>,
    out: ConsoleOut,
    state: Option<&crate::snapshot::SerialState>,
) -> io::Result<SerialDevice> {
    let events = match ready {
        Some(e) => InputReady(Some(e.try_clone()?)),
        None => InputReady::none(),
    };
    match state {
        Some(st) => Serial::from_state(&st.into(), irq, events, out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}"))),
        None => Ok(Serial::with_events(irq, events, out)),
    }
}

/// Console input handed over later (the control socket's `console-input`): the input thread
/// reads from it from then on, in place of what it read before.
#[derive(Debug)]
pub struct InputSlot {
    next: Mutex<Option<File>>,
    attached: EventFd,
}

impl InputSlot {
    /// An empty slot.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            next: Mutex::new(None),
            attached: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Console input comes from `input` from now on.
    pub fn attach(&self, input: File) -> io::Result<()> {
        *self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(input);
        self.attached.write(1)
    }

    fn take(&self) -> Option<File> {
        let _ = self.attached.read();
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Event data of the input thread's sources.
const DATA_INPUT: u32 = 0;
const DATA_READY: u32 = 1;
const DATA_ATTACHED: u32 = 2;

/// Feeds host input into COM1's receive FIFO, at the guest's pace.
struct ConsoleInput {
    /// Where input comes from; none until a descriptor is handed over.
    input: Option<File>,
    slot: Option<Arc<InputSlot>>,
    ready: EventFd,
    serial: Arc<Mutex<SerialDevice>>,
    pending: Vec<u8>,
    watching_input: bool,
    eof: bool,
    init_error: Option<event_manager::Error>,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let mut sources = vec![Events::with_data(&self.ready, DATA_READY, EventSet::IN)];
        if let Some(slot) = &self.slot {
            sources.push(Events::with_data(
                &slot.attached,
                DATA_ATTACHED,
                EventSet::IN,
            ));
        }
        if let Some(input) = &self.input {
            sources.push(Events::with_data(input, DATA_INPUT, EventSet::IN));
        }
        for ev in sources {
            if let Err(e) = ops.add(ev) {
                self.init_error.get_or_insert(e);
            }
        }
        self.watching_input = self.input.is_some() && self.init_error.is_none();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match events.data() {
            DATA_INPUT => self.read_input(),
            DATA_READY => {
                let _ = self.ready.read();
            }
            DATA_ATTACHED => self.switch_input(ops),
            _ => {}
        }
        self.push();
        self.watch(ops);
    }
}

impl ConsoleInput {
    /// Watches the input only while nothing waits for room in the FIFO.
    fn watch(&mut self, ops: &mut EventOps<'_>) {
        let Some(input) = &self.input else {
            return;
        };
        let want = self.pending.is_empty() && !self.eof;
        if want == self.watching_input {
            return;
        }
        let ev = Events::with_data(input, DATA_INPUT, EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_input = want,
            Err(e) => {
                tracing::warn!(error = %event_error(e), "console input: cannot (un)watch the input")
            }
        }
    }

    /// Takes the input handed over: the old one is no longer watched (and is closed).
    fn switch_input(&mut self, ops: &mut EventOps<'_>) {
        let Some(new) = self.slot.as_ref().and_then(|s| s.take()) else {
            return;
        };
        if let Some(old) = &self.input
            && self.watching_input
        {
            let _ = ops.remove(Events::with_data(old, DATA_INPUT, EventSet::IN));
        }
        self.watching_input = false;
        self.input = None;
        self.eof = false;
        // Watched at once: a descriptor epoll refuses (a regular file, /dev/null) is dropped
        // here rather than retried at every wake.
        match ops.add(Events::with_data(&new, DATA_INPUT, EventSet::IN)) {
            Ok(()) => {
                self.input = Some(new);
                self.watching_input = true;
            }
            Err(e) => tracing::warn!(
                error = %event_error(e),
                "console input: the descriptor handed over cannot be watched; no input"
            ),
        }
    }

    fn read_input(&mut self) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let mut buf = [0u8; INPUT_CHUNK];
        match input.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self
                .pending
                .extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, "console input failed; no more input");
                self.eof = true;
            }
        }
    }

    /// Moves pending bytes into the FIFO as far as it has room.
    fn push(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Ok(mut serial) = self.serial.lock() else {
            return;
        };
        if serial.fifo_capacity() == 0 {
            return;
        }
        match serial.enqueue_raw_bytes(&self.pending) {
            // Room, but nothing taken: the guest put the UART in loopback mode, where it
            // receives nothing from outside. A real UART drops such input too.
            Ok(0) => self.pending.clear(),
            Ok(n) => {
                self.pending.drain(..n.min(self.pending.len()));
            }
            Err(e) => {
                tracing::warn!("console input: cannot raise the COM1 interrupt: {e:?}");
                self.pending.clear();
            }
        }
    }
}

/// The console input thread, started before any seccomp filter exists (like device threads);
/// it installs the [`Role::SerialIn`] filter first. It reads `input` (stdin) if any, and then
/// whatever is handed over through `slot`, if any.
pub fn spawn_input_thread(
    input: Option<File>,
    slot: Option<Arc<InputSlot>>,
    ready: EventFd,
    serial: Arc<Mutex<SerialDevice>>,
    confine: bool,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".to_owned())
        .spawn(move || {
            if confine && let Err(e) = seccomp::install(Role::SerialIn) {
                tracing::error!(error = %e, "console input thread cannot confine itself; no input");
                return;
            }
            if let Err(e) = run_input(input, slot, ready, serial) {
                tracing::warn!(error = %e, "console input stopped");
            }
        })
        .map(drop)
}

fn run_input(
    input: Option<File>,
    slot: Option<Arc<InputSlot>>,
    ready: EventFd,
    serial: Arc<Mutex<SerialDevice>>,
) -> io::Result<()> {
    let mut em = EventManager::new_with_capacity(3).map_err(event_error)?;
    let id = em.add_subscriber(ConsoleInput {
        input,
        slot,
        ready,
        serial,
        pending: Vec::with_capacity(INPUT_CHUNK),
        watching_input: false,
        eof: false,
        init_error: None,
    });
    if let Some(e) = em
        .subscriber_mut(id)
        .map_err(event_error)?
        .init_error
        .take()
    {
        return Err(event_error(e));
    }
    loop {
        em.run().map_err(event_error)?;
    }
}

/// A new eventfd for [`InputReady`].
pub fn input_ready_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_writer_keeps_only_cap_bytes() {
        let mut w = CappedWriter::new(Vec::new(), 5);
        assert!(w.write_all(b"hello world\n").is_ok());
        assert!(w.flush().is_ok());
        assert_eq!(w.get_ref().as_slice(), b"hello");
    }

    /// COM1 with a pipe as console input: (the input state, the pipe's write end, COM1).
    fn console_rig() -> (ConsoleInput, std::io::PipeWriter, Arc<Mutex<SerialDevice>>) {
        let (r, w) = std::io::pipe().unwrap();
        let ready = input_ready_eventfd().unwrap();
        let irq = IrqLine(EventFd::new(EFD_NONBLOCK).unwrap());
        let out = CappedWriter::new(Box::new(io::sink()) as Box<dyn Write + Send>, 0);
        let serial = Arc::new(Mutex::new(
            serial_device(irq, Some(&ready), out, None).unwrap(),
        ));
        let input = ConsoleInput {
            input: Some(File::from(std::os::fd::OwnedFd::from(r))),
            slot: None,
            ready,
            serial: serial.clone(),
            pending: Vec::new(),
            watching_input: true,
            eof: false,
            init_error: None,
        };
        (input, w, serial)
    }

    /// What the guest reads from COM1's data register while the line status says data ready.
    fn guest_reads(serial: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        let mut s = serial.lock().unwrap();
        let mut got = Vec::new();
        while s.read(5) & 1 != 0 {
            got.push(s.read(0));
        }
        got
    }

    #[test]
    fn console_input_holds_what_the_fifo_cannot_take_until_the_guest_empties_it() {
        let (mut input, mut w, serial) = console_rig();
        w.write_all(&[b'a'; 100]).unwrap();
        input.read_input();
        input.push();
        assert_eq!(input.pending.len(), 100 - 64, "the FIFO holds 64 bytes");
        assert_eq!(guest_reads(&serial).len(), 64);
        // Emptying the FIFO woke the input thread.
        assert_eq!(input.ready.read().unwrap(), 1);
        input.push();
        assert!(input.pending.is_empty());
        assert_eq!(guest_reads(&serial).len(), 36);
    }

    #[test]
    fn console_input_sees_the_end_of_stdin() {
        let (mut input, w, _serial) = console_rig();
        drop(w);
        input.read_input();
        assert!(input.eof);
    }

    #[test]
    fn console_input_is_dropped_while_the_uart_is_in_loopback() {
        let (mut input, mut w, serial) = console_rig();
        // MCR (offset 4) bit 4: loopback.
        serial.lock().unwrap().write(4, 0x10).unwrap();
        w.write_all(b"lost").unwrap();
        input.read_input();
        input.push();
        assert!(input.pending.is_empty());
    }

    #[test]
    fn console_input_handed_over_replaces_the_old_input() {
        let (mut input, mut old, serial) = console_rig();
        let slot = Arc::new(InputSlot::new().unwrap());
        input.slot = Some(Arc::clone(&slot));
        input.watching_input = false;
        let mut em = EventManager::new_with_capacity(3).unwrap();
        em.add_subscriber(input);
        let (r, mut new) = std::io::pipe().unwrap();
        slot.attach(File::from(std::os::fd::OwnedFd::from(r)))
            .unwrap();
        // The hand-over first: the old input is closed, the new one's bytes reach the guest.
        em.run_with_timeout(1000).unwrap();
        let e = old.write_all(b"old").unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::BrokenPipe,
            "the old input is closed"
        );
        new.write_all(b"new").unwrap();
        assert_eq!(guest_gets(&mut em, &serial, 3), b"new");
    }

    /// A slot's input thread as a pool's machine has it: no input until one is handed over.
    fn slot_rig() -> (
        EventManager<ConsoleInput>,
        event_manager::SubscriberId,
        Arc<InputSlot>,
        Arc<Mutex<SerialDevice>>,
    ) {
        let (mut input, _, serial) = console_rig();
        let slot = Arc::new(InputSlot::new().unwrap());
        input.input = None;
        input.watching_input = false;
        input.slot = Some(Arc::clone(&slot));
        let mut em = EventManager::new_with_capacity(3).unwrap();
        let id = em.add_subscriber(input);
        (em, id, slot, serial)
    }

    #[test]
    fn console_input_starts_with_none_and_takes_what_is_handed_over() {
        let (mut em, _, slot, serial) = slot_rig();
        assert_eq!(em.run_with_timeout(10).unwrap(), 0, "nothing to read yet");
        let (r, mut w) = std::io::pipe().unwrap();
        slot.attach(File::from(std::os::fd::OwnedFd::from(r)))
            .unwrap();
        w.write_all(b"typed").unwrap();
        assert_eq!(guest_gets(&mut em, &serial, 5), b"typed");
    }

    /// What the guest reads while the input thread's loop runs, once it has `n` bytes (or
    /// after ten rounds).
    fn guest_gets(
        em: &mut EventManager<ConsoleInput>,
        serial: &Arc<Mutex<SerialDevice>>,
        n: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        for _ in 0..10 {
            em.run_with_timeout(100).unwrap();
            got.extend(guest_reads(serial));
            if got.len() >= n {
                break;
            }
        }
        got
    }

    #[test]
    fn a_descriptor_epoll_refuses_is_dropped_and_the_thread_goes_on() {
        let (mut em, id, slot, _serial) = slot_rig();
        let file = tempfile_in_tmp();
        slot.attach(file).unwrap();
        em.run_with_timeout(1000).unwrap();
        let input = em.subscriber_mut(id).unwrap();
        assert!(input.input.is_none() && !input.watching_input);
    }

    /// A regular file (epoll refuses those), already unlinked.
    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("moat-serial-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn capped_writer_flushes_whole_lines() {
        let mut w = CappedWriter::new(Vec::new(), 100);
        assert!(w.write_all(b"a\nb").is_ok());
        assert_eq!(w.get_ref().as_slice(), b"a\n");
    }
}
