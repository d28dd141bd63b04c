//! Port I/O: the 16550 serial port at 0x3f8 (polled, both ways) and the i8042 reset line.

use core::arch::asm;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;

/// One byte from COM1's receive buffer, polling the data-ready bit at most `max_polls` times
/// (each poll is a port exit: the VMM's console input thread fills the FIFO meanwhile).
pub fn read_byte(max_polls: u32) -> Option<u8> {
    for _ in 0..max_polls {
        if inb(LSR) & LSR_DATA_READY != 0 {
            return Some(inb(COM1));
        }
    }
    None
}

/// The time-stamp counter: wall-clock time in cycles, whatever the emulation costs.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC into two registers; touches no memory.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O in a guest we own; the VMM decides what the port does.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Polled writes to COM1.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            let mut spins = 0u32;
            while inb(LSR) & LSR_THR_EMPTY == 0 && spins < 1000 {
                spins += 1;
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Pulses the CPU reset line through the i8042 controller: moat-vmm treats it as shutdown.
pub fn i8042_reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting is always sound; the VMM should have stopped us already.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Loads an empty IDT and raises #UD: no handler, so #DF, then a triple fault.
pub fn triple_fault() -> ! {
    let idt = [0u16; 5];
    // SAFETY: deliberately crashes the guest; the VMM must report a guest crash.
    unsafe { asm!("lidt [{0}]", "ud2", in(reg) idt.as_ptr(), options(noreturn)) }
}

/// Interrupts off, halt forever: only the VMM's timeout ends this.
pub fn hang() -> ! {
    loop {
        // SAFETY: halting with interrupts off is sound; it never returns.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// `cpuid` (leaf, subleaf) -> (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}
