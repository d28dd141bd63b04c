//! An interrupt descriptor table, loaded first thing, so that nothing the CPU delivers can
//! triple-fault the probe silently.
//!
//! The probe runs with interrupts disabled (IF = 0, as the PVH entry leaves them) and reads
//! delivered MSIs from the local APIC's IRR instead of taking them, so no maskable interrupt
//! reaches a gate. What IF does not mask still can: an NMI, or an exception (a fault in the
//! probe, or one that a hypervisor injects). Without an IDT (the PVH entry leaves none) each of
//! those ends in a triple fault, which shows up as a guest crash with no clue. Here every
//! vector has a gate: an NMI is counted and returns; anything else prints
//! `probe: FAIL exception <vector> error <code> rip <address>` and resets.

use core::fmt::Write;

use crate::io::Serial;

core::arch::global_asm!(
    r#"
    .pushsection .text.probe_idt, "ax"
    .balign 16
    .global probe_idt_stubs
probe_idt_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    push $vec
    jmp probe_idt_common
    .set vec, vec + 1
    .endr

probe_idt_common:
    cmpq $2, (%rsp)
    je 1f
    mov %rsp, %rdi
    and $-16, %rsp
    call probe_exception
1:
    lock incq probe_nmi_count(%rip)
    add $8, %rsp
    iretq
    .popsection
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static probe_idt_stubs: u8;
}

/// NMIs taken so far.
#[unsafe(no_mangle)]
static mut probe_nmi_count: u64 = 0;

/// Sixteen bytes per gate, 256 gates.
static mut IDT: [u64; 512] = [0; 512];

/// Vectors for which the CPU pushes an error code.
fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The common gate for everything but NMIs: `frame` points at the vector the stub pushed,
/// then the error code (for vectors with one) and the CPU's interrupt frame.
#[unsafe(no_mangle)]
extern "C" fn probe_exception(frame: *const u64) -> ! {
    // SAFETY: the stub and the CPU pushed at least the vector, an optional error code and five
    // words of interrupt frame at `frame`.
    let (vector, error, rip) = unsafe {
        let vector = frame.read();
        if has_error_code(vector) {
            (vector, frame.add(1).read(), frame.add(2).read())
        } else {
            (vector, 0, frame.add(1).read())
        }
    };
    let _ = writeln!(
        Serial,
        "probe: FAIL exception {vector} error {error:#x} rip {rip:#x}"
    );
    crate::io::i8042_reset()
}

/// Builds the IDT (interrupt gates in the 64-bit code segment, 0x08) and loads it.
pub fn load() {
    // SAFETY: the stubs are 16 bytes apart (`.balign 16`); only this function touches `IDT`
    // and it runs once, before anything could be delivered through it.
    unsafe {
        let stubs = &raw const probe_idt_stubs as u64;
        let idt = &raw mut IDT;
        for v in 0..256 {
            let addr = stubs + 16 * v as u64;
            (*idt)[2 * v] = (addr & 0xffff) | 0x08 << 16 | 0x8e << 40 | (addr >> 16 & 0xffff) << 48;
            (*idt)[2 * v + 1] = addr >> 32;
        }
        let mut descriptor = [0u16; 5];
        descriptor[0] = 16 * 256 - 1;
        let base = idt as u64;
        descriptor[1] = base as u16;
        descriptor[2] = (base >> 16) as u16;
        descriptor[3] = (base >> 32) as u16;
        descriptor[4] = (base >> 48) as u16;
        core::arch::asm!("lidt [{0}]", in(reg) descriptor.as_ptr(), options(nostack));
    }
}

/// How many NMIs the probe has taken.
pub fn nmis() -> u64 {
    // SAFETY: a plain read of a counter only the NMI gate writes.
    unsafe { (&raw const probe_nmi_count).read_volatile() }
}
