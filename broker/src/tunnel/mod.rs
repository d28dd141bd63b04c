//! The workspace's reverse tunnel: one TLS connection that the workspace's host side dials out to
//! the broker, carrying HTTP/2. The roles are reversed on purpose: the host side is the TLS client
//! (it needs no listening port, and its certificate is its identity) but the HTTP/2 *server*; the
//! broker is the HTTP/2 client and opens one `CONNECT` stream per person's session. HTTP/2 PINGs
//! keep it alive in both directions; the host side reconnects with capped, jittered backoff.
//!
//! ```text
//!  broker: registry.rs ── CONNECT workspace:22 ──▶ connector.rs ──▶ vsock.rs `CONNECT 22\n` ──▶ sshd
//! ```

pub mod connector;
pub mod registry;
pub mod vsock;

use std::time::Duration;

/// Both ends send an HTTP/2 PING this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and drop the tunnel when one is not answered within this time.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The host side accepts this many concurrent streams on one tunnel (the broker relays at most
/// as many sessions in all, `server::MAX_RELAYS`).
pub const MAX_STREAMS: u32 = 4096;
/// The authority of a tunnel stream names the workspace port: `workspace:<port>`.
pub const STREAM_HOST: &str = "workspace";
