//! The workspace's reverse tunnel, its host's side: one TLS connection that the workspace's host
//! dials out to the broker, carrying HTTP/2. The roles are reversed on purpose: the host side is
//! the TLS client (it needs no listening port, and its certificate is its identity) but the
//! HTTP/2 *server*; the broker is the HTTP/2 client and opens one `CONNECT` stream per person's
//! session. HTTP/2 PINGs keep it alive in both directions; the host side reconnects with capped,
//! jittered backoff. The keepalive and stream limits both ends use are in
//! [`crate::protocol`]; the broker's side is `moat-broker`'s `tunnel::registry`.
//!
//! ```text
//!  broker: registry ── CONNECT workspace:22 ──▶ connector.rs ──▶ vsock.rs `CONNECT 22\n` ──▶ sshd
//! ```

pub mod connector;
pub mod vsock;
