//! Corporate service names: what a `corporate` rule sends a flow to, instead of an address.
//!
//! The broker configures corporate services by name (`[[services]]` in its configuration) and
//! the workspace's host side asks it for one as `CONNECT <service>:<port>`; the broker alone
//! knows and resolves the service's address. The grammar is the broker's (`ServiceName` in
//! moat-broker's `config.rs`), copied here rather than shared so that the policy does not depend
//! on the broker: 1 to 63 of `a-z`, `0-9` and `-`, not starting with `-`. A name that parses
//! here is one the broker's parser accepts, and it can never carry a `:`, a space or a newline
//! into the request line.

use std::fmt;

/// The longest service name.
pub const MAX_SERVICE_NAME_LEN: usize = 63;

/// A corporate service's name, parsed once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName(String);

/// Why a service name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a service name (1-{MAX_SERVICE_NAME_LEN} of a-z, 0-9, '-', not starting with '-')"
)]
pub struct ServiceNameError(String);

impl ServiceName {
    /// Parses a service name as the broker does.
    pub fn parse(name: &str) -> Result<Self, ServiceNameError> {
        let ok = (1..=MAX_SERVICE_NAME_LEN).contains(&name.len())
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(ServiceName(name.to_owned()))
        } else {
            Err(ServiceNameError(name.to_owned()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_broker_accepts_parse() {
        for name in ["git-corp", "a", "0", "db1", "a-", &"x".repeat(63)] {
            assert_eq!(ServiceName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn names_the_broker_refuses_are_refused() {
        let too_long = "x".repeat(64);
        for name in [
            "", "-git", "Git", "git.corp", "git:22", "git corp", "git\n", "gït", "git_corp",
            &too_long,
        ] {
            let err = ServiceName::parse(name).unwrap_err().to_string();
            assert!(err.contains("is not a service name"), "{name:?}: {err}");
        }
    }
}
