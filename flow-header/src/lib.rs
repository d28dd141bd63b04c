//! The flow header: the bytes that open every flow stream from a workspace to the egress proxy.
//!
//! Hop in the data path: the guest's netstack accepts a TCP connection to any destination, opens
//! one stream to the host (vsock in a VM, a Unix socket in the namespace backend) and writes one
//! [`FlowHeader`] before the first payload byte. The egress proxy reads it, decides, and from
//! then on the stream carries only payload.
//!
//! ```text
//! offset size field
//! 0      4    magic "MFH" + version (0x01, or 0x02 with a program)
//! 4      2    total header length in bytes, big endian (23..=MAX_HEADER_LEN)
//! 6      1    transport (1 = TCP)
//! 7      1    address family (4 or 6)
//! 8      8    flow id, big endian
//! 16     2    destination port, big endian
//! 18     4|16 destination address
//! ..     1    hostname length (0 = no hostname)
//! ..     n    hostname, lowercase ASCII letters, digits, '-' and '.'
//!             version 2 only, the program that opened the flow:
//! ..     4    process id in the workspace, big endian
//! ..     1    program path length (1..=MAX_PROGRAM_PATH_LEN)
//! ..     m    program path: absolute, UTF-8, no control characters
//! ..     1    digest kind (0 = none, 1 = SHA-256)
//! ..     0|32 digest of the program's file
//! ```
//!
//! Version 2 is version 1 with the program appended; a guest writes it only when the host said
//! it reads it (at start: `moat __guest-init --flow-header-version`, or the VM's control line),
//! and only for a flow whose program it found: a flow without one is written as version 1.
//! A reader of this crate takes both.
//!
//! Invariants: no I/O and no unsafe code; decoding never reads past the declared length, never
//! allocates more than [`MAX_HEADER_LEN`] bytes, and refuses anything it does not fully
//! understand (unknown version, transport or family, a length that disagrees with the fields,
//! a hostname that is not a plain DNS name, a program path that is not absolute and printable,
//! an unknown digest kind). The header is *claims by the guest*: the proxy never trusts the
//! address for a named flow, it resolves the hostname itself; the program only narrows what
//! the destination's rule allows.
//! The format is documented in `docs/flow-header.md`.
//!
//! The crate also holds the other line that opens a stream: [`vsock`], the `CONNECT <port>` /
//! `OK <port>` handshake by which the host side reaches a guest port, one parser for its three
//! readers (moat-vmm's vsock muxer, guest-init, the broker's last hop).

#![forbid(unsafe_code)]

pub mod vsock;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic that opens every header: "MFH" then the version byte.
pub const MAGIC: [u8; 3] = *b"MFH";
/// The first version: destination and hostname.
pub const VERSION_1: u8 = 1;
/// Version 1 and the program that opened the flow ([`Program`]).
pub const VERSION_2: u8 = 2;
/// The highest version this crate reads and writes.
pub const MAX_VERSION: u8 = VERSION_2;
/// Longest header accepted: the fixed part, an IPv6 address, a 253-byte hostname and a
/// process id and a 255-byte program path with its SHA-256, rounded up. Version 1 headers stay below 320.
pub const MAX_HEADER_LEN: usize = 640;
/// Longest hostname accepted (RFC 1035, without the trailing dot).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest program path carried; a guest whose program has a longer path sends none.
pub const MAX_PROGRAM_PATH_LEN: usize = 255;
/// Bytes of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

const FIXED_LEN: usize = 18;
/// Digest kinds of a version 2 program.
const DIGEST_NONE: u8 = 0;
const DIGEST_SHA256: u8 = 1;

/// Transport of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// A TCP connection: the stream carries its bytes both ways.
    Tcp,
}

impl Transport {
    fn code(self) -> u8 {
        match self {
            Transport::Tcp => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Transport::Tcp),
            _ => None,
        }
    }
}

/// The header that opens one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowHeader {
    /// Identifier chosen by the guest, unique within the workspace while the flow lives.
    pub flow_id: u64,
    /// Transport of the flow.
    pub transport: Transport,
    /// The destination the agent connected to (a fake address for named flows).
    pub destination: SocketAddr,
    /// The name the guest resolved `destination` from, when there is one.
    pub hostname: Option<Hostname>,
    /// The program that opened the connection, as guest-init found it (version 2); `None`
    /// when the guest did not look or could not tell.
    pub program: Option<Program>,
}

