//! The vsock handshake: the line that opens every host-initiated stream to a guest port.
//!
//! Firecracker's convention on a workspace's Unix socket: the host side connects, writes
//! `CONNECT <port>\n`, and the other end answers `OK <n>\n` once the guest accepted (moat-vmm's
//! vsock muxer, where `<n>` is the host port it allocated; guest-init in the namespace backend,
//! where `<n>` is the guest port). Anything else, or nothing, means refused: the connection is
//! closed. After the newline the stream is the guest port's, so readers take one byte at a time
//! and never consume what follows ([`LineBuf`]).
//!
//! The grammar is strict, with one spelling per port, so that every reader agrees:
//!
//! ```text
//! connect = "CONNECT" SP port LF
//! ok      = "OK" SP port LF
//! port    = "0" / %x31-39 *9DIGIT    ; decimal, no sign, no leading zero, at most u32::MAX
//! ```
//!
//! No carriage return, no other whitespace, upper case only; a line longer than [`MAX_LINE`]
//! bytes is refused before its end arrives. Firecracker itself is laxer (it splits on
//! whitespace and ignores case); no writer of these lines in moat needs that.
//!
//! Invariants: no I/O; never more than [`MAX_LINE`] bytes held. Fuzzed by
//! `fuzz/fuzz_targets/vsock_handshake.rs`.

/// The longest handshake line accepted, newline excluded (`CONNECT 4294967295` is 18 bytes).
pub const MAX_LINE: usize = 32;

const CONNECT: &[u8] = b"CONNECT ";
const OK: &[u8] = b"OK ";

/// Why a handshake line was refused. Either way the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("vsock handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>` (or `OK <port>`) as the grammar spells it.
    #[error("malformed vsock handshake line")]
    Malformed,
}

/// The host side's request for guest `port`, newline included.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The answer that accepts a connection, naming `port`, newline included.
pub fn ok_line(port: u32) -> String {
    format!("OK {port}\n")
}

/// Parses `CONNECT <port>` (the newline already stripped): the guest port asked for.
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    line.strip_prefix(CONNECT)
        .and_then(parse_port)
        .ok_or(HandshakeError::Malformed)
}

/// Parses `OK <port>` (the newline already stripped): the port the answer names.
pub fn parse_ok(line: &[u8]) -> Result<u32, HandshakeError> {
    line.strip_prefix(OK)
        .and_then(parse_port)
        .ok_or(HandshakeError::Malformed)
}

/// A decimal u32 in its one canonical spelling.
fn parse_port(digits: &[u8]) -> Option<u32> {
    match digits {
        [] => None,
        [b'0'] => Some(0),
        [b'0', ..] => None,
        _ => digits.iter().try_fold(0u32, |n, &d| {
            let d = d.is_ascii_digit().then(|| u32::from(d - b'0'))?;
            n.checked_mul(10)?.checked_add(d)
        }),
    }
}

/// Collects one handshake line a byte at a time, bounded by [`MAX_LINE`]. The caller reads one
/// byte at a time from the stream, so that what follows the newline stays in it.
#[derive(Debug, Clone)]
pub struct LineBuf {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuf {
    /// An empty line.
    pub fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
        }
    }

    /// Adds `byte`. Returns the whole line, newline stripped, when `byte` is the newline;
    /// `Ok(None)` while the line goes on; [`HandshakeError::TooLong`] when it cannot end within
    /// [`MAX_LINE`] bytes. After the line or an error, start a new `LineBuf`.
    pub fn push(&mut self, byte: u8) -> Result<Option<&[u8]>, HandshakeError> {
        if byte == b'\n' {
            return Ok(Some(&self.buf[..self.len]));
        }
        let slot = self.buf.get_mut(self.len).ok_or(HandshakeError::TooLong)?;
        *slot = byte;
        self.len += 1;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` to a fresh [`LineBuf`]: the line, `None` while unfinished, or the error.
    fn line(bytes: &[u8]) -> Result<Option<Vec<u8>>, HandshakeError> {
        let mut buf = LineBuf::new();
        for &b in bytes {
            if let Some(l) = buf.push(b)? {
                return Ok(Some(l.to_vec()));
            }
        }
        Ok(None)
    }

    #[test]
    fn lines_format_and_parse_back() {
        for port in [0, 1, 22, 52, 6000, 1 << 30, u32::MAX] {
            let c = connect_line(port);
            assert_eq!(parse_connect(c.trim_end_matches('\n').as_bytes()), Ok(port));
            let ok = ok_line(port);
            assert_eq!(parse_ok(ok.trim_end_matches('\n').as_bytes()), Ok(port));
            assert!(c.len() <= MAX_LINE + 1);
        }
        assert_eq!(connect_line(22), "CONNECT 22\n");
        assert_eq!(ok_line(1073741824), "OK 1073741824\n");
    }

    #[test]
    fn accepted_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 0"), Ok(0));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
        assert_eq!(parse_ok(b"OK 22"), Ok(22));
    }

    #[test]
    fn refused_lines() {
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"connect 5",
            b"Connect 5",
            b"CONNECT  5",
            b"CONNECT 5 ",
            b" CONNECT 5",
            b"CONNECT\t5",
            b"CONNECT 52\r",
            b"CONNECT +52",
            b"CONNECT -1",
            b"CONNECT 052",
            b"CONNECT 00",
            b"CONNECT 0x10",
            b"CONNECT 4294967296",
            b"CONNECT 99999999999",
            b"CONNECT 5a",
            b"CONNECT \xd9\xa5",
            b"\xff",
            b"OK 22",
        ] {
            assert_eq!(
                parse_connect(bad),
                Err(HandshakeError::Malformed),
                "{bad:?}"
            );
        }
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 1",
            b"OK 1\r",
            b"OK 01",
            b"NO",
            b"CONNECT 1",
        ] {
            assert_eq!(parse_ok(bad), Err(HandshakeError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn a_line_ends_at_its_first_newline_and_is_bounded() {
        assert_eq!(line(b"CONNECT 22\nSSH"), Ok(Some(b"CONNECT 22".to_vec())));
        assert_eq!(line(b"CONNECT 2"), Ok(None));
        assert_eq!(line(b"\n"), Ok(Some(Vec::new())));
        let longest = [b'7'; MAX_LINE];
        assert_eq!(
            line(&[&longest[..], b"\n"].concat()),
            Ok(Some(longest.to_vec()))
        );
        assert_eq!(
            line(&[b'C'; MAX_LINE + 1]),
            Err(HandshakeError::TooLong),
            "an endless line"
        );
    }
}
