//! Snapshots: the whole machine's state in one small file, guest memory in another.
//!
//! `DIR/state` is `MAGIC`, the format version (u32, little-endian), then a postcard-encoded
//! [`Header`] and [`MachineState`], each preceded by its length, then a CRC-32 of everything
//! before it. A reader checks, in this order: the magic, the format version, the checksum,
//! the moat-vmm version and the host CPU; only then does it decode the machine state. So a
//! file from another moat-vmm, another CPU or a bit flip is refused with an error naming
//! which, before anything of it reaches KVM.
//!
//! `DIR/memory` is guest RAM, region after region at the offsets the state lists, written
//! sparsely (pages of zeros are holes). A restore maps it `MAP_PRIVATE`: the guest reads the
//! file through the page cache and copies a page only when it writes it, so a restore costs
//! what the guest touches, and forks of one snapshot share every page neither has written.
//! The memory file is not checksummed (reading it whole would undo the lazy restore); its
//! length is checked against the state.

use std::fs::File;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::TransportState;
use crate::kvm::state::{VcpuState, VmState};

/// First bytes of a state file.
pub const MAGIC: [u8; 8] = *b"MOATSNAP";
/// The layout of the state file; bumped on any change to what follows the magic.
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file read (the state of a few vCPUs and devices is tens of KiB).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Why a snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a snapshot file.
    #[error("snapshot I/O")]
    Io(#[from] std::io::Error),
    /// The file does not start with the magic.
    #[error("not a moat-vmm snapshot (bad magic)")]
    Magic,
    /// Another layout of the state file.
    #[error("snapshot format version {found}, this moat-vmm reads only version {FORMAT_VERSION}")]
    Format {
        /// The file's version.
        found: u32,
    },
    /// The checksum does not match: the file is corrupt or truncated.
    #[error("snapshot state is corrupt (checksum {found:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored.
        found: u32,
        /// Computed.
        computed: u32,
    },
    /// The file is shorter than its lengths say, or longer than any state.
    #[error("snapshot state is truncated or oversized")]
    Length,
    /// Written by another moat-vmm.
    #[error("snapshot was taken by moat-vmm {found}; this is moat-vmm {ours}")]
    VmmVersion {
        /// The file's.
        found: String,
        /// Ours.
        ours: String,
    },
    /// Taken on another CPU.
    #[error("snapshot was taken on another host CPU ({found}); this host is {ours}")]
    Cpu {
        /// The file's.
        found: String,
        /// Ours.
        ours: String,
    },
    /// Encoding or decoding failed.
    #[error("snapshot state does not decode")]
    Codec(#[from] postcard::Error),
}

/// The host CPU as KVM presents it to guests: what a snapshot's vCPU state depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    /// CPUID leaf 0's vendor string.
    pub vendor: String,
    /// CPUID leaf 1's EAX: family, model, stepping.
    pub signature: u32,
    /// CRC-32 of every entry of KVM_GET_SUPPORTED_CPUID (the features a guest may see).
    pub features: u32,
}

impl std::fmt::Display for CpuIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} signature {:#x} features {:#010x}",
            self.vendor, self.signature, self.features
        )
    }
}

