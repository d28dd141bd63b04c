//! The PVH entry: 32-bit protected mode, paging off, `%ebx` = physical address of
//! `hvm_start_info`. Turns on long mode with identity-mapped 2 MiB pages over the first 4 GiB
//! (tables are static data, so the guest runs only a handful of kernel-mode instructions here,
//! which matters on hosts that emulate guest kernel mode), then calls `probe_main`.

core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4
    .popsection

    .pushsection .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 3
    .fill 511, 8, 0
pdpt:
    .quad pd + 3
    .quad pd + 0x1000 + 3
    .quad pd + 0x2000 + 3
    .quad pd + 0x3000 + 3
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .quad (i << 21) | 0x83
    .set i, i + 1
    .endr
gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .popsection

    .pushsection .bss.stack, "aw", @nobits
    .balign 16
stack_bottom:
    .fill 65536, 1, 0
stack_top:
    .popsection

    .pushsection .text.pvh_start, "ax"
    .code32
    .global pvh_start
pvh_start:
    mov %ebx, %esi
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_mode
    .code64
long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %rsp
    mov %esi, %edi
    call probe_main
1:
    hlt
    jmp 1b
    .popsection
"#,
    options(att_syntax)
);
