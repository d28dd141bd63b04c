//! The vsock handshake lines (`CONNECT <port>` / `OK <port>`): arbitrary bytes fed to the
//! bounded line reader and both parsers must never panic, and every accepted line must be the
//! one spelling the formatter writes for its port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_flow_header::vsock::{self, LineBuf, MAX_LINE};

fn check(line: &[u8]) {
    assert!(line.len() <= MAX_LINE);
    if let Ok(port) = vsock::parse_connect(line) {
        assert_eq!(vsock::connect_line(port).as_bytes(), [line, b"\n"].concat());
    }
    if let Ok(port) = vsock::parse_ok(line) {
        assert_eq!(vsock::ok_line(port).as_bytes(), [line, b"\n"].concat());
    }
}

fuzz_target!(|data: &[u8]| {
    // The readers' way: one byte at a time, a fresh reader after each line or refusal.
    let mut buf = LineBuf::new();
    let mut held = 0usize;
    for &b in data {
        match buf.push(b) {
            Ok(Some(line)) => {
                check(line);
                buf = LineBuf::new();
                held = 0;
            }
            Ok(None) => {
                held += 1;
                assert!(held <= MAX_LINE);
            }
            Err(_) => {
                assert_eq!(held, MAX_LINE);
                buf = LineBuf::new();
                held = 0;
            }
        }
    }
    // The parsers on their own, whatever the length.
    let _ = vsock::parse_connect(data);
    let _ = vsock::parse_ok(data);
    // Formatting any port parses back to it.
    if let Some(p) = data.get(..4) {
        let port = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let line = vsock::connect_line(port);
        assert_eq!(vsock::parse_connect(line.trim_end_matches('\n').as_bytes()), Ok(port));
        let line = vsock::ok_line(port);
        assert_eq!(vsock::parse_ok(line.trim_end_matches('\n').as_bytes()), Ok(port));
    }
});
