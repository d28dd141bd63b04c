//! vsock device metrics.

use std::sync::atomic::AtomicU64;

use crate::devices::metrics::{DeviceMetrics, render};

/// Counters of the vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Guest connections to host ports that a host listener took.
    pub guest_connects: AtomicU64,
    /// Guest connections refused: nobody listening, backlog full, or the connection limit.
    pub guest_refused: AtomicU64,
    /// Host-initiated connections (`CONNECT P`) the guest accepted.
    pub host_connects: AtomicU64,
    /// Connections reset for a guest error: credit abuse, an unexpected op, a timeout, a
    /// failed host socket.
    pub resets: AtomicU64,
    /// TX packets the parser refused (bad chain, short header, bad length).
    pub bad_packets: AtomicU64,
    /// Guest payload bytes written to host sockets.
    pub tx_bytes: AtomicU64,
    /// Host socket bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
}

impl DeviceMetrics for VsockMetrics {
    fn json(&self) -> String {
        render(&[
            ("guest_connects", &self.guest_connects),
            ("guest_refused", &self.guest_refused),
            ("host_connects", &self.host_connects),
            ("resets", &self.resets),
            ("bad_packets", &self.bad_packets),
            ("tx_bytes", &self.tx_bytes),
            ("rx_bytes", &self.rx_bytes),
        ])
    }
}