impl CpuIdentity {
    /// The identity of the CPUID entries KVM supports on this host. The digest covers the
    /// feature words a guest's saved state can depend on (leaf 1 ECX/EDX, leaf 7, the XSAVE
    /// leaf's components, the extended features, the address sizes), and nothing that names
    /// the CPU the ioctl happened to run on (leaf 1 EBX holds its APIC id, as do leaves 0xB,
    /// 0x1F and 0x8000_001E): two processes on one host agree.
    pub fn from_supported(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Self {
        let mut sorted: Vec<_> = entries.iter().collect();
        sorted.sort_by_key(|e| (e.function, e.index));
        let mut crc = crc32fast::Hasher::new();
        let mut vendor = String::new();
        let mut signature = 0;
        for e in sorted {
            let words: &[u32] = match e.function {
                0 => {
                    for word in [e.ebx, e.edx, e.ecx] {
                        vendor.extend(word.to_le_bytes().iter().map(|b| char::from(*b)));
                    }
                    &[]
                }
                1 => {
                    signature = e.eax;
                    &[e.ecx, e.edx]
                }
                7 => &[e.ebx, e.ecx, e.edx],
                0xd if e.index <= 1 => &[e.eax, e.edx],
                0x8000_0001 => &[e.ecx, e.edx],
                0x8000_0008 => &[e.eax & 0xffff],
                _ => &[],
            };
            if !words.is_empty() {
                crc.update(&e.function.to_le_bytes());
                crc.update(&e.index.to_le_bytes());
            }
            for w in words {
                crc.update(&w.to_le_bytes());
            }
        }
        Self {
            vendor,
            signature,
            features: crc.finalize(),
        }
    }
}

/// Who wrote the snapshot, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// moat-vmm's version.
    pub vmm_version: String,
    /// The host CPU.
    pub cpu: CpuIdentity,
}

impl Header {
    /// This moat-vmm on a host with `cpu`.
    pub fn ours(cpu: CpuIdentity) -> Self {
        Self {
            vmm_version: env!("CARGO_PKG_VERSION").to_owned(),
            cpu,
        }
    }
}

/// Where one region of guest RAM lies in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// The COM1 16550's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Everything of a paused machine but its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM in bytes (the configuration's).
    pub mem_bytes: u64,
    /// RAM regions and where each lies in the memory file.
    pub regions: Vec<RegionState>,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialState,
    /// Each virtio-mmio transport and its device's queues, in slot order.
    pub devices: Vec<TransportState>,
}

impl MachineState {
    /// Bytes the memory file must hold.
    pub fn memory_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset.saturating_add(r.len))
            .max()
            .unwrap_or(0)
    }
}

