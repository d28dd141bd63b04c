//! What the broker and its clients must agree on, in one place: the names, tokens and limits of
//! the wire protocol. Both sides take them from here (the broker depends on this crate), so
//! neither can drift from the other.
//!
//! | what | where it is used |
//! | --- | --- |
//! | [`UPGRADE`] | `moat ssh`'s stream request (`Upgrade: moat-stream`), answered 101 by the API |
//! | [`SIGN_IN_TIMEOUT`] | how long a sign-in may take, on both ends |
//! | [`EGRESS_ALPN`] | the workspace host's corporate egress connection to the tunnel listener |
//! | [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`], [`MAX_STREAMS`], [`STREAM_HOST`] | the reverse tunnel's HTTP/2 |
//! | [`WorkspaceName`], [`workspace_principal`] | certificates' names, URLs, SSH principals |

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// The `Upgrade` token of a stream request.
pub const UPGRADE: &str = "moat-stream";

/// A sign-in not finished within this time is forgotten.
pub const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(300);

/// The ALPN protocol of a corporate egress connection (the tunnel proper uses `h2`).
pub const EGRESS_ALPN: &[u8] = b"moat-egress";

/// Both ends of a tunnel send an HTTP/2 PING this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and drop the tunnel when one is not answered within this time.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The host side accepts this many concurrent streams on one tunnel (the broker relays at most
/// as many sessions in all, its `MAX_RELAYS`).
pub const MAX_STREAMS: u32 = 4096;
/// The authority of a tunnel stream names the workspace port: `workspace:<port>`.
pub const STREAM_HOST: &str = "workspace";

/// A name that is not a workspace name; says which rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a workspace name (1-63 of a-z, 0-9, '-')")]
pub struct InvalidName(pub String);

/// A workspace's name: 1 to 63 of `a-z`, `0-9` and `-`, not starting with `-`. It appears in
/// certificates, URLs and audit records, so it is parsed once, here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceName(String);

impl WorkspaceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for WorkspaceName {
    type Error = InvalidName;
    fn try_from(s: &str) -> Result<Self, InvalidName> {
        let ok = (1..=63).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(WorkspaceName(s.to_owned()))
        } else {
            Err(InvalidName(s.to_owned()))
        }
    }
}

impl<'de> Deserialize<'de> for WorkspaceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WorkspaceName::try_from(s.as_str())
            .map_err(|e| serde::de::Error::custom(format!("invalid configuration: {e}")))
    }
}

impl serde::Serialize for WorkspaceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for WorkspaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one principal of a user certificate for `account` on `workspace`: `account@workspace`.
/// A workspace's sshd accepts only its own (guest-init writes it into
/// `AuthorizedPrincipalsFile`), so the certificate is bound to the workspace it was issued for.
pub fn workspace_principal(account: &str, workspace: &WorkspaceName) -> String {
    format!("{account}@{workspace}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_names_are_refused_unless_lowercase_letters_digits_and_dashes() {
        for bad in ["", "-ws", "WS1", "ws_1", "ws/1", &"a".repeat(64)] {
            assert!(WorkspaceName::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(WorkspaceName::try_from("ws-1").is_ok());
    }
}
