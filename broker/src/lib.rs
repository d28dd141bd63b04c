//! moat's trusted access broker: the one trust boundary between people and workspaces.
//!
//! ```text
//!  person                           broker (this crate)                  workspace host
//!  moat login ── HTTPS ──▶ api.rs ──▶ oidc.rs (code + PKCE, ID token) ──▶ session.rs
//!  moat ssh  ─── HTTPS upgrade ──▶ api.rs: session? entitled? ──┐
//!                                                               ▼
//!                       tunnel/registry.rs ◀── TLS (workspace cert) + HTTP/2 ── tunnel/connector.rs
//!                       one CONNECT stream per session ─────────────────────▶ vsock.rs: `CONNECT 22`
//!                                                                              ▶ sshd in the workspace
//!  admin (Unix socket) ──▶ admin.rs: revoke session | person | workspace ──▶ cancel live relays
//!
//!  workspace host's egress ── TLS (workspace cert, ALPN moat-egress) + HTTP/2 ──▶ corporate.rs
//!      CONNECT <service>:<port> ──▶ only services listed for that workspace ──▶ corporate network
//! ```
//!
//! Invariants:
//! - No local user database: a person exists only as the `sub` of an ID token that passed
//!   [`oidc::IdTokenValidator`] (issuer, audience, expiry, nonce, allow-listed asymmetric
//!   algorithm, a key from the provider's JWKS). Group claims decide which workspaces they reach.
//! - A session is short-lived, bound to one person and one workspace, known to the client only as
//!   an opaque bearer token (the broker keeps its SHA-256, never the token).
//! - A session outlives the identity provider's last confirmation of the person by at most
//!   `entitlement_check_secs` ([`entitlement`]): the broker re-checks it with the sign-in's
//!   refresh token (kept in memory only, never logged, audited or handed out) and ends it when
//!   the provider refuses, the groups no longer entitle the person, or no confirmation comes.
//! - Nothing reaches a workspace except through its tunnel, which the workspace's host side dials
//!   out with a client certificate from the broker's workspace CA, whose serial is not revoked.
//!   Every relayed stream belongs to a live session; revoking the session, the person or the
//!   workspace cancels it at once (and revoking a workspace revokes its certificates' serials).
//! - An SSH user certificate names the account on one workspace (`agent@ws1`) and no other
//!   workspace's sshd accepts it; a workspace's host key is new at each enrolment and certified
//!   by the broker's host CA for that workspace's name.
//! - A workspace reaches the corporate network only through [`corporate`], by service name, and
//!   only the services its configuration lists.
//! - Every sign-in, every remote session and every corporate flow is audited as OCSF JSON Lines
//!   ([`audit`]); no record holds a token, a code or a key.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod corporate;
pub mod enrolment;
pub mod entitlement;
pub mod https;
pub mod oidc;
pub mod pki;
pub mod server;
pub mod session;
pub mod ssh_ca;
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
