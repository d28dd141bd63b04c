//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs, its
//! IOAPIC and how ISA interrupts are wired. Without it Linux finds neither and runs every
//! interrupt through the PIC on one CPU. Written at the start of the EBDA (`0x9fc00`), which the
//! memory map reserves and Linux scans.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// The local APIC base every vCPU sees.
pub const APIC_BASE: u32 = 0xfee0_0000;
/// The in-kernel IOAPIC's base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
/// Most vCPUs the table describes (the IOAPIC id follows the APIC ids).
pub const MAX_CPUS: u8 = 254;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit an MP table")]
    TooManyCpus(u8),
    /// The table does not fit below 640 KiB.
    #[error("the MP table does not fit in the EBDA")]
    TooBig,
    /// Guest memory refused the write.
    #[error("cannot write the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` vCPUs, placed at `base`: floating pointer, then the
/// configuration table.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = if cpu == 0 { 0b11 } else { 0b01 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, cpu, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Plain vectored interrupts, conforming polarity and trigger (ISA: edge, high), pin = IRQ.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let config_addr = base + 16;
    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    let len = u16::try_from(44 + entries.len()).map_err(|_| Error::TooBig)?;
    config.extend_from_slice(&len.to_le_bytes());
    config.extend_from_slice(&[4, 0]); // spec 1.4, checksum below
    config.extend_from_slice(b"MOAT    ");
    config.extend_from_slice(b"MOAT-VMM    ");
    config.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    config.extend_from_slice(&0u16.to_le_bytes());
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&APIC_BASE.to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(
        &u32::try_from(config_addr)
            .map_err(|_| Error::TooBig)?
            .to_le_bytes(),
    );
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4, checksum, features
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&config);
    Ok(fp)
}

/// Writes the table for `cpus` vCPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let table = build(cpus, layout::EBDA_START)?;
    if layout::EBDA_START + table.len() as u64 > 0xa_0000 {
        return Err(Error::TooBig);
    }
    mem.write_slice(&table, GuestAddress(layout::EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn both_checksums_add_up_to_zero() {
        let t = build(4, 0x9fc00).unwrap_or_default();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let len = usize::from(u16::from_le_bytes([t[16 + 4], t[16 + 5]]));
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert_eq!(t.len(), 16 + len);
    }

    #[test]
    fn floating_pointer_points_at_the_config_table() {
        let t = build(1, 0x9fc00).unwrap_or_default();
        assert_eq!(u32::from_le_bytes([t[4], t[5], t[6], t[7]]), 0x9fc10);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_cpu0_boots() {
        let t = build(3, 0x9fc00).unwrap_or_default();
        let entries = &t[16 + 44..];
        let cpus: Vec<(u8, u8)> = entries.chunks(20).take(3).map(|e| (e[1], e[3])).collect();
        assert_eq!(cpus, vec![(0, 0b11), (1, 0b01), (2, 0b01)]);
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(build(0, 0x9fc00).is_err());
        assert!(build(255, 0x9fc00).is_err());
    }

    #[test]
    fn table_for_the_largest_vm_fits_the_ebda() {
        let t = build(32, layout::EBDA_START).unwrap_or_default();
        assert!(layout::EBDA_START + t.len() as u64 <= 0xa_0000);
    }
}
