//! vsock through real KVM: the probe guest's driver talks to our virtio-mmio vsock device,
//! which bridges to host Unix sockets by the Firecracker convention. Skipped with a printed
//! reason where /dev/kvm is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn probe_guest_echoes_over_vsock_both_ways() {
    require_kvm!();
    let dir = common::scratch("vsock-echo");
    let uds = dir.join("v.sock");
    let serial = dir.join("serial.log");

    // The guest connects to host port 7000: an echo server on `<uds>_7000`.
    let listener = UnixListener::bind(format!("{}_7000", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            total += n;
            s.write_all(&buf[..n]).unwrap();
        }
    });

    let probe = common::probe_guest();
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(&probe)
        .args(["--mem", "64", "--timeout", "60"])
        .args(["--cmdline", "probe.vsock_echo=7000 probe.vsock_bytes=8192"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--serial-out")
        .arg(&serial)
        .spawn()
        .unwrap();

    // The host connects into the guest's port 6000.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match UnixStream::connect(&uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("vsock socket never appeared: {e}"),
        }
    };
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK ") && line.ends_with('\n'), "{line:?}");
    client.write_all(b"hello guest, echo me").unwrap();
    let mut back = [0u8; 20];
    reader.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello guest, echo me");
    drop(reader);
    drop(client);

    let status = vmm.wait().unwrap();
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "serial:\n{out}");
    assert_eq!(echo.join().unwrap(), 8192);
    for want in [
        "probe: vsock ready cid 3",
        "probe: vsock connected to host port 7000",
        "probe: vsock echo ok 8192 bytes",
        "probe: vsock host connection echoed 20 bytes",
        "probe: done",
    ] {
        assert!(
            out.lines().any(|l| l == want),
            "missing {want:?} in:\n{out}"
        );
    }
}

#[test]
fn probe_guest_connecting_to_a_port_nobody_serves_gets_refused() {
    require_kvm!();
    let dir = common::scratch("vsock-refused");
    let uds = dir.join("v.sock");
    let run = common::run_vmm(
        "vsock-refused-run",
        &[
            "--kernel",
            common::probe_guest().to_str().unwrap(),
            "--mem",
            "64",
            "--cmdline",
            "probe.vsock_echo=7001",
            "--vsock-uds",
            uds.to_str().unwrap(),
        ],
    );
    assert!(
        run.has_line("probe: FAIL host refused the connection (RST)"),
        "{}",
        run.serial
    );
    assert_eq!(run.code, Some(0), "the guest still shuts down cleanly");
}
