//! CPUID filtering: what the guest is told about its CPU, decided here on purpose.
//!
//! Always: the APIC id and the "running under a hypervisor" bit are set per vCPU.
//! With the nested-PVM workarounds (see guest-kernel/NOTES.md): instructions that the PVM host
//! cannot emulate at guest CPL0 are hidden, so a guest kernel never picks them:
//! `cmpxchg16b` (CX16), `xsave`/`xrstor` (XSAVE, OSXSAVE and the AVX family that needs it,
//! leaf 0xd dropped), `clac`/`stac` (SMAP), plus SMEP, FSGSBASE, PCID, INVPCID and PKU, and the
//! vendor is reported as GenuineIntel (Linux's AMD-only FPU path uses `fnclex`); POPCNT is
//! hidden too (Linux's `popcnt` alternative failed emulation at CPL0 here).
//!
//! Measured on this project's nested PVM host (probe guest, `probe.cpuid=1`): KVM_SET_CPUID2
//! takes effect for the vendor string and CX16, but the guest still sees XSAVE, AVX, FMA,
//! POPCNT and every leaf-7 bit (SMAP, SMEP, FSGSBASE, ...). A Linux guest there therefore also
//! needs [`PVM_CMDLINE`] on its command line, which the VMM appends with the CPUID workarounds:
//! the host's needs are the VMM's to know, not every caller's.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bits.
mod leaf1_ecx {
    pub const CX16: u32 = 1 << 13;
    pub const PCID: u32 = 1 << 17;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const FMA: u32 = 1 << 12;
    pub const POPCNT: u32 = 1 << 23;
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 7 subleaf 0 EBX bits.
mod leaf7_ebx {
    pub const FSGSBASE: u32 = 1 << 0;
    pub const AVX2: u32 = 1 << 5;
    pub const SMEP: u32 = 1 << 7;
    pub const INVPCID: u32 = 1 << 10;
    pub const AVX512_MASK: u32 = (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31);
    pub const SMAP: u32 = 1 << 20;
}

/// Leaf 7 subleaf 0 ECX bits.
mod leaf7_ecx {
    pub const PKU: u32 = 1 << 3;
    pub const OSPKE: u32 = 1 << 4;
    pub const AVX512_MASK: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
}

/// "GenuineIntel" as leaf 0 returns it in EBX, EDX, ECX.
const INTEL_VENDOR: (u32, u32, u32) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e);

/// The choices that shape the CPUID a vCPU sees.
#[derive(Debug, Clone, Copy)]
pub struct CpuidPolicy {
    /// This vCPU's index, which becomes its APIC id.
    pub vcpu_index: u8,
    /// Total vCPUs.
    pub vcpu_count: u8,
    /// Apply the nested-PVM workarounds.
    pub pvm_workarounds: bool,
}

/// Applies `policy` to the entries KVM says it supports.
pub fn filter(entries: &mut [kvm_cpuid_entry2], policy: CpuidPolicy) {
    for e in entries.iter_mut() {
        match e.function {
            0 if policy.pvm_workarounds => {
                (e.ebx, e.edx, e.ecx) = INTEL_VENDOR;
            }
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(policy.vcpu_index) << 24)
                    | (u32::from(policy.vcpu_count) << 16);
                e.ecx |= leaf1_ecx::HYPERVISOR;
                if policy.pvm_workarounds {
                    e.ecx &= !(leaf1_ecx::CX16
                        | leaf1_ecx::POPCNT
                        | leaf1_ecx::PCID
                        | leaf1_ecx::XSAVE
                        | leaf1_ecx::OSXSAVE
                        | leaf1_ecx::AVX
                        | leaf1_ecx::F16C
                        | leaf1_ecx::FMA);
                }
            }
            7 if e.index == 0 && policy.pvm_workarounds => {
                e.ebx &= !(leaf7_ebx::FSGSBASE
                    | leaf7_ebx::AVX2
                    | leaf7_ebx::SMEP
                    | leaf7_ebx::INVPCID
                    | leaf7_ebx::SMAP
                    | leaf7_ebx::AVX512_MASK);
                e.ecx &= !(leaf7_ecx::PKU | leaf7_ecx::OSPKE | leaf7_ecx::AVX512_MASK);
            }
            0xb | 0x1f => {
                e.edx = u32::from(policy.vcpu_index);
            }
            0xd if policy.pvm_workarounds => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// What a Linux guest must also be told on a nested PVM host, because KVM_SET_CPUID2 alone does
/// not hide those features there: appended to the guest's command line whenever the
/// workarounds are on.
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=smap,smep,fsgsbase,pcid,invpcid,popcnt";

/// Whether the nested-PVM workarounds apply: `auto` asks the host (before any jail hides
/// `/sys`).
pub fn pvm_workarounds(toggle: crate::config::Toggle) -> bool {
    use crate::config::Toggle;
    match toggle {
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => moat_host_probe::kvm_flavour() == moat_host_probe::KvmFlavour::NestedPvm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    fn pvm(on: bool) -> CpuidPolicy {
        CpuidPolicy {
            vcpu_index: 2,
            vcpu_count: 4,
            pvm_workarounds: on,
        }
    }

    #[test]
    fn pvm_workarounds_hide_cx16_and_xsave() {
        let mut e = [entry(1, 0, u32::MAX)];
        filter(&mut e, pvm(true));
        assert_eq!(e[0].ecx & leaf1_ecx::CX16, 0);
        assert_eq!(e[0].ecx & leaf1_ecx::XSAVE, 0);
        assert_eq!(e[0].ecx & leaf1_ecx::AVX, 0);
    }

    #[test]
    fn pvm_workarounds_hide_smap_smep_fsgsbase() {
        let mut e = [entry(7, 0, u32::MAX)];
        filter(&mut e, pvm(true));
        let hidden = leaf7_ebx::SMAP | leaf7_ebx::SMEP | leaf7_ebx::FSGSBASE | leaf7_ebx::INVPCID;
        assert_eq!(e[0].ebx & hidden, 0);
    }

    #[test]
    fn pvm_workarounds_report_intel() {
        let mut e = [entry(0, 0, 0)];
        filter(&mut e, pvm(true));
        assert_eq!((e[0].ebx, e[0].edx, e[0].ecx), INTEL_VENDOR);
    }

    #[test]
    fn without_workarounds_cx16_stays() {
        let mut e = [entry(1, 0, u32::MAX)];
        filter(&mut e, pvm(false));
        assert_ne!(e[0].ecx & leaf1_ecx::CX16, 0);
    }

    #[test]
    fn apic_id_is_the_vcpu_index() {
        let mut e = [entry(1, 0, 0)];
        filter(&mut e, pvm(false));
        assert_eq!(e[0].ebx >> 24, 2);
        assert_ne!(e[0].ecx & leaf1_ecx::HYPERVISOR, 0);
    }
}
