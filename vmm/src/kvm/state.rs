//! What KVM holds of a machine, read out of a paused VM and written back into a new one: per
//! vCPU the registers, special registers, XSAVE area (FPU, SSE, AVX), XCRs, debug registers,
//! local APIC, MSRs, pending events and MP state; per VM the in-kernel irqchip (both PICs and
//! the IOAPIC), the PIT and the kvmclock.
//!
//! Restore order follows what KVM needs (and Firecracker does): CPUID first (it decides which
//! MSRs and XSAVE components exist), MP state, registers, special registers, XSAVE, XCRs,
//! debug registers, LAPIC, MSRs, then the events (a pending exception or NMI refers to all
//! of the above).
//!
//! The local APIC timer in TSC-deadline mode needs two things KVM does not do for us:
//!
//! - `IA32_TSC_DEADLINE` is written after `IA32_TSC`: KVM arms the timer by comparing the
//!   deadline with the guest's TSC, so a deadline written first is compared with a TSC that is
//!   not the guest's yet and the timer may never fire.
//! - A deadline of 0 read from a paused vCPU is saved as the TSC instead: KVM clears the
//!   deadline when the timer fires, but a vCPU that was paused before it entered the guest
//!   again still holds that interrupt outside the LAPIC registers KVM_GET_LAPIC returns. Saved
//!   as 0, the restored guest waits for a tick that never comes (and, tickless, sleeps
//!   forever); saved as "now", the timer fires at once and the guest programs the next. An
//!   extra timer interrupt is harmless: Linux re-reads its clock and reprograms.

use kvm_bindings::{
    CpuId, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Size of the legacy XSAVE area KVM_GET_XSAVE returns; a host whose XSAVE state is larger
/// (AMX) needs KVM_GET_XSAVE2, which snapshots do not use yet.
pub const XSAVE_LEGACY_BYTES: usize = 4096;

/// Why a state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than asked.
    #[error("KVM refused MSR {index:#x} ({set} of {total} set)")]
    Msr {
        /// The first refused MSR.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were asked.
        total: usize,
    },
    /// The host's XSAVE area is larger than the legacy one.
    #[error("this host's XSAVE state is {0} bytes (AMX?); snapshots handle at most 4096")]
    XsaveTooLarge(usize),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { what, source }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID it was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets us read, in index-list order.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base, pending interrupt bitmap.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX.
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers (its timer included).
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

/// `IA32_TSC`: the guest's time-stamp counter.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: when the LAPIC timer fires, in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// A saved deadline of 0 (a timer that fired while the vCPU was paused, its interrupt not yet
/// in the LAPIC) becomes the TSC it was saved with, so the restored timer fires at once.
fn arm_zero_deadline(msrs: &mut [kvm_msr_entry]) {
    let Some(tsc) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
    else {
        return;
    };
    for m in msrs.iter_mut() {
        if m.index == MSR_IA32_TSC_DEADLINE && m.data == 0 {
            m.data = tsc;
        }
    }
}

/// The MSRs in the order they are written back: all but `IA32_TSC_DEADLINE`, then it (KVM
/// compares it with the guest's TSC, which must be restored first).
fn restore_order(msrs: &[kvm_msr_entry]) -> [Vec<kvm_msr_entry>; 2] {
    let (deadline, rest) = msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    [rest, deadline]
}

/// Reads every MSR of `indices` that KVM returns: KVM_GET_MSRS stops at the first it cannot
/// read, so that one is skipped and the rest read again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msr {
            index: rest.first().copied().unwrap_or(0),
            set: 0,
            total: rest.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice().iter().take(n).copied());
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

impl VcpuState {
    /// Reads `fd`'s state; `cpuid` is what it was given, `msr_indices` the host's MSR list.
    pub fn save(fd: &VcpuFd, cpuid: &CpuId, msr_indices: &[u32]) -> Result<Self, Error> {
        let mut msrs = read_msrs(fd, msr_indices)?;
        arm_zero_deadline(&mut msrs);
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// The CPUID to give the new vCPU (before anything else).
    pub fn cpuid(&self) -> Result<CpuId, Error> {
        CpuId::from_entries(&self.cpuid).map_err(|_| Error::Ioctl {
            what: "CPUID (too many entries)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })
    }

    /// Writes everything but CPUID into `fd` (whose CPUID is already set), on a host whose
    /// XSAVE area is `xsave_size` bytes.
    pub fn restore(&self, fd: &VcpuFd, xsave_size: usize) -> Result<(), Error> {
        if xsave_size > XSAVE_LEGACY_BYTES {
            return Err(Error::XsaveTooLarge(xsave_size));
        }
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: KVM_SET_XSAVE reads as many bytes as the host's XSAVE area, which was checked
        // above to fit the 4096-byte `kvm_xsave` handed over.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        for msrs in restore_order(&self.msrs) {
            if msrs.is_empty() {
                continue;
            }
            let entries = Msrs::from_entries(&msrs).map_err(|_| Error::Msr {
                index: 0,
                set: 0,
                total: msrs.len(),
            })?;
            let set = fd.set_msrs(&entries).map_err(ioctl("KVM_SET_MSRS"))?;
            if set != msrs.len() {
                return Err(Error::Msr {
                    index: msrs.get(set).map_or(0, |e| e.index),
                    set,
                    total: msrs.len(),
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }
}

/// The VM-wide state KVM keeps in the kernel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT's three channels.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Reads the irqchip, PIT and clock of `vm` (whose vCPUs are paused).
    pub fn save(vm: &VmFd) -> Result<Self, Error> {
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(ioctl("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let mut clock = vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        // Whether the TSC is stable is the new host's to say, not ours.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(Self {
            irqchips,
            pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Writes it into `vm`, whose irqchip and PIT exist.
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn a_zero_deadline_is_saved_as_the_tsc_and_a_set_one_is_kept() {
        let mut fired = [
            msr(MSR_IA32_TSC, 5_000),
            msr(0x1b, 7),
            msr(MSR_IA32_TSC_DEADLINE, 0),
        ];
        arm_zero_deadline(&mut fired);
        assert_eq!(fired.map(|m| m.data), [5_000, 7, 5_000]);
        let mut armed = [msr(MSR_IA32_TSC_DEADLINE, 9_000), msr(MSR_IA32_TSC, 5_000)];
        arm_zero_deadline(&mut armed);
        assert_eq!(armed.map(|m| m.data), [9_000, 5_000]);
        // Without a TSC there is nothing to arm it with.
        let mut alone = [msr(MSR_IA32_TSC_DEADLINE, 0)];
        arm_zero_deadline(&mut alone);
        assert_eq!(alone[0].data, 0);
    }

    #[test]
    fn the_deadline_is_restored_after_the_tsc_whatever_order_kvm_listed_them_in() {
        let saved = [
            msr(0x1b, 1),
            msr(MSR_IA32_TSC_DEADLINE, 2),
            msr(0xc000_0080, 3),
            msr(MSR_IA32_TSC, 4),
        ];
        let [first, then] = restore_order(&saved);
        let indices = |v: &[kvm_msr_entry]| v.iter().map(|m| m.index).collect::<Vec<_>>();
        assert_eq!(indices(&first), [0x1b, 0xc000_0080, MSR_IA32_TSC]);
        assert_eq!(indices(&then), [MSR_IA32_TSC_DEADLINE]);
        assert_eq!(then[0].data, 2);
    }
}
