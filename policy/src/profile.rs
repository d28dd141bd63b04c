//! The policy profile: a TOML file, parsed strictly and compiled into a [`Policy`].
//!
//! ```toml
//! version = 1
//! name = "team-default"
//!
//! [[rules]]
//! name = "github"
//! hosts = ["github.com", "*.github.com"]
//! ports = [443]
//! action = "passthrough"
//! # protocols = ["tls", "http"]    # default; "tcp" (unchecked bytes) must be named
//! # cidrs = ["10.1.2.0/24"]        # non-public addresses these hosts may resolve to
//!
//! [[rules]]
//! name = "lab"                      # a rule without hosts matches IP literals in its cidrs
//! cidrs = ["192.0.2.0/24"]
//! ports = [8080]
//! action = "passthrough"
//! ```

use std::collections::HashSet;

use ipnet::IpNet;
use serde::Deserialize;

use crate::host::{HostError, HostPattern};
use crate::{Action, Policy, Protocol, Rule};

/// The only profile format version this build understands.
pub const PROFILE_VERSION: u32 = 1;

/// Why a profile could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Not TOML, an unknown field, a missing field or a value of the wrong type.
    #[error("profile is not valid")]
    Syntax(#[source] toml::de::Error),
    /// A version this build does not understand.
    #[error("profile version {0} is not supported (this build reads version {PROFILE_VERSION})")]
    Version(u32),
    /// A rule's host pattern is malformed.
    #[error("rule {rule:?} has a bad host pattern")]
    Host {
        /// The rule's name.
        rule: String,
        /// What was wrong.
        #[source]
        source: HostError,
    },
    /// A rule that can never match anything.
    #[error("rule {0:?} names neither hosts nor cidrs")]
    EmptyRule(String),
    /// A rule without ports, or with port 0.
    #[error("rule {0:?} must list ports between 1 and 65535")]
    BadPorts(String),
    /// Two rules with the same name: `explain` and audit records would be ambiguous.
    #[error("rule name {0:?} is used twice")]
    DuplicateRule(String),
    /// A rule with an empty protocol list.
    #[error("rule {0:?} allows no protocol")]
    NoProtocol(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    version: u32,
    name: String,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    ports: Vec<u16>,
    action: Action,
    #[serde(default = "default_protocols")]
    protocols: Vec<Protocol>,
    #[serde(default)]
    cidrs: Vec<IpNet>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tls, Protocol::Http]
}

/// Parses and compiles a profile. Does not check any signature: use
/// [`crate::signing::load_verified`] for anything that will be enforced.
pub fn parse(text: &str) -> Result<Policy, ProfileError> {
    let file: ProfileFile = toml::from_str(text).map_err(ProfileError::Syntax)?;
    if file.version != PROFILE_VERSION {
        return Err(ProfileError::Version(file.version));
    }
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(file.rules.len());
    for r in file.rules {
        if !names.insert(r.name.clone()) {
            return Err(ProfileError::DuplicateRule(r.name));
        }
        if r.hosts.is_empty() && r.cidrs.is_empty() {
            return Err(ProfileError::EmptyRule(r.name));
        }
        if r.ports.is_empty() || r.ports.contains(&0) {
            return Err(ProfileError::BadPorts(r.name));
        }
        if r.protocols.is_empty() {
            return Err(ProfileError::NoProtocol(r.name));
        }
        let hosts = r
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| ProfileError::Host {
                rule: r.name.clone(),
                source,
            })?;
        // CIDRs are matched against canonical addresses, so store them trimmed and canonical.
        let cidrs = r
            .cidrs
            .iter()
            .map(|net| match net {
                IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                    Some(v4) if v6.prefix_len() >= 96 => {
                        IpNet::new(v4.into(), v6.prefix_len() - 96).unwrap_or(*net)
                    }
                    _ => *net,
                },
                IpNet::V4(_) => *net,
            })
            .map(|n| n.trunc())
            .collect();
        rules.push(Rule {
            name: r.name,
            hosts,
            ports: r.ports,
            action: r.action,
            protocols: r.protocols,
            cidrs,
        });
    }
    Ok(Policy {
        name: file.name,
        rules,
    })
}
