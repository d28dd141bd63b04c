//! moat's trusted access broker: the one trust boundary between people and workspaces.
//!
//! ```text
//!  person                           broker (this crate)                  workspace host
//!  moat login ── HTTPS ──▶ api.rs ──▶ oidc/ (code + PKCE, ID token) ──▶ session/
//!  moat ssh  ─── HTTPS upgrade ──▶ api.rs: session? entitled? ──┐
//!                                                               ▼
//!                       tunnel/registry.rs ◀── TLS (workspace cert) + HTTP/2 ── connector
//!                       one CONNECT stream per session ─────────────────────▶ vsock: `CONNECT 22`
//!                                                                              ▶ sshd in the workspace
//!  admin (Unix socket) ──▶ admin.rs: revoke session | person | workspace ──▶ cancel live relays
//!
//!  workspace host's egress ── TLS (workspace cert, ALPN moat-egress) + HTTP/2 ──▶ corporate.rs
//!      CONNECT <service>:<port> ──▶ only services listed for that workspace ──▶ corporate network
//! ```
//!
//! The person's and the workspace host's sides (`moat login`/`moat ssh`, the tunnel connector,
//! reading an enrolment) and the wire protocol are the crate `moat-broker-client`, which this
//! one depends on; the `moat` binary links only that.
//!
//! Modules depend one way: `serve` (the listeners, used by the binary alone) -> the handlers
//! (`api`, `admin`, `corporate`, `entitlement`) -> `state` (the shared [`state::Broker`]) ->
//! the stores and the pure parts (`session`, `oidc`, `pki`, `ssh_ca`, `audit`, `config`):
//! `api` is people's HTTPS API and relays, `admin` revocation, `corporate` corporate services
//! by name, `entitlement` each session re-checked at the provider; `oidc` the provider
//! (discovery, code exchange, device flow, refresh; `oidc/id_token.rs` the pure ID token
//! check), `session` sessions, handoffs and revocations (`session/schedule.rs` when each is
//! checked again), `tunnel/registry.rs` the broker's end of the tunnels, `enrolment` a
//! workspace's enrolment directory, `ssh_ca` user and host certificates, `pki` the TLS and
//! workspace CAs, `audit` OCSF 3002/4007. The whole path, sign-in to SSH, is in
//! ARCHITECTURE.md ("Reaching a workspace").
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
pub mod config;
pub mod corporate;
pub mod enrolment;
pub mod entitlement;
pub mod oidc;
pub mod pki;
pub mod serve;
pub mod session;
pub mod ssh_ca;
pub mod state;
pub mod tunnel;

pub(crate) use moat_broker_client::error_chain;
