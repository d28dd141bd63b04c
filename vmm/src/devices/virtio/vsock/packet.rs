//! The virtio-vsock packet header (virtio 1.x, 5.10.6), parsed once from guest memory.
//!
//! A TX chain is copied out of guest memory exactly once: the 44-byte header and then at most
//! `len` payload bytes, with `len` bounded by [`MAX_PKT_PAYLOAD`] and by what the chain really
//! holds. Nothing is read from the guest's buffers again after that (no TOCTOU).

use std::io::Read;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Header size on the wire.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted in one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `type`: stream socket, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// Half or full close.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit query.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more.
    pub const RCV: u32 = 1;
    /// The sender will send no more.
    pub const SEND: u32 = 2;
}

/// The header, decoded from its little-endian wire form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le<const N: usize>(b: &[u8; HDR_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl Header {
    /// Decodes the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            type_: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        }
    }

    /// Encodes the wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a TX chain was refused. Each one resets the connection it names (if any).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain's buffers are not valid guest memory.
    #[error("descriptor chain points outside guest memory")]
    BadChain,
    /// The chain is shorter than a header.
    #[error("descriptor chain shorter than a vsock header")]
    ShortHeader,
    /// `len` is larger than allowed or than the chain holds.
    #[error("payload length {0} is too large or exceeds the chain")]
    BadLength(u32),
}

/// A packet read from the TX queue: its header and its payload, copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// Header.
    pub hdr: Header,
    /// Payload (exactly `hdr.len` bytes).
    pub payload: Vec<u8>,
}

/// Copies one packet out of a TX descriptor chain.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, (Option<Header>, PacketError)> {
    let mut reader: Reader<'_, ()> =
        Reader::new(mem, chain).map_err(|_| (None, PacketError::BadChain))?;
    if reader.available_bytes() < HDR_LEN {
        return Err((None, PacketError::ShortHeader));
    }
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| (None, PacketError::BadChain))?;
    let hdr = Header::from_bytes(&raw);
    let len = hdr.len;
    let Ok(ulen) = usize::try_from(len) else {
        return Err((Some(hdr), PacketError::BadLength(len)));
    };
    if len > MAX_PKT_PAYLOAD || ulen > reader.available_bytes() {
        return Err((Some(hdr), PacketError::BadLength(len)));
    }
    let mut payload = vec![0u8; ulen];
    reader
        .read_exact(&mut payload)
        .map_err(|_| (Some(hdr), PacketError::BadChain))?;
    Ok(TxPacket { hdr, payload })
}

/// An RX chain being filled: its writable capacity and a writer over it.
pub struct RxBuffer<'a> {
    writer: Writer<'a, ()>,
}

impl std::fmt::Debug for RxBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("capacity", &self.writer.available_bytes())
            .finish()
    }
}

impl<'a> RxBuffer<'a> {
    /// Wraps an RX chain; `None` if it is not valid guest memory or too small for a header.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Option<Self> {
        let writer = Writer::new(mem, chain).ok()?;
        (writer.available_bytes() >= HDR_LEN).then_some(Self { writer })
    }

    /// Payload bytes that fit after the header.
    pub fn payload_capacity(&self) -> usize {
        self.writer.available_bytes().saturating_sub(HDR_LEN)
    }

    /// Writes `hdr` (with `len` set to the payload's length) and `payload`; returns bytes used.
    pub fn write(mut self, mut hdr: Header, payload: &[u8]) -> Option<u32> {
        use std::io::Write;
        if payload.len() > self.payload_capacity() {
            return None;
        }
        hdr.len = u32::try_from(payload.len()).ok()?;
        self.writer.write_all(&hdr.to_bytes()).ok()?;
        self.writer.write_all(payload).ok()?;
        u32::try_from(self.writer.bytes_written()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_its_wire_form() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 9,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 77,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn header_fields_sit_at_their_wire_offsets() {
        let h = Header {
            dst_port: 0x0102_0304,
            op: op::SHUTDOWN,
            ..Header::default()
        };
        let b = h.to_bytes();
        assert_eq!(&b[20..24], &[4, 3, 2, 1]);
        assert_eq!(&b[30..32], &[4, 0]);
    }
}
