//! The i8042 keyboard controller, kept only for its reset line: writing 0xfe to port 0x64 is
//! how Linux (`reboot=k`, the default) and the probe guest stop the machine. moat-vmm treats a
//! reset as shutdown: a workspace VM is never rebooted in place.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::Trigger;

use crate::exit::{ExitSender, VmExit};

/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command port.
pub const I8042_COMMAND: u16 = 0x64;

/// The i8042 reset line: reports a guest reset and stops the vCPUs.
#[derive(Debug, Clone)]
pub struct ResetLine {
    exits: ExitSender,
    stop: Arc<AtomicBool>,
}

impl ResetLine {
    /// A reset line that reports on `exits` and raises `stop`.
    pub fn new(exits: ExitSender, stop: Arc<AtomicBool>) -> Self {
        Self { exits, stop }
    }
}

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.stop.store(true, Ordering::Release);
        self.exits.send(VmExit::GuestReset(
            "guest reset through the i8042".to_owned(),
        ));
        Ok(())
    }
}

/// The i8042 device.
pub type I8042 = vm_superio::I8042Device<ResetLine>;
