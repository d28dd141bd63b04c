//! A virtio driver simulator for device tests: split queues laid out in guest memory by hand,
//! so tests can build honest chains and malicious ones (loops, wild addresses, huge lengths,
//! an available index that lies); and [`VsockRig`], the vsock device's rig (its worker and
//! muxer on a Unix socket in a scratch directory, driven through those queues), shared by its
//! unit tests, its throughput bench and its fuzz target.
// A test fixture that benches and fuzz targets also build (feature `test-utils`), so outside
// cfg(test), where clippy.toml's allow-unwrap-in-tests does not reach.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::virtio::Interrupt;
use crate::devices::virtio::vsock::muxer::Muxer;
use crate::devices::virtio::vsock::packet::{HDR_LEN, HOST_CID, Header, TYPE_STREAM, op};
use crate::devices::virtio::vsock::worker::Worker;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const F_WRITE: u16 = 2;

/// Guest memory for tests: `mib` MiB at address 0.
pub fn memory(mib: usize) -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap())
}

/// One split queue as a driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let (avail, used) = Self::ring_offsets(size);
        let (desc, avail, used) = (base, base + avail, base + used);
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Where the available and used rings of a `size`-entry queue start, from its descriptor
    /// table.
    fn ring_offsets(size: u16) -> (u64, u64) {
        let s = u64::from(size);
        let avail = 16 * s;
        let used = (avail + 6 + 2 * s + 3) & !3;
        (avail, used)
    }

    /// Bytes a `size`-entry queue's three rings take, rounded up to a 4 KiB page.
    pub fn footprint(size: u16) -> u64 {
        let (_, used) = Self::ring_offsets(size);
        (used + 6 + 8 * u64::from(size) + 0xfff) & !0xfff
    }

    /// The device-side queue, configured as a transport would.
    pub fn device_queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(lo(self.desc)), Some(hi(self.desc)));
        q.set_avail_ring_address(Some(lo(self.avail)), Some(hi(self.avail)));
        q.set_used_ring_address(Some(lo(self.used)), Some(hi(self.used)));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Ring addresses (desc, avail, used) for a transport test.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Writes descriptor `index` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes chain `head` available and bumps the index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets the available index to any value (a lying driver).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a chain of `(addr, len, device_writes)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Used entries (id, len) the device added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn lo(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the temp directory, unique to this process and call, removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `moat-<kind>-<pid>-<n>`, made empty.
    pub fn new(kind: &str) -> Self {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("moat-{kind}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's CID in a [`VsockRig`].
pub const GUEST_CID: u64 = 3;

/// The first guest address past a rig's rings: below it the rings, from it the rig's TX area
/// (to half the memory) and RX area (the upper half).
pub const RINGS_END: u64 = 0x1_0000;

/// A stream packet from the rig's guest (its header's `len` 0; [`VsockRig::send`] sets it):
/// `op` from `guest_port` to the host's `host_port`, a 64 KiB receive buffer, nothing
/// forwarded yet.
pub fn guest_header(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// The shape of a [`VsockRig`]'s guest: its memory and the size of its queues.
#[derive(Debug, Clone, Copy)]
pub struct RigLayout {
    /// Guest memory, MiB.
    pub memory_mib: usize,
    /// Entries of each of the three queues (RX, TX, event).
    pub queue_size: u16,
}

impl Default for RigLayout {
    /// 16 MiB and 256-entry queues: room for every unit test.
    fn default() -> Self {
        Self {
            memory_mib: 16,
            queue_size: 256,
        }
    }
}

/// The vsock device's worker and muxer, with no transport and no thread: a driver on the test's
/// side of [`DriverQueue`]s, the host's side real Unix sockets in a [`ScratchDir`] (the
/// device's socket is `uds`; a host service on port P listens on `<uds>_P`). Nothing runs
/// unless the caller turns the worker.
///
/// Guest memory: the RX, TX and event rings from 0x1000 (below [`RINGS_END`]); buffers
/// [`VsockRig::alloc_tx`] hands out from there to half the memory (wrapping); RX buffers
/// [`VsockRig::post_rx`] posts in the upper half.
#[derive(Debug)]
pub struct VsockRig {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The driver's RX queue (device to guest).
    pub rx: DriverQueue,
    /// The driver's TX queue (guest to device).
    pub tx: DriverQueue,
    /// The device.
    pub worker: Worker,
    /// The device's interrupt (and its needs-reset flag).
    pub interrupt: Interrupt,
    /// The device's host-side socket, where host clients connect with `CONNECT <port>`.
    pub uds: PathBuf,
    tx_area: (u64, u64),
    tx_next: u64,
    rx_next: u64,
    rx_end: u64,
    /// Where each posted RX chain's buffer is, by head.
    rx_bufs: HashMap<u32, u64>,
    // Last: the sockets in it close before it goes.
    _dir: ScratchDir,
}

impl VsockRig {
    /// A rig of the default layout; `name` names its scratch directory.
    pub fn new(name: &str) -> Self {
        Self::build(name, RigLayout::default(), |_| {})
    }

    /// A rig of the default layout whose muxer `f` configures first (timeouts, limits).
    pub fn with_muxer(name: &str, f: impl FnOnce(&mut Muxer)) -> Self {
        Self::build(name, RigLayout::default(), f)
    }

    /// A rig of `layout` whose muxer `f` configures first.
    pub fn build(name: &str, layout: RigLayout, f: impl FnOnce(&mut Muxer)) -> Self {
        let dir = ScratchDir::new(&format!("vsock-{name}"));
        let uds = dir.path().join("v.sock");
        let mem = memory(layout.memory_mib);
        let span = DriverQueue::footprint(layout.queue_size);
        assert!(
            0x1000 + 3 * span <= RINGS_END,
            "queues too large for the rig"
        );
        let [rx, tx, ev] =
            [0u64, 1, 2].map(|q| DriverQueue::new(0x1000 + q * span, layout.queue_size));
        let queues = vec![
            rx.device_queue(&mem),
            tx.device_queue(&mem),
            ev.device_queue(&mem),
        ];
        let evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let listener = UnixListener::bind(&uds).unwrap();
        let mut muxer = Muxer::new(GUEST_CID, &uds, listener, Epoll::new().unwrap()).unwrap();
        f(&mut muxer);
        let kill = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker =
            Worker::new(mem.clone(), queues, evts, kill, interrupt.clone(), muxer).unwrap();
        let half = (layout.memory_mib as u64) << 19;
        Self {
            mem,
            rx,
            tx,
            worker,
            interrupt,
            uds,
            tx_area: (RINGS_END, half),
            tx_next: RINGS_END,
            rx_next: half,
            rx_end: half * 2,
            rx_bufs: HashMap::new(),
            _dir: dir,
        }
    }

    /// A host service listening on `port` (`<uds>_<port>`), where guest connections to it go.
    pub fn host_listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }

    /// `len` bytes of the TX area, 16-byte aligned; wraps to its start when it runs out.
    pub fn alloc_tx(&mut self, len: u64) -> u64 {
        if self.tx_next + len > self.tx_area.1 {
            self.tx_next = self.tx_area.0;
        }
        let a = self.tx_next;
        self.tx_next += (len + 15) & !15;
        a
    }

    /// Lays one packet out (header and payload in two descriptors, or the header alone) with
    /// `hdr.len` as given, and makes it available on TX; the device does not see it yet.
    pub fn queue_tx(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.alloc_tx(HDR_LEN as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&self.mem, &[(h, HDR_LEN as u32, false)]);
        } else {
            let p = self.alloc_tx(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            self.tx.add_chain(
                &self.mem,
                &[
                    (h, HDR_LEN as u32, false),
                    (p, u32::try_from(payload.len()).unwrap(), false),
                ],
            );
        }
    }

    /// The guest sends one packet (`hdr.len` set to the payload's) and the device processes
    /// TX, then RX.
    pub fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = u32::try_from(payload.len()).unwrap();
        self.send_raw(hdr, payload);
    }

    /// [`Self::send`] with `hdr.len` as given, whatever the payload.
    pub fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        self.queue_tx(hdr, payload);
        self.worker.process_tx();
        self.worker.process_rx();
    }

    /// Makes the RX buffer at `addr`, `size` bytes, available to the device.
    pub fn post_rx_at(&mut self, addr: u64, size: u32) {
        let head = self.rx.add_chain(&self.mem, &[(addr, size, true)]);
        self.rx_bufs.insert(u32::from(head), addr);
    }

    /// Posts `n` fresh RX buffers of `size` bytes, then lets the device fill what it can.
    pub fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.rx_next;
            self.rx_next += u64::from(size + 15) & !15;
            assert!(self.rx_next <= self.rx_end, "the rig's RX area is used up");
            self.post_rx_at(a, size);
        }
        self.worker.process_rx();
    }

    /// The RX buffers the device filled since the last call: (address, bytes written).
    pub fn take_rx(&mut self) -> Vec<(u64, u32)> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(id, len)| (self.rx_bufs[&id], len))
            .collect()
    }

    /// The packet header in the RX buffer at `addr`.
    pub fn header_at(&self, addr: u64) -> Header {
        let mut raw = [0u8; HDR_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        Header::from_bytes(&raw)
    }

    /// Packets the device delivered to the guest since the last call (buffers too small for a
    /// header, which the device skips, left out).
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.take_rx()
            .into_iter()
            .filter(|(_, len)| *len as usize >= HDR_LEN)
            .map(|(a, len)| {
                let mut data = vec![0u8; len as usize - HDR_LEN];
                self.mem
                    .read_slice(&mut data, GuestAddress(a + HDR_LEN as u64))
                    .unwrap();
                (self.header_at(a), data)
            })
            .collect()
    }

    /// Runs the device loop until `f` returns Some, or 5 s pass.
    pub fn pump_until<T>(&mut self, mut f: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            self.worker.turn(20);
        }
    }

    /// The next delivered packet whose op is `want` (others are dropped).
    pub fn recv_op(&mut self, want: u16) -> Header {
        self.pump_until(|h| h.recv().into_iter().map(|p| p.0).find(|p| p.op == want))
    }

    /// The guest connects to host `port` from guest port 1000 (8 RX buffers of 4 KiB posted
    /// first); returns the accepted host stream.
    pub fn established(&mut self, port: u32) -> UnixStream {
        let l = self.host_listen(port);
        self.post_rx(8, 4096 + HDR_LEN as u32);
        self.send(guest_header(op::REQUEST, 1000, port), &[]);
        let r = self.recv_op(op::RESPONSE);
        assert_eq!((r.src_port, r.dst_port), (port, 1000));
        let (s, _) = l.accept().unwrap();
        s
    }
}
