//! The KVM side: the VM file descriptor, guest memory registration, the in-kernel interrupt
//! controller and timer, and vCPUs. This module and its children are the only places in the
//! VMM allowed `unsafe` (KVM memory-slot registration hands the kernel a host pointer).
//!
//! Interrupts and timers: the VM gets KVM's in-kernel irqchip (a PIC, an IOAPIC and a local
//! APIC per vCPU) and the in-kernel PIT. Devices raise interrupts through irqfds (an eventfd
//! per GSI), so a device thread never takes a vCPU lock to interrupt the guest. The in-kernel
//! choice keeps HLT, the APIC timer and EOIs inside KVM: on a nested host every exit to user
//! space is expensive. The PIT is there because Linux calibrates its TSC and APIC timer against
//! it when no other reference is offered (Firecracker makes the same choice).

pub mod irq;
pub mod state;
pub mod vcpu;

use std::sync::Arc;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

/// Errors from KVM setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR or KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("cannot place KVM's TSS or identity map")]
    SetTss(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create the in-kernel interrupt controller")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// A guest memory region has no host address.
    #[error("guest memory region has no host mapping")]
    HostAddress(#[source] vm_memory::GuestMemoryError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory with KVM")]
    SetMemoryRegion(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("cannot register irqfd for GSI {gsi}")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD failed.
    #[error("cannot register ioeventfd at {addr:#x}")]
    RegisterIoevent {
        /// The MMIO address.
        addr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A snapshot's VM state (irqchip, PIT, clock) could not be written.
    #[error("cannot restore the VM's interrupt controllers and clock")]
    Restore(#[source] state::Error),
    /// A vCPU could not be created or configured.
    #[error("cannot set up vCPU {index}")]
    Vcpu {
        /// Which vCPU.
        index: u8,
        /// Why.
        #[source]
        source: vcpu::Error,
    },
}

/// A KVM virtual machine with its memory registered and its interrupt controller created.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram_slots: u32,
    /// MSRs a vCPU snapshot reads: KVM_GET_MSR_INDEX_LIST, read once before any filter.
    msr_indices: Arc<Vec<u32>>,
}

impl Vm {
    /// Opens /dev/kvm (done before any jail; the fd is all the VMM keeps).
    pub fn open_kvm() -> Result<Kvm, Error> {
        Kvm::new().map_err(Error::OpenKvm)
    }

    /// Creates the VM on `kvm`, its irqchip and PIT, and registers `mem`. This runs after the
    /// jail: a KVM VM belongs to the address space that created it, and the jail forks.
    pub fn new(kvm: Kvm, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        let tss = usize::try_from(layout::KVM_TSS_ADDR).unwrap_or(usize::MAX);
        fd.set_tss_address(tss).map_err(Error::SetTss)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(Error::SetTss)?;
        fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::CreatePit)?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let mut vm = Self {
            kvm,
            fd: Arc::new(fd),
            ram_slots: 0,
            msr_indices: Arc::new(msr_indices),
        };
        vm.ram_slots = vm.register_memory(mem)?;
        Ok(vm)
    }

    /// The VM fd, shared with the MSI router and the BAR mapper.
    pub fn fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The guest's physical address width: CPUID 0x8000_0008 EAX bits 7:0 as KVM passes it on
    /// (the host's), 36 if KVM does not say.
    pub fn guest_phys_bits(&self) -> u8 {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .ok()
            .and_then(|c| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == 0x8000_0008)
                    .and_then(|e| u8::try_from(e.eax & 0xff).ok())
            })
            .filter(|b| (32..=57).contains(b))
            .unwrap_or(36)
    }

    /// The first memory slot after guest RAM's.
    pub fn first_free_slot(&self) -> u32 {
        self.ram_slots
    }

    fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<u32, Error> {
        let mut count = 0;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(Error::HostAddress)?;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `mem`. The caller keeps `mem` alive for as long as the VM runs (the Vmm holds
            // both, and the process exits rather than dropping the memory under a vCPU), and
            // slots are distinct and never overlap because vm-memory refuses overlapping regions.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(Error::SetMemoryRegion)?;
            count = slot + 1;
        }
        Ok(count)
    }

    /// Routes `evt` to guest interrupt `gsi` through the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::RegisterIrqfd { gsi, source })
    }

    /// Has KVM itself signal `evt` when the guest writes the 32-bit value `datamatch` to MMIO
    /// address `addr`: a queue notification then never leaves the kernel.
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<(), Error> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| Error::RegisterIoevent { addr, source })
    }

    /// Creates and configures vCPU `index` to start at `entry`; `gate` lets the control
    /// socket pause it.
    pub fn create_vcpu(
        &self,
        index: u8,
        count: u8,
        entry: crate::boot::BootEntry,
        pvm_workarounds: bool,
        gate: Option<Arc<vcpu::Gate>>,
    ) -> Result<vcpu::Vcpu, Error> {
        vcpu::Vcpu::new(
            &self.kvm,
            &self.fd,
            index,
            count,
            entry,
            pvm_workarounds,
            self.msr_indices.clone(),
            gate,
        )
        .map_err(|source| Error::Vcpu { index, source })
    }

    /// Creates vCPU `index` from a snapshot's state.
    pub fn restore_vcpu(
        &self,
        index: u8,
        state: &state::VcpuState,
        gate: Option<Arc<vcpu::Gate>>,
    ) -> Result<vcpu::Vcpu, Error> {
        vcpu::Vcpu::restored(
            &self.fd,
            index,
            state,
            self.msr_indices.clone(),
            self.xsave_size(),
            gate,
        )
        .map_err(|source| Error::Vcpu { index, source })
    }

    /// Bytes of this host's XSAVE area as KVM reports it (KVM_CAP_XSAVE2), 4096 where KVM
    /// has no such capability (the legacy area).
    pub fn xsave_size(&self) -> usize {
        let n = self.fd.check_extension_int(kvm_ioctls::Cap::Xsave2);
        usize::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(state::XSAVE_LEGACY_BYTES)
    }

    /// The CPU guests see on this host, for a snapshot's header.
    pub fn cpu_identity(&self) -> Result<crate::snapshot::CpuIdentity, Error> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Vcpu {
                index: 0,
                source: vcpu::Error::SupportedCpuid(source),
            })?;
        Ok(crate::snapshot::CpuIdentity::from_supported(
            cpuid.as_slice(),
        ))
    }
}
