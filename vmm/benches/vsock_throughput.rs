//! vsock device-model throughput, driven by the simulated driver (no KVM): guest-to-host and
//! host-to-guest bytes per second through the real muxer, worker and a host Unix socket whose
//! other end a thread drains or fills. Goal: at least 20 Gbit/s guest-to-host,
//! Firecracker's best published figure.
//!
//! Run: `cargo bench -p moat-vmm --features test-utils --bench vsock_throughput`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
#![allow(clippy::cast_precision_loss)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use moat_vmm::devices::virtio::Interrupt;
use moat_vmm::devices::virtio::testing::{DriverQueue, memory};
use moat_vmm::devices::virtio::vsock::muxer::{CONN_BUF, Muxer};
use moat_vmm::devices::virtio::vsock::packet::{HDR_LEN, HOST_CID, Header, TYPE_STREAM, op};
use moat_vmm::devices::virtio::vsock::worker::Worker;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const GUEST_CID: u64 = 3;
const PKT: u32 = 64 * 1024;
const RX_BUF: u32 = 64 * 1024 + HDR_LEN as u32;
const RUN: Duration = Duration::from_secs(2);

fn hdr(op: u16, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 5000,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: u32::MAX,
        fwd_cnt,
    }
}

struct Rig {
    mem: std::sync::Arc<vm_memory::GuestMemoryMmap>,
    rx: DriverQueue,
    tx: DriverQueue,
    worker: Worker,
    dir: std::path::PathBuf,
    rx_addr: std::collections::HashMap<u32, u64>,
}

impl Rig {
    fn new(name: &str) -> (Self, UnixListener) {
        let dir =
            std::env::temp_dir().join(format!("moat-vsock-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let host = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
        let mem = memory(64);
        let rx = DriverQueue::new(0x1000, 256);
        let tx = DriverQueue::new(0x1_0000, 256);
        let ev = DriverQueue::new(0x2_0000, 256);
        let queues = vec![
            rx.device_queue(&mem),
            tx.device_queue(&mem),
            ev.device_queue(&mem),
        ];
        let evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let muxer = Muxer::new(
            GUEST_CID,
            &uds,
            UnixListener::bind(&uds).unwrap(),
            Epoll::new().unwrap(),
        )
        .unwrap();
        let worker = Worker::new(
            mem.clone(),
            queues,
            evts,
            EventFd::new(EFD_NONBLOCK).unwrap(),
            irq,
            muxer,
        )
        .unwrap();
        (
            Self {
                mem,
                rx,
                tx,
                worker,
                dir,
                rx_addr: std::collections::HashMap::new(),
            },
            host,
        )
    }

    fn post_rx(&mut self, slot: u64) {
        self.post_rx_at(0x100_0000 + slot * 0x1_1000);
    }

    fn post_rx_at(&mut self, a: u64) {
        let head = self.rx.add_chain(&self.mem, &[(a, RX_BUF, true)]);
        self.rx_addr.insert(u32::from(head), a);
    }

    /// Received packets: (op, len, fwd_cnt).
    fn drain_rx(&mut self) -> Vec<(u16, u32, u32)> {
        let used = self.rx.take_used(&self.mem);
        let mut out = Vec::new();
        for (id, len) in used {
            let a = self.rx_addr[&id];
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(a)).unwrap();
            let h = Header::from_bytes(&raw);
            out.push((h.op, len.saturating_sub(HDR_LEN as u32), h.fwd_cnt));
            self.post_rx_at(a);
        }
        out
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(rig: &mut Rig, host: &UnixListener) -> std::os::unix::net::UnixStream {
    for slot in 0..128 {
        rig.post_rx(slot);
    }
    let h = hdr(op::REQUEST, 0, 0);
    rig.mem
        .write_slice(&h.to_bytes(), GuestAddress(0x40_0000))
        .unwrap();
    rig.tx
        .add_chain(&rig.mem, &[(0x40_0000, HDR_LEN as u32, false)]);
    rig.worker.process_tx();
    rig.worker.process_rx();
    assert!(rig.drain_rx().iter().any(|p| p.0 == op::RESPONSE));
    host.accept().unwrap().0
}

fn guest_to_host() -> f64 {
    let (mut rig, host) = Rig::new("g2h");
    let mut s = connect(&mut rig, &host);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    // Sixteen packets (header + 64 KiB payload) laid out once; the driver re-queues them.
    for i in 0..16u64 {
        let a = 0x80_0000 + i * 0x1_1000;
        rig.mem
            .write_slice(&hdr(op::RW, PKT, 0).to_bytes(), GuestAddress(a))
            .unwrap();
        rig.mem
            .write_slice(
                &vec![0xa5u8; PKT as usize],
                GuestAddress(a + HDR_LEN as u64),
            )
            .unwrap();
    }
    let (mut sent, mut host_fwd) = (0u64, 0u32);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < RUN {
        // Respect the device's credit like a real driver.
        if (sent as u32).wrapping_sub(host_fwd) + PKT > CONN_BUF {
            rig.worker.turn(1);
            for (o, _, fwd) in rig.drain_rx() {
                if o == op::CREDIT_UPDATE || o == op::RW {
                    host_fwd = fwd;
                }
            }
            continue;
        }
        let a = 0x80_0000 + (i % 16) * 0x1_1000;
        rig.tx
            .add_chain(&rig.mem, &[(a, HDR_LEN as u32 + PKT, false)]);
        rig.worker.process_tx();
        rig.worker.process_rx();
        let _ = rig.tx.take_used(&rig.mem);
        sent += u64::from(PKT);
        i += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(rig);
    let got = reader.join().unwrap();
    assert!(got <= sent);
    got as f64 * 8.0 / secs / 1e9
}

fn host_to_guest() -> f64 {
    let (mut rig, host) = Rig::new("h2g");
    let mut s = connect(&mut rig, &host);
    let writer = std::thread::spawn(move || {
        let buf = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        while start.elapsed() < RUN {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let (mut got, mut fwd) = (0u64, 0u32);
    let start = Instant::now();
    while start.elapsed() < RUN {
        rig.worker.turn(1);
        let mut consumed = 0u32;
        for (o, len, _) in rig.drain_rx() {
            if o == op::RW {
                got += u64::from(len);
                consumed += len;
            }
        }
        if consumed > 0 {
            // The guest read what it got: tell the device (credit update).
            fwd = fwd.wrapping_add(consumed);
            let h = hdr(op::CREDIT_UPDATE, 0, fwd);
            rig.mem
                .write_slice(&h.to_bytes(), GuestAddress(0x40_0000))
                .unwrap();
            rig.tx
                .add_chain(&rig.mem, &[(0x40_0000, HDR_LEN as u32, false)]);
            rig.worker.process_tx();
            let _ = rig.tx.take_used(&rig.mem);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(rig);
    let _ = writer.join();
    got as f64 * 8.0 / secs / 1e9
}

fn main() {
    let g2h = guest_to_host();
    println!("vsock guest-to-host: {g2h:.2} Gbit/s (goal 20)");
    let h2g = host_to_guest();
    println!("vsock host-to-guest: {h2g:.2} Gbit/s");
}
