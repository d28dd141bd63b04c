//! Metrics in Prometheus text format, served on the admin socket (`GET /metrics`).
//!
//! Counters are plain atomics updated on the flow path; rendering reads them without locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::outcome::Reason;

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Flows accepted on the listener (before any decision).
    pub accepted: AtomicU64,
    /// Flows allowed and connected upstream.
    pub opened: AtomicU64,
    /// Flows that ended, by reason (refusals, failures and closes), indexed by `Reason::index`.
    ended: Vec<AtomicU64>,
    /// Flows currently spliced.
    pub active: AtomicI64,
    /// Payload bytes from agents to upstreams.
    pub bytes_out: AtomicU64,
    /// Payload bytes from upstreams to agents.
    pub bytes_in: AtomicU64,
    /// Policy reloads applied.
    pub reloads_applied: AtomicU64,
    /// Policy reloads refused (bad signature, invalid profile, unreadable file or secret, a
    /// serial lower than the one in force).
    pub reloads_rejected: AtomicU64,
    /// Intercepted requests forwarded upstream.
    pub http_forwarded: AtomicU64,
    /// Intercepted requests refused or failed, by reason, indexed by `Reason::index`.
    http_stopped: Vec<AtomicU64>,
    /// Secrets written into forwarded requests (one per secret per request).
    pub secrets_injected: AtomicU64,
    /// Secrets found in intercepted responses and replaced by their placeholders (one per
    /// secret per response).
    pub secrets_reflected: AtomicU64,
    /// Intercepted flows served on a pooled upstream connection (no new upstream handshake).
    pub upstream_reused: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            accepted: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            ended: Reason::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            active: AtomicI64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            http_forwarded: AtomicU64::new(0),
            http_stopped: Reason::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            secrets_injected: AtomicU64::new(0),
            secrets_reflected: AtomicU64::new(0),
            upstream_reused: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one flow ending for `reason`.
    pub fn ended(&self, reason: Reason) {
        if let Some(c) = self.ended.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many flows ended for `reason` so far.
    pub fn ended_count(&self, reason: Reason) -> u64 {
        self.ended
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one intercepted request refused or failed for `reason`.
    pub fn http_stopped(&self, reason: Reason) {
        if let Some(c) = self.http_stopped.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many intercepted requests were refused or failed for `reason` so far.
    pub fn http_stopped_count(&self, reason: Reason) -> u64 {
        self.http_stopped
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Renders every metric in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let r = Ordering::Relaxed;
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "moat_egress_flows_accepted_total",
            "Flow streams accepted from the workspace.",
            self.accepted.load(r),
        );
        counter(
            "moat_egress_flows_opened_total",
            "Flows allowed by policy and connected upstream.",
            self.opened.load(r),
        );
        counter(
            "moat_egress_bytes_out_total",
            "Payload bytes from the workspace to upstreams.",
            self.bytes_out.load(r),
        );
        counter(
            "moat_egress_bytes_in_total",
            "Payload bytes from upstreams to the workspace.",
            self.bytes_in.load(r),
        );
        counter(
            "moat_egress_http_requests_forwarded_total",
            "Intercepted requests forwarded upstream.",
            self.http_forwarded.load(r),
        );
        counter(
            "moat_egress_secrets_injected_total",
            "Secrets written into forwarded requests.",
            self.secrets_injected.load(r),
        );
        counter(
            "moat_egress_secrets_reflected_total",
            "Secrets an upstream sent back in a response, replaced by their placeholders (one per secret per response).",
            self.secrets_reflected.load(r),
        );
        counter(
            "moat_egress_upstream_connections_reused_total",
            "Intercepted flows served on a pooled upstream connection.",
            self.upstream_reused.load(r),
        );
        let _ = writeln!(
            out,
            "# HELP moat_egress_http_requests_stopped_total Intercepted requests refused or failed, by reason and blame.\n\
             # TYPE moat_egress_http_requests_stopped_total counter"
        );
        for reason in Reason::ALL {
            let n = self.http_stopped_count(*reason);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "moat_egress_http_requests_stopped_total{{reason=\"{}\",blame=\"{}\"}} {n}",
                    reason.code(),
                    reason.blame().as_str(),
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP moat_egress_flows_ended_total Flows refused, failed or closed, by reason and blame.\n\
             # TYPE moat_egress_flows_ended_total counter"
        );
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "moat_egress_flows_ended_total{{reason=\"{}\",blame=\"{}\"}} {}",
                reason.code(),
                reason.blame().as_str(),
                self.ended_count(*reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP moat_egress_flows_active Flows currently spliced.\n\
             # TYPE moat_egress_flows_active gauge\nmoat_egress_flows_active {}",
            self.active.load(r)
        );
        let _ = writeln!(
            out,
            "# HELP moat_egress_policy_reloads_total Policy reloads, applied or rejected.\n\
             # TYPE moat_egress_policy_reloads_total counter\n\
             moat_egress_policy_reloads_total{{result=\"applied\"}} {}\n\
             moat_egress_policy_reloads_total{{result=\"rejected\"}} {}",
            self.reloads_applied.load(r),
            self.reloads_rejected.load(r)
        );
        out
    }
}
