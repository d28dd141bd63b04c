//! The broker's clients, and the wire protocol they share with the broker (`moat-broker`).
//!
//! ```text
//!  person: moat login / moat ssh ── client.rs ── HTTPS (https.rs) ──▶ broker's API
//!  admin:  moat-broker revoke ───── client.rs ── admin Unix socket ──▶ broker's admin API
//!  workspace host: moat run --tunnel DIR
//!      enrolment.rs (reads DIR) ──▶ tunnel/connector.rs ── TLS + HTTP/2 ──▶ broker's tunnel listener
//!                                   tunnel/vsock.rs `CONNECT 22` ──▶ the workspace's sshd
//! ```
//!
//! A crate of its own so that what runs on a person's machine or a workspace host (the `moat`
//! binary) links none of the broker's server: no identity provider client, no CAs' private keys,
//! no session table. [`protocol`] holds what both ends must agree on; the broker depends on this
//! crate for it, never the other way round.

#![forbid(unsafe_code)]

pub mod client;
pub mod enrolment;
pub mod https;
pub mod protocol;
pub mod tunnel;

/// For the host processes that hold secrets (the egress proxy, in `moat run` and `moat proxy`;
/// the broker): no core dump (RLIMIT_CORE 0, soft and hard, so nothing can raise it again) and
/// not dumpable, so no other process of the same uid can read their memory or descriptors
/// through `/proc` or ptrace (the agent in a namespace workspace run by that uid included).
/// Children that exec start dumpable again; the limit stays.
pub fn keep_memory_private() -> std::io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| std::io::Error::other(format!("cannot set RLIMIT_CORE to 0: {e}")))?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| std::io::Error::other(format!("cannot make the process non-dumpable: {e}")))?;
    Ok(())
}

pub use moat_log::error_chain;

/// Seconds since the Unix epoch (0 if the clock is before it): how sessions' ends are written.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
