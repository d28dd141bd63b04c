//! What moat needs to know about its host, each fact probed in one place.
//!
//! - [`kvm`]: which module provides `/dev/kvm` (hardware virtualisation, or nested PVM where a
//!   guest's user space cannot run), which decides the backend (`moat run`), the VMM's CPUID
//!   and command-line workarounds, what `moat doctor` reports and where the VM tests run.
//! - [`landlock`]: the kernel's Landlock ABI, for the agent's sandbox, the VMM's jail and
//!   `moat doctor`.
//! - [`pci`]: a PCI function's IOMMU group and the drivers of its members, for the VMM's
//!   VFIO passthrough and `moat doctor`.
//!
//! A light crate on purpose: `moat` (for `moat doctor` and `moat run`) and xtask take these
//! probes without linking the VMM. Probes that read sysfs take its root, so tests run them
//! against fake trees. The one `unsafe` block is the Landlock version query.

#![deny(unsafe_code)]

pub mod kvm;
#[allow(unsafe_code)]
pub mod landlock;
pub mod pci;

pub use kvm::{KvmFlavour, kvm_flavour, kvm_usable};
pub use landlock::landlock_abi;
