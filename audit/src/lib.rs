//! moat's audit log, shared by every producer of records (the egress proxy, guest-init's
//! process events through the host, the access broker).
//!
//! ```text
//!   producer (its own fields)           ocsf.rs: the OCSF skeleton, the schema version
//!        |                                       (class, activity, type_uid, severity,
//!        v                                        status, metadata, time)
//!   log.rs: Log::append  --chain.rs-->  seq, prev, hash (SHA-256, canonical JSON)
//!        |               --key.rs---->  signed checkpoints (Ed25519, the per-host audit key)
//!        v
//!   one JSON Lines file (+ export.rs: OTLP)        verify.rs: `moat audit verify`
//! ```
//!
//! Invariants: every record written carries its chain fields, written here and nowhere else;
//! one [`Log`] per file (writers that share a file share the `Log`); a record that could not be
//! written does not advance the chain, and the next one says how many were lost before it.

#![forbid(unsafe_code)]

pub mod chain;
pub mod export;
pub mod key;
pub mod log;
pub mod ocsf;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod verify;

pub use key::{AuditKey, KeyError, PublicKey};
pub use log::{Checkpoints, Export, Log};
pub use ocsf::OCSF_VERSION;
pub use verify::{Finding, Report, verify};
