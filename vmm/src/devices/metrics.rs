//! Device metrics: plain atomic counters declared next to each device, read by `--stats`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A device's counters as one JSON object.
pub trait DeviceMetrics: Send + Sync + std::fmt::Debug {
    /// `{"name":value,...}`.
    fn json(&self) -> String;
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Renders `(name, counter)` pairs as a JSON object.
pub fn render(fields: &[(&str, &AtomicU64)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\":{}", v.load(Ordering::Relaxed)))
        .collect();
    format!("{{{}}}", body.join(","))
}