/// Writes the state file.
pub fn write_state(
    out: &mut impl Write,
    header: &Header,
    state: &MachineState,
) -> Result<(), Error> {
    let header = postcard::to_stdvec(header)?;
    let body = postcard::to_stdvec(state)?;
    let mut buf = Vec::with_capacity(header.len() + body.len() + 32);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(&body);
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    out.write_all(&buf)?;
    Ok(())
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], Error> {
    if rest.len() < n {
        return Err(Error::Length);
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u64(rest: &mut &[u8]) -> Result<usize, Error> {
    let b = take(rest, 8)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    usize::try_from(u64::from_le_bytes(w)).map_err(|_| Error::Length)
}

/// Reads and checks a state file written on a host whose CPU is `cpu`.
pub fn read_state(file: &mut File, cpu: &CpuIdentity) -> Result<MachineState, Error> {
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
    decode_state(&bytes, cpu)
}

/// Checks and decodes a state file's bytes (see the module's order of checks).
pub fn decode_state(bytes: &[u8], cpu: &CpuIdentity) -> Result<MachineState, Error> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(Error::Length);
    }
    let mut rest = bytes;
    if take(&mut rest, MAGIC.len()).map_err(|_| Error::Magic)? != MAGIC {
        return Err(Error::Magic);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(take(&mut rest, 4)?);
    let found = u32::from_le_bytes(v);
    if found != FORMAT_VERSION {
        return Err(Error::Format { found });
    }
    let (covered, stored) = bytes.split_last_chunk::<4>().ok_or(Error::Length)?;
    let found = u32::from_le_bytes(*stored);
    let computed = crc32fast::hash(covered);
    if found != computed {
        return Err(Error::Checksum { found, computed });
    }
    let mut rest = covered.get(MAGIC.len() + 4..).ok_or(Error::Length)?;
    let n = take_u64(&mut rest)?;
    let header: Header = postcard::from_bytes(take(&mut rest, n)?)?;
    let ours = Header::ours(cpu.clone());
    if header.vmm_version != ours.vmm_version {
        return Err(Error::VmmVersion {
            found: header.vmm_version,
            ours: ours.vmm_version,
        });
    }
    if header.cpu != *cpu {
        return Err(Error::Cpu {
            found: header.cpu.to_string(),
            ours: cpu.to_string(),
        });
    }
    let n = take_u64(&mut rest)?;
    let body = take(&mut rest, n)?;
    if !rest.is_empty() {
        return Err(Error::Length);
    }
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cpu() -> CpuIdentity {
        CpuIdentity {
            vendor: "AuthenticAMD".to_owned(),
            signature: 0x00a0_0f11,
            features: 0x1234_5678,
        }
    }

    fn state() -> MachineState {
        MachineState {
            mem_bytes: 64 << 20,
            regions: vec![RegionState {
                guest_addr: 0,
                len: 64 << 20,
                file_offset: 0,
            }],
            vcpus: Vec::new(),
            vm: VmState::default(),
            serial: SerialState {
                scratch: 7,
                in_buffer: vec![b'x'],
                ..SerialState::default()
            },
            devices: Vec::new(),
        }
    }

    fn encoded(header: &Header) -> Vec<u8> {
        let mut buf = Vec::new();
        write_state(&mut buf, header, &state()).unwrap();
        buf
    }

    #[test]
    fn a_state_file_round_trips() {
        let back = decode_state(&encoded(&Header::ours(cpu())), &cpu()).unwrap();
        assert_eq!(back.mem_bytes, 64 << 20);
        assert_eq!(back.serial.scratch, 7);
        assert_eq!(back.serial.in_buffer, b"x");
        assert_eq!(back.memory_len(), 64 << 20);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let good = encoded(&Header::ours(cpu()));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode_state(&bad, &cpu()).is_err(), "byte {i}");
        }
    }

    #[test]
    fn a_corrupt_body_is_refused_as_a_checksum_error() {
        let mut bad = encoded(&Header::ours(cpu()));
        let mid = bad.len() - 10;
        bad[mid] ^= 1;
        assert!(matches!(
            decode_state(&bad, &cpu()),
            Err(Error::Checksum { .. })
        ));
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let good = encoded(&Header::ours(cpu()));
        for n in [0, 4, 12, good.len() / 2, good.len() - 1] {
            assert!(decode_state(&good[..n], &cpu()).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let mut bad = encoded(&Header::ours(cpu()));
        bad[8] = 9;
        let e = decode_state(&bad, &cpu()).unwrap_err();
        assert!(matches!(e, Error::Format { found: 9 }), "{e}");
    }

    #[test]
    fn a_snapshot_from_another_moat_vmm_is_refused() {
        let mut h = Header::ours(cpu());
        h.vmm_version = "0.0.0-other".to_owned();
        let e = decode_state(&encoded(&h), &cpu()).unwrap_err();
        assert!(e.to_string().contains("moat-vmm 0.0.0-other"), "{e}");
    }

    #[test]
    fn a_snapshot_from_another_cpu_is_refused() {
        let mut other = cpu();
        other.signature = 0x0080_6f10;
        let e = decode_state(&encoded(&Header::ours(other)), &cpu()).unwrap_err();
        assert!(matches!(e, Error::Cpu { .. }), "{e}");
        assert!(e.to_string().contains("another host CPU"), "{e}");
    }

    fn entry(function: u32, ebx: u32, ecx: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        kvm_bindings::kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn the_cpu_identity_ignores_which_cpu_answered_but_not_its_features() {
        // Leaf 1 EBX bits 31:24: the APIC id of the CPU the ioctl ran on.
        let on_cpu0 = CpuIdentity::from_supported(&[entry(1, 0x0000_0800, 0x8000_0001)]);
        let on_cpu1 = CpuIdentity::from_supported(&[entry(1, 0x0100_0800, 0x8000_0001)]);
        assert_eq!(on_cpu0, on_cpu1);
        let fewer = CpuIdentity::from_supported(&[entry(1, 0x0000_0800, 0x0000_0001)]);
        assert_ne!(on_cpu0, fewer);
    }

    #[test]
    fn something_else_is_not_a_snapshot() {
        let e = decode_state(b"#!/bin/sh\necho hi\n", &cpu()).unwrap_err();
        assert!(matches!(e, Error::Magic), "{e}");
    }
}
