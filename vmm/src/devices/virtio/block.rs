//! virtio-blk (device id 2): one request queue over a host file, read-only or read-write.
//!
//! Every request is parsed once (a 16-byte header copied out of guest memory), bounds-checked
//! against the disk (sector arithmetic checked for overflow, data a whole number of sectors,
//! never more than [`MAX_REQUEST`] bytes), and answered with a status byte. A write to a
//! read-only disk gets IOERR, an unknown type UNSUPP; nothing a guest sends reaches past the
//! file's end or changes which file is used.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::queue_worker::{DeviceThread, run_queue_loop, serve_chains};
use super::{ActivateError, Activation, Interrupt, VirtioDevice, read_config_bytes};
use crate::devices::metrics::{DeviceMetrics, add, render};
use crate::guest_warn;
use crate::seccomp::Role;
use std::sync::atomic::AtomicU64;

/// virtio device id of the block device.
pub const DEVICE_ID: u32 = 2;
/// Sector size of the protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer in one request.
pub const MAX_REQUEST: usize = 1 << 20;
/// Feature: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature: the device supports FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZES: [u16; 1] = [256];

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
}

/// Status bytes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (also: out of bounds, write to a read-only disk).
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk file could not be opened.
    #[error("cannot open disk {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The disk is not a whole number of sectors.
    #[error("disk {0} is not a whole number of 512-byte sectors")]
    Size(PathBuf),
}

/// A block device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    thread: DeviceThread,
}

/// The host side of a disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    metrics: Arc<BlockMetrics>,
}

/// Counters of a block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests served.
    pub reads: AtomicU64,
    /// Write requests served.
    pub writes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Bytes read from the disk.
    pub read_bytes: AtomicU64,
    /// Bytes written to the disk.
    pub write_bytes: AtomicU64,
    /// Requests answered IOERR or UNSUPP (out of bounds, read-only, unknown type, I/O error).
    pub errors: AtomicU64,
}

impl DeviceMetrics for BlockMetrics {
    fn json(&self) -> String {
        render(&[
            ("reads", &self.reads),
            ("writes", &self.writes),
            ("flushes", &self.flushes),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("errors", &self.errors),
        ])
    }
}

impl Disk {
    /// Opens `path`, read-only or read-write.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if len % SECTOR != 0 {
            return Err(Error::Size(path.to_owned()));
        }
        Ok(Self {
            file,
            sectors: len / SECTOR,
            read_only,
            metrics: Arc::default(),
        })
    }

    /// The disk's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Byte offset of a transfer of `len` bytes at `sector`, if it is inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        if len % SECTOR != 0 {
            return None;
        }
        let end_sector = sector.checked_add(len / SECTOR)?;
        (end_sector <= self.sectors).then(|| sector * SECTOR)
    }
}

impl Block {
    /// A block device over `disk`, with its thread (confined when `seccomp`).
    pub fn new(disk: Disk, seccomp: bool) -> std::io::Result<Self> {
        let disk = Arc::new(disk);
        let d = disk.clone();
        let thread =
            DeviceThread::spawn("block", seccomp.then_some(Role::Block), move |act, kill| {
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
                        broken = !process(&mem, queue, &d, &interrupt);
                    }
                });
                if let Err(e) = result {
                    tracing::error!(error = %e, "block device loop failed");
                    interrupt.signal_needs_reset();
                }
                queues
            })?;
        Ok(Self { disk, thread })
    }
}

/// Parsed request header.
#[derive(Debug, Clone, Copy)]
struct Header {
    type_: u32,
    sector: u64,
}

