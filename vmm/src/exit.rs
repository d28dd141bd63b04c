//! Why the VM stopped, and the process exit code each reason maps to.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | the guest shut down: i8042 reset (Linux `reboot`), or a KVM shutdown/reset system event |
//! | 1 | VMM error at setup or while running (KVM, a device thread, host I/O) |
//! | 2 | bad arguments or configuration (clap uses 2 as well) |
//! | 3 | the guest crashed: triple fault, KVM internal (emulation) error, failed VM entry |
//! | 4 | the `--timeout` wall-clock limit expired |
//! | 5 | the guest halted with no way to wake (no in-kernel irqchip exit path) |

use std::sync::mpsc;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest pulsed the i8042 reset line or KVM reported a reset/shutdown event.
    GuestReset(String),
    /// The guest crashed.
    GuestCrashed(String),
    /// The guest executed HLT and KVM handed it to user space.
    GuestHalted,
    /// Something on the host failed.
    VmmError(String),
    /// The wall-clock limit expired.
    Timeout,
}

impl VmExit {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            Self::GuestReset(_) => 0,
            Self::VmmError(_) => 1,
            Self::GuestCrashed(_) => 3,
            Self::Timeout => 4,
            Self::GuestHalted => 5,
        }
    }
}

/// Exit code for bad arguments or configuration.
pub const EXIT_CONFIG: i32 = 2;

/// Where vCPUs and devices report that the VM must stop. Cloneable, usable from any thread.
#[derive(Debug, Clone)]
pub struct ExitSender(mpsc::Sender<VmExit>);

impl ExitSender {
    /// A sender and the receiver the main thread waits on.
    pub fn channel() -> (Self, mpsc::Receiver<VmExit>) {
        let (tx, rx) = mpsc::channel();
        (Self(tx), rx)
    }

    /// Reports `exit`; the first report decides the exit code.
    pub fn send(&self, exit: VmExit) {
        // The receiver only goes away when the process is exiting anyway.
        let _ = self.0.send(exit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct() {
        let codes = [
            VmExit::GuestReset(String::new()).code(),
            VmExit::VmmError(String::new()).code(),
            EXIT_CONFIG,
            VmExit::GuestCrashed(String::new()).code(),
            VmExit::Timeout.code(),
            VmExit::GuestHalted.code(),
        ];
        let mut sorted = codes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
    }
}
