//! KVM's GSI routing table for MSI, and KVM memory slots for BARs mapped into the guest.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps it: the default routes
//! KVM installs with the in-kernel irqchip (GSI 0..24 to the IOAPIC's pins, 0..16 to the
//! PICs as well, as `kvm_setup_default_irq_routing` does), plus one MSI route per live vector.
//! MSI GSIs start at 24, after the IOAPIC's pins.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
    kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::msix::{MsiMessage, MsiRouter, RouteError};
use crate::vfio::GuestMapper;

/// First GSI handed to MSI vectors.
pub const FIRST_MSI_GSI: u32 = 24;
/// GSIs KVM routes at most (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4096;

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

fn msi(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: u32::try_from(m.addr & 0xffff_ffff).unwrap_or(0),
                address_hi: u32::try_from(m.addr >> 32).unwrap_or(0),
                data: m.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The default irqchip routes of an in-kernel irqchip.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..24 {
        routes.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 8 {
            routes.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
    }
    routes
}

#[derive(Debug)]
struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// MSI routing through KVM.
#[derive(Debug)]
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

impl KvmMsiRouter {
    /// A router for `vm`, whose table holds only the default routes until vectors go live.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    fn commit(&self, table: &Table, gsi: u32) -> Result<(), RouteError> {
        let mut entries = default_routes();
        entries.extend(table.msi.iter().map(|(g, m)| msi(*g, *m)));
        let err = |source| RouteError::Route { gsi, source };
        let mut routing = KvmIrqRouting::new(entries.len())
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
        for (slot, e) in routing.as_mut_slice().iter_mut().zip(entries) {
            *slot = e;
        }
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| err(io_err(e)))
    }
}

impl MsiRouter for KvmMsiRouter {
    fn allocate_gsis(&self, count: u32) -> Result<u32, RouteError> {
        let mut t = self.table.lock().map_err(|_| RouteError::NoGsi(count))?;
        let base = t.next_gsi;
        let end = base.checked_add(count).filter(|e| *e <= MAX_GSI);
        t.next_gsi = end.ok_or(RouteError::NoGsi(count))?;
        Ok(base)
    }

    fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        let mut t = self.table.lock().map_err(|_| RouteError::NoGsi(1))?;
        t.msi.insert(gsi, msg);
        self.commit(&t, gsi)
    }

    fn attach(&self, gsi: u32, evt: &EventFd) -> Result<(), RouteError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(|e| RouteError::Route {
                gsi,
                source: io_err(e),
            })
    }

    fn detach(&self, gsi: u32, evt: &EventFd) -> Result<(), RouteError> {
        self.vm
            .unregister_irqfd(evt, gsi)
            .map_err(|e| RouteError::Route {
                gsi,
                source: io_err(e),
            })
    }
}

/// Memory slots for mmapped BARs, numbered after guest RAM's.
#[derive(Debug)]
pub struct KvmBarMapper {
    vm: Arc<VmFd>,
    free: Mutex<Vec<u32>>,
}

impl KvmBarMapper {
    /// Slots `first..first + count` for BARs.
    pub fn new(vm: Arc<VmFd>, first: u32, count: u32) -> Self {
        Self {
            vm,
            free: Mutex::new((first..first.saturating_add(count)).rev().collect()),
        }
    }
}

impl GuestMapper for KvmBarMapper {
    unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> Result<u32, std::io::Error> {
        let slot = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOSPC))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller guarantees `[host, host + len)` stays mapped until `unmap(slot)`;
        // KVM refuses (EEXIST) a range overlapping another slot, so RAM is never shadowed.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => Ok(slot),
            Err(e) => {
                if let Ok(mut f) = self.free.lock() {
                    f.push(slot);
                }
                Err(io_err(e))
            }
        }
    }

    fn unmap(&self, slot: u32) {
        let region = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
        if unsafe { self.vm.set_user_memory_region(region) }.is_ok()
            && let Ok(mut f) = self.free.lock()
        {
            f.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        // SAFETY: these entries were built as irqchip routes just above.
        let (chip, pin) = unsafe { (r[1].u.irqchip.irqchip, r[1].u.irqchip.pin) };
        assert_eq!((r[1].gsi, chip, pin), (0, KVM_IRQCHIP_PIC_MASTER, 0));
    }
}