/// Executes one request chain; returns the bytes written into guest buffers (status included),
/// or `None` when the chain is too broken to even carry a status byte.
fn execute(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &Disk,
) -> Option<u32> {
    let mut reader: Reader<'_, ()> = Reader::new(mem, chain.clone()).ok()?;
    let mut writer: Writer<'_, ()> = Writer::new(mem, chain).ok()?;
    let wlen = writer.available_bytes();
    if wlen == 0 {
        return None;
    }
    let mut status_w = writer.split_at(wlen - 1).ok()?;
    let mut raw = [0u8; 16];
    let st = if reader.read_exact(&mut raw).is_err() {
        status::IOERR
    } else {
        let mut t = [0u8; 4];
        t.copy_from_slice(&raw[0..4]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&raw[8..16]);
        let h = Header {
            type_: u32::from_le_bytes(t),
            sector: u64::from_le_bytes(s),
        };
        serve(h, &mut reader, &mut writer, disk)
    };
    status_w.write_all(&[st]).ok()?;
    u32::try_from(writer.bytes_written() + 1).ok()
}

fn serve(h: Header, reader: &mut Reader<'_, ()>, writer: &mut Writer<'_, ()>, disk: &Disk) -> u8 {
    let m = &disk.metrics;
    let st = serve_inner(h, reader, writer, disk);
    if st == status::OK {
        match h.type_ {
            req::IN => add(&m.reads, 1),
            req::OUT => add(&m.writes, 1),
            req::FLUSH => add(&m.flushes, 1),
            _ => {}
        }
    } else {
        add(&m.errors, 1);
    }
    st
}

fn serve_inner(
    h: Header,
    reader: &mut Reader<'_, ()>,
    writer: &mut Writer<'_, ()>,
    disk: &Disk,
) -> u8 {
    match h.type_ {
        req::IN => {
            let len = writer.available_bytes();
            let Some(off) = disk.range(h.sector, len).filter(|_| len <= MAX_REQUEST) else {
                guest_warn!(sector = h.sector, len, "block read out of bounds");
                return status::IOERR;
            };
            let mut buf = vec![0u8; len];
            if disk.file.read_exact_at(&mut buf, off).is_err() || writer.write_all(&buf).is_err() {
                return status::IOERR;
            }
            add(&disk.metrics.read_bytes, buf.len() as u64);
            status::OK
        }
        req::OUT => {
            if disk.read_only {
                return status::IOERR;
            }
            let len = reader.available_bytes();
            let Some(off) = disk.range(h.sector, len).filter(|_| len <= MAX_REQUEST) else {
                guest_warn!(sector = h.sector, len, "block write out of bounds");
                return status::IOERR;
            };
            let mut buf = vec![0u8; len];
            if reader.read_exact(&mut buf).is_err() || disk.file.write_all_at(&buf, off).is_err() {
                return status::IOERR;
            }
            add(&disk.metrics.write_bytes, buf.len() as u64);
            status::OK
        }
        req::FLUSH => {
            if disk.read_only || disk.file.sync_data().is_ok() {
                status::OK
            } else {
                status::IOERR
            }
        }
        req::GET_ID => {
            let id = b"moat-disk";
            let n = id.len().min(writer.available_bytes());
            match id.get(..n).map(|b| writer.write_all(b)) {
                Some(Ok(())) => status::OK,
                _ => status::IOERR,
            }
        }
        _ => status::UNSUPP,
    }
}

