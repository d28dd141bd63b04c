//! The workspace's reverse tunnel, the broker's side: one TLS connection that the workspace's
//! host side dials out to the broker, carrying HTTP/2, on which the broker is the HTTP/2 client
//! and opens one `CONNECT` stream per person's session. The host side is
//! [`moat_broker_client::tunnel`]; the keepalive and stream limits both ends use are in
//! [`moat_broker_client::protocol`].
//!
//! ```text
//!  broker: registry.rs ── CONNECT workspace:22 ──▶ host: connector ──▶ vsock `CONNECT 22\n` ──▶ sshd
//! ```

pub mod registry;
