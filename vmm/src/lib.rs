//! moat-vmm: the KVM microVM monitor.
//!
//! Hop in the data path: guest virtio-vsock -> this VMM -> host Unix socket `<uds>_<port>`,
//! where the egress proxy listens. The VMM moves bytes and runs the guest; it holds no policy.
//!
//! ```text
//!  config.rs (TOML + flags, parsed once)
//!      |
//!  vmm.rs: Resources::open (every host fd) -> jail/ (optional) -> guest memory (vm-memory)
//!      -> boot/ (linux-loader: PVH ELF or bzImage) + mptable.rs -> kvm/ (VM, irqchip, PIT, vCPUs)
//!      |                                                             | KVM_RUN exits
//!      +-> devices/bus.rs: COM1 (vm-superio; stdin fed by its serial-in thread) | i8042 reset
//!            | virtio-mmio windows
//!            devices/virtio/mmio.rs -> vsock/ (packet -> muxer -> Unix sockets), block, rng,
//!            each on its own thread (queue_worker.rs), every thread under seccomp.rs
//!            | 0xCF8/0xCFC and BARs
//!            devices/pci/ (root bus, BAR windows, MSI-X) -> vfio/device.rs (the function the
//!            guest sees) -> vfio/host.rs (vfio-ioctls) | vfio/fake.rs (tests); kvm/irq.rs
//! ```
//!
//! Invariants:
//! - `unsafe` lives only in `kvm/` (memory slots, the internal-error report), `vfio/` (BAR
//!   mmaps, DMA mapping, eventfd polling), `jail/sys.rs` (namespaces, mounts, privilege drop,
//!   Landlock) and `terminal.rs` (termios, the exit signals' handler and mask); everything else
//!   is safe code.
//! - The guest chooses only vsock port numbers, which map to `<uds>_P` under the operator's
//!   socket path; nothing it sends names any other host path, port or identity.
//! - A guest-caused error resets a device or closes a connection and is logged rate-limited;
//!   it never panics the VMM.

#![deny(unsafe_code)]

pub mod api;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod exit;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod jail;
#[allow(unsafe_code)]
pub mod kvm;
pub mod layout;
pub mod mptable;
pub mod ratelimit;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
#[allow(unsafe_code)]
pub mod terminal;
#[allow(unsafe_code)]
pub mod vfio;
pub mod vmm;