/// Serves every pending request; returns false if the device must be reset.
pub fn process(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &Disk,
    interrupt: &Interrupt,
) -> bool {
    serve_chains(mem, queue, interrupt, |chain| {
        execute(mem, chain, disk).unwrap_or_else(|| {
            guest_warn!("block request chain unusable");
            0
        })
    })
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        let ro = if self.disk.read_only { F_RO } else { 0 };
        super::VIRTIO_F_VERSION_1 | F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.disk.sectors.to_le_bytes(), offset, data);
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

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x20_0000;

    struct T {
        mem: Arc<GuestMemoryMmap>,
        dq: DriverQueue,
        q: Queue,
        irq: Interrupt,
        disk: Disk,
        path: PathBuf,
    }

    impl Drop for T {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn setup(name: &str, read_only: bool) -> T {
        let path = std::env::temp_dir().join(format!("moat-blk-{name}-{}", std::process::id()));
        let img: Vec<u8> = (0..8u32 * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, img).unwrap();
        let mem = memory(4);
        let dq = DriverQueue::new(0x1000, 16);
        let q = dq.device_queue(&mem);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let disk = Disk::open(&path, read_only).unwrap();
        T {
            mem,
            dq,
            q,
            irq,
            disk,
            path,
        }
    }

    impl T {
        fn request(
            &mut self,
            type_: u32,
            sector: u64,
            data_len: u32,
            device_writes_data: bool,
        ) -> (u32, u8) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&type_.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut bufs = vec![(HDR, 16, false)];
            if data_len > 0 {
                bufs.push((DATA, data_len, device_writes_data));
            }
            bufs.push((STATUS, 1, true));
            self.dq.add_chain(&self.mem, &bufs);
            assert!(process(&self.mem, &mut self.q, &self.disk, &self.irq));
            let used = self.dq.take_used(&self.mem);
            let st: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            (used[0].1, st)
        }
    }

    #[test]
    fn read_returns_the_sectors_asked_for() {
        let mut t = setup("read", true);
        let (len, st) = t.request(req::IN, 3, 1024, true);
        assert_eq!((len, st), (1025, status::OK));
        let mut buf = [0u8; 1024];
        t.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 3) && buf[512..].iter().all(|b| *b == 4));
    }

    #[test]
    fn write_lands_in_the_file() {
        let mut t = setup("write", false);
        t.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        let (_, st) = t.request(req::OUT, 7, 512, false);
        assert_eq!(st, status::OK);
        let img = std::fs::read(&t.path).unwrap();
        assert!(img[7 * 512..].iter().all(|b| *b == 0xab));
    }

    #[test]
    fn write_to_a_read_only_disk_fails_and_changes_nothing() {
        let mut t = setup("rowrite", true);
        t.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        let (_, st) = t.request(req::OUT, 0, 512, false);
        assert_eq!(st, status::IOERR);
        assert_eq!(std::fs::read(&t.path).unwrap()[0], 0);
    }

    #[test]
    fn read_past_the_end_fails() {
        let mut t = setup("pastend", true);
        assert_eq!(t.request(req::IN, 7, 1024, true).1, status::IOERR);
    }

    #[test]
    fn sector_overflow_fails() {
        let mut t = setup("overflow", true);
        assert_eq!(t.request(req::IN, u64::MAX, 512, true).1, status::IOERR);
    }

    #[test]
    fn partial_sector_transfer_fails() {
        let mut t = setup("partial", true);
        assert_eq!(t.request(req::IN, 0, 100, true).1, status::IOERR);
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mut t = setup("unsupp", true);
        assert_eq!(t.request(77, 0, 0, false).1, status::UNSUPP);
    }

    #[test]
    fn flush_succeeds() {
        let mut t = setup("flush", false);
        assert_eq!(t.request(req::FLUSH, 0, 0, false).1, status::OK);
    }

    #[test]
    fn chain_with_no_writable_byte_is_returned_without_status() {
        let mut t = setup("nostatus", true);
        t.dq.add_chain(&t.mem, &[(HDR, 16, false)]);
        assert!(process(&t.mem, &mut t.q, &t.disk, &t.irq));
        assert_eq!(t.dq.take_used(&t.mem), vec![(0, 0)]);
    }

    #[test]
    fn header_outside_memory_gets_no_access() {
        let mut t = setup("wildhdr", true);
        t.dq.add_chain(&t.mem, &[(0x7fff_0000_0000, 16, false), (STATUS, 1, true)]);
        assert!(process(&t.mem, &mut t.q, &t.disk, &t.irq));
        assert_eq!(t.dq.take_used(&t.mem), vec![(0, 0)]);
    }

    #[test]
    fn capacity_is_in_config_space() {
        let t = setup("config", true);
        let b = Block::new(Disk::open(&t.path, true).unwrap(), false).unwrap();
        let mut d = [0u8; 8];
        b.read_config(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), 8);
        assert_ne!(b.device_features() & F_RO, 0);
    }
}
