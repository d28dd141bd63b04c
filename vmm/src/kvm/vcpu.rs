//! One vCPU: its boot state (the PVH entry state: 32-bit protected mode, paging off; or the
//! Linux 64-bit entry state: long mode on an identity map), its CPUID, its local APIC wiring,
//! and the KVM_RUN loop that hands port and MMIO exits to the device bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::{self, BootEntry};
use crate::cpuid::{self, CpuidPolicy};
use crate::devices::bus::IoBus;
use crate::exit::{ExitSender, VmExit};
use crate::layout;

use super::state::VcpuState;

/// Errors from vCPU setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create the vCPU")]
    Create(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Register setup failed.
    #[error("cannot set registers")]
    Registers(#[source] kvm_ioctls::Error),
    /// Local APIC setup failed.
    #[error("cannot set up the local APIC")]
    Lapic(#[source] kvm_ioctls::Error),
    /// The snapshot's state could not be written into the vCPU.
    #[error("cannot restore the vCPU's state")]
    Restore(#[source] super::state::Error),
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    /// The CPUID it was given, kept for its snapshot.
    cpuid: CpuId,
    /// The MSRs a snapshot reads (the host's list, read before any filter).
    msr_indices: Arc<Vec<u32>>,
    /// Pause requests from the control socket; `None` when the VM has none.
    gate: Option<Arc<Gate>>,
}

/// A vCPU thread's pause point, shared with whoever pauses the VM (the API thread).
///
/// The controller sets `pause` and kicks the thread out of KVM_RUN with [`kick_signal`]
/// until it reports `paused`; a paused thread can be asked to `save` its state, and resumes
/// when `pause` is cleared.
#[derive(Debug, Default)]
pub struct Gate {
    inner: Mutex<GateState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    pause: bool,
    paused: bool,
    save: bool,
    saved: Option<Result<Box<VcpuState>, String>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing: KVM_RUN
/// returns EINTR). A real-time signal: neither glibc nor Rust's runtime uses them.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's empty handler (once, before the vCPU threads start).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the vCPU to pause.
    pub fn request_pause(&self) {
        self.lock().pause = true;
    }

    /// Whether the vCPU has paused.
    pub fn paused(&self) -> bool {
        self.lock().paused
    }

    /// Waits up to `t` for the vCPU to pause; returns whether it has.
    pub fn wait_paused(&self, t: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, t, |s| !s.paused)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.paused
    }

    /// Asks the paused vCPU for its state and waits up to `t` for it.
    pub fn save(&self, t: Duration) -> Result<Box<VcpuState>, String> {
        let mut g = self.lock();
        if !g.paused {
            return Err("the vCPU is not paused".to_owned());
        }
        g.save = true;
        g.saved = None;
        self.cond.notify_all();
        let (mut g, _) = self
            .cond
            .wait_timeout_while(g, t, |s| s.saved.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.saved
            .take()
            .unwrap_or_else(|| Err("the vCPU did not answer".to_owned()))
    }

    /// Lets the vCPU run again.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.pause = false;
        self.cond.notify_all();
    }

    fn pause_requested(&self) -> bool {
        self.lock().pause
    }
}

/// Most pieces of one access a pause completes (an MMIO access KVM splits is at most two).
const MAX_PENDING_PIECES: usize = 8;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

impl Vcpu {
    /// A vCPU made from a snapshot's `state` (CPUID first, then the rest).
    pub(super) fn restored(
        vm: &VmFd,
        index: u8,
        state: &VcpuState,
        msr_indices: Arc<Vec<u32>>,
        xsave_size: usize,
        gate: Option<Arc<Gate>>,
    ) -> Result<Self, Error> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::Create)?;
        let cpuid = state.cpuid().map_err(Error::Restore)?;
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        state.restore(&fd, xsave_size).map_err(Error::Restore)?;
        Ok(Self {
            fd,
            index,
            cpuid,
            msr_indices,
            gate,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        kvm: &Kvm,
        vm: &VmFd,
        index: u8,
        count: u8,
        entry: BootEntry,
        pvm_workarounds: bool,
        msr_indices: Arc<Vec<u32>>,
        gate: Option<Arc<Gate>>,
    ) -> Result<Self, Error> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::Create)?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        cpuid::filter(
            cpuid.as_mut_slice(),
            CpuidPolicy {
                vcpu_index: index,
                vcpu_count: count,
                pvm_workarounds,
            },
        );
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        set_lint(&fd)?;
        match entry {
            BootEntry::Pvh { entry, start_info } => set_pvh_state(&fd, entry, start_info)?,
            BootEntry::Linux64 { entry, boot_params } => {
                set_long_mode_state(&fd, entry, boot_params)?;
            }
        }
        Ok(Self {
            fd,
            index,
            cpuid,
            msr_indices,
            gate,
        })
    }

    /// Waits at the gate while a pause is asked, answering save requests meanwhile. First
    /// completes the I/O of the last exit, so the saved registers hold its result: KVM_RUN
    /// with `immediate_exit` finishes a pending port or MMIO read into the registers and
    /// returns at once, without entering the guest; an access KVM splits into pieces (MMIO
    /// across a page boundary) exits again for the next piece, which is served on `bus` as
    /// any exit is. Last, tells the guest's kvmclock it was stopped.
    fn park(&mut self, gate: &Gate, bus: &dyn IoBus) {
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..MAX_PENDING_PIECES {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
                // EINTR: nothing (more) pending.
                _ => break,
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        let mut g = gate.lock();
        g.paused = true;
        gate.cond.notify_all();
        while g.pause {
            if g.save {
                g.save = false;
                g.saved = Some(
                    VcpuState::save(&self.fd, &self.cpuid, &self.msr_indices)
                        .map(Box::new)
                        .map_err(|e| format!("vCPU {}: {}", self.index, moat_log::error_chain(&e))),
                );
                gate.cond.notify_all();
                continue;
            }
            g = gate
                .cond
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.paused = false;
        gate.cond.notify_all();
        drop(g);
        // The guest's clock jumped by the pause: KVM_KVMCLOCK_CTRL tells it the host stopped
        // it, so its soft-lockup watchdog does not take the gap for a hung CPU (a warm pool's
        // machine may wait paused for hours). EINVAL when the guest has no kvmclock (the
        // probe guest): nothing to tell.
        let _ = self.fd.kvmclock_ctrl();
    }

    /// Runs the guest until it resets, crashes or `stop` is set; reports why on `exits`.
    pub fn run(mut self, bus: &dyn IoBus, exits: &ExitSender, stop: &Arc<AtomicBool>) {
        let index = self.index;
        let gate = self.gate.clone();
        while !stop.load(Ordering::Acquire) {
            if let Some(g) = &gate
                && g.pause_requested()
            {
                self.park(g, bus);
                continue;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.pio_read(port, data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus.pio_write(port, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bus.mmio_read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bus.mmio_write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => Some(VmExit::GuestHalted),
                Ok(VcpuExit::Shutdown) => Some(VmExit::GuestCrashed(format!(
                    "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"
                ))),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::GuestCrashed(format!(
                    "vCPU {index}: entry failed, reason {reason:#x} on host cpu {cpu}"
                ))),
                Ok(VcpuExit::InternalError) => Some(VmExit::GuestCrashed(format!(
                    "vCPU {index}: KVM internal error (an instruction KVM could not emulate): {}",
                    self.internal_error_detail()
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(VmExit::GuestReset(format!(
                    "vCPU {index}: system event {kind}"
                ))),
                Ok(other) => Some(VmExit::GuestCrashed(format!(
                    "vCPU {index}: unhandled exit {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VmExit::VmmError(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                ))),
            };
            if let Some(exit) = outcome {
                exits.send(exit);
                return;
            }
        }
    }
}

impl Vcpu {
    /// Suberror, KVM's data words and the guest RIP, for a KVM_EXIT_INTERNAL_ERROR report.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union: this is called only right
        // after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, and nothing ran on this vCPU since.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = usize::try_from(internal.ndata)
            .unwrap_or(0)
            .min(internal.data.len());
        let data: Vec<String> = internal
            .data
            .iter()
            .take(n)
            .map(|d| format!("{d:#x}"))
            .collect();
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        format!(
            "suberror {} data [{}] rip {rip:#x}",
            internal.suberror,
            data.join(", ")
        )
    }
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC's firmware would.
fn set_lint(fd: &VcpuFd) -> Result<(), Error> {
    let mut lapic = fd.get_lapic().map_err(Error::Lapic)?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes = lapic
            .regs
            .get_mut(reg..reg + 4)
            .ok_or(Error::Lapic(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let mut raw = [0u8; 4];
        for (d, s) in raw.iter_mut().zip(bytes.iter()) {
            *d = s.to_ne_bytes()[0];
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *d = i8::from_ne_bytes([s]);
        }
    }
    fd.set_lapic(&lapic).map_err(Error::Lapic)
}

/// CR0: protected mode.
const CR0_PE: u64 = 1;
/// CR0: extension type (hard-wired to 1 on every CPU since the 486).
const CR0_ET: u64 = 1 << 4;
/// CR0: paging.
const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension (required for long mode).
const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
const EFER_LMA: u64 = 1 << 10;

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The PVH entry state: flat 32-bit segments from the GDT at `GDT_ADDR`, CR0.PE only, paging
/// off, `%ebx` = `hvm_start_info`, `%eip` = the PVH entry.
fn set_pvh_state(fd: &VcpuFd, entry: u64, start_info: u64) -> Result<(), Error> {
    let mut sregs = fd.get_sregs().map_err(Error::Registers)?;
    sregs.cs = segment(0x08, 0xb, 1);
    let data = segment(0x10, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss(0x18);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt_limit(boot::pvh::GDT.len());
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE; // protected mode, no paging.
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs).map_err(Error::Registers)?;

    let regs = kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(Error::Registers)?;
    set_fpu(fd)
}

/// The Linux 64-bit entry state (boot protocol 2.12+): long mode with paging on the identity
/// map at `PML4_ADDR`, `__BOOT_CS` a 64-bit code segment, `__BOOT_DS` flat data, interrupts
/// off, `%rsi` = the zero page, `%rip` = `startup_64`.
fn set_long_mode_state(fd: &VcpuFd, entry: u64, boot_params: u64) -> Result<(), Error> {
    let mut sregs = fd.get_sregs().map_err(Error::Registers)?;
    let mut code = segment(boot::linux::BOOT_CS, 0xb, 1);
    code.l = 1;
    code.db = 0;
    sregs.cs = code;
    let data = segment(boot::linux::BOOT_DS, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss(boot::linux::BOOT_TSS);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt_limit(boot::linux::GDT.len());
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(Error::Registers)?;

    let regs = kvm_regs {
        rip: entry,
        rsi: boot_params,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(Error::Registers)?;
    set_fpu(fd)
}

/// A 32-bit available TSS descriptor's state (KVM requires a usable TR).
fn tss(selector: u16) -> kvm_segment {
    let mut tr = segment(selector, 0xb, 0);
    tr.limit = 0x67;
    tr.g = 0;
    tr.db = 0;
    tr
}

fn gdt_limit(entries: usize) -> u16 {
    u16::try_from(entries * 8 - 1).unwrap_or(u16::MAX)
}

/// x87 and SSE control words at their reset values.
fn set_fpu(fd: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(Error::Registers)
}
