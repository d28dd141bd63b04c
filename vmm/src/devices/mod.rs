//! Device models. Legacy devices on port I/O (the serial console and the i8042 reset line) and
//! virtio devices on MMIO windows; the bus routes each vCPU exit to the device that owns the
//! address.

pub mod bus;
pub mod legacy;
pub mod metrics;
pub mod pci;
pub mod serial;
pub mod virtio;
