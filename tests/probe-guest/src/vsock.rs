//! A tiny virtio-vsock driver (virtio-mmio, split queues, polled): filled in with the device.

use crate::io::Serial;

pub fn echo_test(
    _out: &mut Serial,
    _base: u64,
    _port: u32,
    _bytes: usize,
) -> Result<(), &'static str> {
    Err("vsock driver not built yet")
}