/// The program that opened a flow, as the guest claims it: the process (its id in the
/// workspace, as guest-init's process records name it), the path of its executable as the
/// workspace's kernel names it (symlinks resolved) and the SHA-256 of that file's contents,
/// when the guest hashed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Program {
    pid: u32,
    path: ProgramPath,
    sha256: Option<[u8; SHA256_LEN]>,
}

impl Program {
    /// Process `pid` running `path`, with the digest of its file if known.
    pub fn new(pid: u32, path: ProgramPath, sha256: Option<[u8; SHA256_LEN]>) -> Self {
        Program { pid, path, sha256 }
    }

    /// The process id, in the workspace's PID namespace.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The executable's path.
    pub fn path(&self) -> &ProgramPath {
        &self.path
    }

    /// The SHA-256 of the executable's contents, if the guest hashed it.
    pub fn sha256(&self) -> Option<&[u8; SHA256_LEN]> {
        self.sha256.as_ref()
    }

    /// The digest as lowercase hex.
    pub fn sha256_hex(&self) -> Option<String> {
        self.sha256.map(|d| hex(&d))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A program path as carried in the header: 1..=255 bytes of UTF-8 starting with `/`, with
/// no control characters (so it can be quoted in audit records and 403 pages as it is).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProgramPath(String);

impl ProgramPath {
    /// Parses a program path.
    pub fn new(path: &str) -> Result<Self, Error> {
        if path.is_empty()
            || path.len() > MAX_PROGRAM_PATH_LEN
            || !path.starts_with('/')
            || path.chars().any(char::is_control)
        {
            return Err(Error::BadProgram);
        }
        Ok(ProgramPath(path.to_owned()))
    }

    /// The path as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProgramPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A hostname as carried in the header: 1..=253 bytes of lowercase `a-z`, `0-9`, `-` and `.`,
/// no empty labels, no trailing dot. Internationalised names travel in their ASCII (punycode)
/// form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hostname(String);

impl Hostname {
    /// Parses a hostname in the header's canonical form.
    pub fn new(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
            return Err(Error::BadHostname);
        }
        let labels_ok = name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !labels_ok {
            return Err(Error::BadHostname);
        }
        Ok(Hostname(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Hostname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The stream does not start with the header magic.
    #[error("stream does not start with a flow header")]
    BadMagic,
    /// The version byte names a version this crate does not speak.
    #[error("unsupported flow header version {0}")]
    UnsupportedVersion(u8),
    /// The declared length is below the minimum or above [`MAX_HEADER_LEN`].
    #[error("flow header length {0} is out of bounds")]
    BadLength(usize),
    /// The transport byte is unknown.
    #[error("unknown transport {0}")]
    UnknownTransport(u8),
    /// The address family byte is neither 4 nor 6.
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    /// The fields do not add up to the declared length.
    #[error("flow header fields disagree with its declared length")]
    LengthMismatch,
    /// The hostname is not a plain lowercase DNS name.
    #[error("hostname in flow header is malformed")]
    BadHostname,
    /// The program path is empty, not absolute, too long, not UTF-8 or holds a control
    /// character, or the digest kind is unknown.
    #[error("program in flow header is malformed")]
    BadProgram,
}

impl FlowHeader {
    /// The version [`FlowHeader::encode`] writes: 2 with a program, 1 without.
    pub fn version(&self) -> u8 {
        if self.program.is_some() {
            VERSION_2
        } else {
            VERSION_1
        }
    }

    /// Encodes the header. Never fails: every [`FlowHeader`] value is encodable. A header
    /// with a program is version 2; a writer whose reader takes only version 1 leaves it out.
    pub fn encode(&self) -> Vec<u8> {
        let addr_len = match self.destination.ip() {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 16,
        };
        let host = self.hostname.as_ref().map_or("", Hostname::as_str);
        let program_len = self.program.as_ref().map_or(0, |p| {
            4 + 1 + p.path.0.len() + 1 + p.sha256.map_or(0, |d| d.len())
        });
        let total = FIXED_LEN + addr_len + 1 + host.len() + program_len;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&MAGIC);
        out.push(self.version());
        // total <= 18 + 16 + 1 + 253 + 4 + 1 + 255 + 1 + 32, far below u16::MAX.
        out.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
        out.push(self.transport.code());
        match self.destination.ip() {
            IpAddr::V4(_) => out.push(4),
            IpAddr::V6(_) => out.push(6),
        }
        out.extend_from_slice(&self.flow_id.to_be_bytes());
        out.extend_from_slice(&self.destination.port().to_be_bytes());
        match self.destination.ip() {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
        // host.len() <= MAX_HOSTNAME_LEN (253), enforced by Hostname::new.
        out.push(u8::try_from(host.len()).unwrap_or(0));
        out.extend_from_slice(host.as_bytes());
        if let Some(program) = &self.program {
            out.extend_from_slice(&program.pid.to_be_bytes());
            // path.len() <= MAX_PROGRAM_PATH_LEN (255), enforced by ProgramPath::new.
            out.push(u8::try_from(program.path.0.len()).unwrap_or(0));
            out.extend_from_slice(program.path.0.as_bytes());
            match &program.sha256 {
                None => out.push(DIGEST_NONE),
                Some(digest) => {
                    out.push(DIGEST_SHA256);
                    out.extend_from_slice(digest);
                }
            }
        }
        out
    }

    /// Decodes a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` is a valid prefix that needs more bytes, and
    /// `Ok(Some((header, consumed)))` once a whole header is present; bytes after `consumed`
    /// are payload. Errors are final: the stream must be closed.
    pub fn decode(buf: &[u8]) -> Result<Option<(FlowHeader, usize)>, Error> {
        // Check what we have of the magic and version first, so garbage is refused early.
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            return Err(Error::BadMagic);
        }
        if let Some(&version) = buf.get(3)
            && !(VERSION_1..=MAX_VERSION).contains(&version)
        {
            return Err(Error::UnsupportedVersion(version));
        }
        let Some(len_bytes) = buf.get(4..6) else {
            return Ok(None);
        };
        let total = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if !(FIXED_LEN + 4 + 1..=MAX_HEADER_LEN).contains(&total) {
            return Err(Error::BadLength(total));
        }
        let Some(h) = buf.get(..total) else {
            return Ok(None);
        };
        let version = h[3];
        let transport = Transport::from_code(h[6]).ok_or(Error::UnknownTransport(h[6]))?;
        let addr_len = match h[7] {
            4 => 4,
            6 => 16,
            other => return Err(Error::UnknownFamily(other)),
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[8..16]);
        let flow_id = u64::from_be_bytes(id);
        let port = u16::from_be_bytes([h[16], h[17]]);
        let addr_end = FIXED_LEN + addr_len;
        let addr_bytes = h.get(FIXED_LEN..addr_end).ok_or(Error::LengthMismatch)?;
        let ip = if addr_len == 4 {
            let mut a = [0u8; 4];
            a.copy_from_slice(addr_bytes);
            IpAddr::V4(Ipv4Addr::from(a))
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(addr_bytes);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        let host_len = usize::from(*h.get(addr_end).ok_or(Error::LengthMismatch)?);
        let host_end = addr_end + 1 + host_len;
        let host_raw = h.get(addr_end + 1..host_end).ok_or(Error::LengthMismatch)?;
        let hostname = if host_len == 0 {
            None
        } else {
            let name = std::str::from_utf8(host_raw).map_err(|_| Error::BadHostname)?;
            Some(Hostname::new(name)?)
        };
        let program = if version == VERSION_1 {
            if host_end != total {
                return Err(Error::LengthMismatch);
            }
            None
        } else {
            Some(decode_program(&h[host_end..])?)
        };
        let header = FlowHeader {
            flow_id,
            transport,
            destination: SocketAddr::new(ip, port),
            hostname,
            program,
        };
        Ok(Some((header, total)))
    }
}

/// Decodes a version 2 program from exactly `rest`, the bytes after the hostname.
fn decode_program(rest: &[u8]) -> Result<Program, Error> {
    let (pid, rest) = rest.split_first_chunk::<4>().ok_or(Error::LengthMismatch)?;
    let pid = u32::from_be_bytes(*pid);
    let (&path_len, rest) = rest.split_first().ok_or(Error::LengthMismatch)?;
    let path_len = usize::from(path_len);
    let raw = rest.get(..path_len).ok_or(Error::LengthMismatch)?;
    let path = std::str::from_utf8(raw).map_err(|_| Error::BadProgram)?;
    let path = ProgramPath::new(path)?;
    let (&kind, digest) = rest[path_len..]
        .split_first()
        .ok_or(Error::LengthMismatch)?;
    let sha256 = match kind {
        DIGEST_NONE if digest.is_empty() => None,
        DIGEST_SHA256 if digest.len() == SHA256_LEN => {
            let mut d = [0u8; SHA256_LEN];
            d.copy_from_slice(digest);
            Some(d)
        }
        DIGEST_NONE | DIGEST_SHA256 => return Err(Error::LengthMismatch),
        _ => return Err(Error::BadProgram),
    };
    Ok(Program { pid, path, sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(host: &str) -> FlowHeader {
        FlowHeader {
            flow_id: 0x0102_0304_0506_0708,
            transport: Transport::Tcp,
            destination: "198.18.0.7:443".parse().unwrap(),
            hostname: Some(Hostname::new(host).unwrap()),
            program: None,
        }
    }

    fn curl() -> Program {
        Program::new(
            42,
            ProgramPath::new("/usr/bin/curl").unwrap(),
            Some([0xab; 32]),
        )
    }

    #[test]
    fn ipv4_named_header_round_trips() {
        let h = named("api.github.com");
        let bytes = h.encode();
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn ipv6_literal_header_round_trips() {
        let h = FlowHeader {
            flow_id: u64::MAX,
            transport: Transport::Tcp,
            destination: "[2001:db8::1]:8443".parse().unwrap(),
            hostname: None,
            program: None,
        };
        let bytes = h.encode();
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn longest_hostname_round_trips_within_bound() {
        let label = "a".repeat(63);
        let host = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(host.len(), MAX_HOSTNAME_LEN);
        let mut h = named(&host);
        h.destination = "[::1]:1".parse().unwrap();
        let bytes = h.encode();
        assert!(bytes.len() <= MAX_HEADER_LEN);
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn payload_after_header_is_left_alone() {
        let mut bytes = named("example.com").encode();
        let len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (_, consumed) = FlowHeader::decode(&bytes).unwrap().unwrap();
        assert_eq!(consumed, len);
    }

    #[test]
    fn every_truncation_asks_for_more_bytes() {
        let bytes = named("example.com").encode();
        for cut in 0..bytes.len() {
            assert_eq!(FlowHeader::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = named("example.com").encode();
        bytes[3] = 3;
        assert_eq!(
            FlowHeader::decode(&bytes),
            Err(Error::UnsupportedVersion(3))
        );
        bytes[3] = 0;
        assert_eq!(
            FlowHeader::decode(&bytes),
            Err(Error::UnsupportedVersion(0))
        );
    }

    #[test]
    fn garbage_is_refused_at_the_first_byte() {
        assert_eq!(FlowHeader::decode(b"G"), Err(Error::BadMagic));
        assert_eq!(
            FlowHeader::decode(b"GET / HTTP/1.1\r\n"),
            Err(Error::BadMagic)
        );
    }

    #[test]
    fn oversized_length_is_refused_before_the_bytes_arrive() {
        let mut bytes = named("example.com").encode();
        bytes[4..6].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(FlowHeader::decode(&bytes[..6]), Err(Error::BadLength(1000)));
    }

    #[test]
    fn length_that_disagrees_with_fields_is_refused() {
        let mut bytes = named("example.com").encode();
        let declared = u16::try_from(bytes.len() + 1).unwrap();
        bytes[4..6].copy_from_slice(&declared.to_be_bytes());
        bytes.push(b'x');
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::LengthMismatch));
    }

    #[test]
    fn unknown_transport_and_family_are_refused() {
        let mut bytes = named("example.com").encode();
        bytes[6] = 9;
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::UnknownTransport(9)));
        let mut bytes = named("example.com").encode();
        bytes[7] = 5;
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::UnknownFamily(5)));
    }

    #[test]
    fn non_canonical_hostnames_are_refused() {
        for bad in [
            "Example.com",
            "example.com.",
            "a..b",
            "exa mple.com",
            "é.com",
            "",
        ] {
            assert_eq!(Hostname::new(bad), Err(Error::BadHostname), "{bad:?}");
        }
    }

    #[test]
    fn hostname_with_bad_bytes_on_the_wire_is_refused() {
        let mut bytes = named("example.com").encode();
        let last = bytes.len() - 1;
        bytes[last] = b'/';
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::BadHostname));
    }

    #[test]
    fn header_without_a_program_is_version_1_and_reads_as_before() {
        let bytes = named("example.com").encode();
        assert_eq!(bytes[3], VERSION_1);
        let (h, _) = FlowHeader::decode(&bytes).unwrap().unwrap();
        assert_eq!(h.program, None);
    }

    #[test]
    fn program_with_digest_round_trips_as_version_2() {
        let mut h = named("api.github.com");
        h.program = Some(curl());
        let bytes = h.encode();
        assert_eq!(bytes[3], VERSION_2);
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn program_without_digest_round_trips() {
        let mut h = named("api.github.com");
        h.program = Some(Program::new(
            7,
            ProgramPath::new("/opt/big/node").unwrap(),
            None,
        ));
        let bytes = h.encode();
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn largest_version_2_header_fits_the_bound_and_every_truncation_waits() {
        let label = "a".repeat(63);
        let host = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        let path = format!("/{}", "p".repeat(MAX_PROGRAM_PATH_LEN - 1));
        let mut h = named(&host);
        h.destination = "[::1]:1".parse().unwrap();
        h.program = Some(Program::new(
            u32::MAX,
            ProgramPath::new(&path).unwrap(),
            Some([7; 32]),
        ));
        let bytes = h.encode();
        assert!(bytes.len() <= MAX_HEADER_LEN);
        assert_eq!(FlowHeader::decode(&bytes), Ok(Some((h, bytes.len()))));
        for cut in 0..bytes.len() {
            assert_eq!(FlowHeader::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_program_paths_are_refused() {
        let long = format!("/{}", "p".repeat(MAX_PROGRAM_PATH_LEN));
        for bad in [
            "",
            "usr/bin/curl",
            "/usr/bin/cu\nrl",
            "/a\u{7f}",
            long.as_str(),
        ] {
            assert_eq!(ProgramPath::new(bad), Err(Error::BadProgram), "{bad:?}");
        }
        assert!(ProgramPath::new("/usr/bin/python3.11 (deleted)").is_ok());
    }

    #[test]
    fn program_with_bad_bytes_on_the_wire_is_refused() {
        let mut h = named("example.com");
        h.program = Some(curl());
        let clean = h.encode();
        let path_at = clean.len() - 1 - 32 - "/usr/bin/curl".len();
        let mut bytes = clean.clone();
        bytes[path_at] = b'u'; // not absolute
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::BadProgram));
        let mut bytes = clean.clone();
        bytes[path_at + 1] = 0xff; // not UTF-8
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::BadProgram));
        let mut bytes = clean.clone();
        bytes[path_at + 1] = b'\n';
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::BadProgram));
        let mut bytes = clean;
        let kind_at = bytes.len() - 33;
        bytes[kind_at] = 2; // unknown digest kind
        assert_eq!(FlowHeader::decode(&bytes), Err(Error::BadProgram));
    }

    #[test]
    fn program_fields_that_disagree_with_the_length_are_refused() {
        let mut h = named("example.com");
        h.program = Some(curl());
        let clean = h.encode();
        // A digest kind of SHA-256 with the digest cut off (length shortened to match).
        let mut short = clean[..clean.len() - 1].to_vec();
        let len = u16::try_from(short.len()).unwrap();
        short[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(FlowHeader::decode(&short), Err(Error::LengthMismatch));
        // A path length reaching past the end.
        let mut long = clean.clone();
        let path_len_at = clean.len() - 1 - 32 - "/usr/bin/curl".len() - 1;
        long[path_len_at] = 200;
        assert_eq!(FlowHeader::decode(&long), Err(Error::LengthMismatch));
        // Version 2 with nothing after the hostname.
        let mut empty = named("example.com").encode();
        empty[3] = VERSION_2;
        assert_eq!(FlowHeader::decode(&empty), Err(Error::LengthMismatch));
        // Version 1 with a program after the hostname.
        let mut v1 = clean;
        v1[3] = VERSION_1;
        assert_eq!(FlowHeader::decode(&v1), Err(Error::LengthMismatch));
    }

    #[test]
    fn the_fuzz_seeds_of_version_2_decode_and_round_trip() {
        for seed in [
            &include_bytes!("../../fuzz/seeds/flow_header/v2_program_sha256")[..],
            &include_bytes!("../../fuzz/seeds/flow_header/v2_program_no_digest")[..],
        ] {
            let (h, used) = FlowHeader::decode(seed).unwrap().unwrap();
            assert_eq!(used, seed.len());
            assert_eq!(h.program.as_ref().unwrap().path().as_str(), "/usr/bin/curl");
            assert_eq!(h.encode(), seed);
        }
    }
}
