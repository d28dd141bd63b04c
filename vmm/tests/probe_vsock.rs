//! vsock through real KVM: the probe guest's driver talks to our virtio-mmio vsock device,
//! which bridges to host Unix sockets by the Firecracker convention. Skipped with a printed
//! reason where /dev/kvm is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;

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
    let child = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
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
    let mut vmm = common::Live { child, serial };

    // The host connects into the guest's port 6000 once the guest's own connection is done:
    // the guest accepts only then, and the VMM resets a connection the guest leaves waiting
    // longer than its peer timeout (2 s), which a slow nested guest can take for the echo.
    vmm.wait_for_line("probe: vsock echo ok 8192 bytes", 50);
    let back = vmm.echo_through_guest_port(&uds, 6000, b"hello guest, echo me");
    assert_eq!(back, b"hello guest, echo me");

    let status = vmm.child.wait().unwrap();
    let out = vmm.console();
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
