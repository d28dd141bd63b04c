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
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use moat_vmm::devices::virtio::testing::{RigLayout, VsockRig, guest_header};
use moat_vmm::devices::virtio::vsock::muxer::CONN_BUF;
use moat_vmm::devices::virtio::vsock::packet::{HDR_LEN, Header, op};
use vm_memory::{Bytes, GuestAddress};

const PKT: u32 = 64 * 1024;
const RX_BUF: u32 = 64 * 1024 + HDR_LEN as u32;
const RUN: Duration = Duration::from_secs(2);

/// A packet of this stream (guest port 1000 to host port 5000), the guest's window unlimited.
fn hdr(op: u16, len: u32, fwd_cnt: u32) -> Header {
    Header {
        len,
        buf_alloc: u32::MAX,
        fwd_cnt,
        ..guest_header(op, 1000, 5000)
    }
}

/// A rig with room for 128 RX buffers of 64 KiB, and the host service on port 5000.
fn rig(name: &str) -> (VsockRig, UnixListener) {
    let layout = RigLayout {
        memory_mib: 64,
        queue_size: 256,
    };
    let rig = VsockRig::build(&format!("bench-{name}"), layout, |_| {});
    let host = rig.host_listen(5000);
    (rig, host)
}

/// Received packets: (op, len, fwd_cnt); each buffer is posted again, as a driver recycles.
fn drain_rx(rig: &mut VsockRig) -> Vec<(u16, u32, u32)> {
    let mut out = Vec::new();
    for (a, len) in rig.take_rx() {
        let h = rig.header_at(a);
        out.push((h.op, len.saturating_sub(HDR_LEN as u32), h.fwd_cnt));
        rig.post_rx_at(a, RX_BUF);
    }
    out
}

fn connect(rig: &mut VsockRig, host: &UnixListener) -> UnixStream {
    rig.post_rx(128, RX_BUF);
    rig.send(hdr(op::REQUEST, 0, 0), &[]);
    assert!(drain_rx(rig).iter().any(|p| p.0 == op::RESPONSE));
    host.accept().unwrap().0
}

fn guest_to_host() -> f64 {
    let (mut rig, host) = rig("g2h");
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
    let packets: Vec<u64> = (0..16)
        .map(|_| {
            let a = rig.alloc_tx(u64::from(HDR_LEN as u32 + PKT));
            let mut packet = hdr(op::RW, PKT, 0).to_bytes().to_vec();
            packet.resize(HDR_LEN + PKT as usize, 0xa5);
            rig.mem.write_slice(&packet, GuestAddress(a)).unwrap();
            a
        })
        .collect();
    let (mut sent, mut host_fwd) = (0u64, 0u32);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < RUN {
        // Respect the device's credit like a real driver.
        if (sent as u32).wrapping_sub(host_fwd) + PKT > CONN_BUF {
            rig.worker.turn(1);
            for (o, _, fwd) in drain_rx(&mut rig) {
                if o == op::CREDIT_UPDATE || o == op::RW {
                    host_fwd = fwd;
                }
            }
            continue;
        }
        let a = packets[(i % 16) as usize];
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
    let (mut rig, host) = rig("h2g");
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
        for (o, len, _) in drain_rx(&mut rig) {
            if o == op::RW {
                got += u64::from(len);
                consumed += len;
            }
        }
        if consumed > 0 {
            // The guest read what it got: tell the device (credit update).
            fwd = fwd.wrapping_add(consumed);
            rig.queue_tx(hdr(op::CREDIT_UPDATE, 0, fwd), &[]);
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
