//! moat's egress policy: the signed profile, and the decisions it makes.
//!
//! Hop in the data path: the egress proxy asks this crate two questions about every flow.
//!
//! ```text
//!  flow header (hostname?, address, port)
//!        |
//!        v
//!  Policy::decide ------> Deny(reason)          first matching rule wins; no rule = deny
//!        | Allow(rule)
//!        v
//!  protocol check (TLS SNI / HTTP Host) against the rule's protocols
//!        |
//!        +--- action corporate --> the host side's broker connector, asked for the rule's
//!        |                         `service` by name (the broker resolves and connects)
//!        v
//!  proxy resolves the hostname on the host
//!        |
//!        v
//!  Rule::check_address(each resolved address) --> Deny(non-public class)
//!        | ok
//!        v
//!  connect (passthrough), or terminate TLS and check each request (intercept)
//! ```
//!
//! Invariants: deny by default; names are normalised once ([`host::normalize`]) before any
//! comparison; IP-literal destinations and non-public addresses are reachable only through a
//! rule's `cidrs`; corporate services are reachable only by name, through the broker (a
//! `corporate` rule names hosts and a [`ServiceName`], never addresses or `cidrs`); a profile is
//! enforced only after its signature verifies ([`signing::load_verified`]). No I/O, no unsafe
//! code.

#![forbid(unsafe_code)]

pub mod addr;
pub mod host;
pub mod http_rules;
pub mod mcp_rules;
pub mod path;
pub mod profile;
pub mod program;
pub mod secret;
pub mod service;
pub mod signing;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

pub use addr::{AddrClass, classify};
pub use host::{HostPattern, normalize};
pub use http_rules::{HttpAction, HttpRule, HttpRules, HttpVerdict, PathPattern};
pub use mcp_rules::{McpRules, McpVerdict};
pub use path::{PathError, normalize_path};
pub use program::{ProgramClaim, ProgramPattern};
pub use secret::{Presentation, SecretSource, SecretSpec};
pub use service::{ServiceName, ServiceNameError};

/// What an allowing rule does with the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Action {
    /// Connect to the destination and splice bytes both ways, after the protocol checks.
    Passthrough,
    /// Terminate the agent's TLS with a leaf of the workspace CA, check every HTTP request,
    /// inject the secrets bound to the host, and forward over verified TLS. TLS only.
    Intercept,
    /// Send the flow to a corporate service through the broker, after the protocol checks: the
    /// proxy asks the host side's egress socket for the rule's `service` by name (never an
    /// address: it does not resolve the hostname; the broker connects to the service's
    /// configured address) and splices. Rules with hosts only.
    Corporate,
}

impl Action {
    /// Stable name for audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Passthrough => "passthrough",
            Action::Intercept => "intercept",
            Action::Corporate => "corporate",
        }
    }
}

/// The application protocols a rule lets through, as recognised from the first client bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// TLS whose ClientHello names the flow's hostname in SNI.
    Tls,
    /// Plaintext HTTP/1.x whose Host header names the flow's hostname.
    Http,
    /// Any bytes at all, unchecked (SSH to a git host, say). Must be named explicitly.
    Tcp,
}

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique name, quoted in audit records and by `explain`.
    pub name: String,
    /// Host patterns this rule matches.
    pub hosts: Vec<HostPattern>,
    /// Destination ports this rule matches.
    pub ports: Vec<u16>,
    /// What to do with a matching flow.
    pub action: Action,
    /// Protocols allowed on a matching flow.
    pub protocols: Vec<Protocol>,
    /// Address ranges reachable through this rule, canonical form. On a rule with hosts: the
    /// non-public addresses those hosts may resolve to. On a rule without hosts: the IP-literal
    /// destinations it allows.
    pub cidrs: Vec<IpNet>,
    /// Routed (intercept rules only): requests for the rule's hosts go to this upstream
    /// instead, e.g. a stable in-workspace name `inference.local` routed to a model provider.
    pub route: Option<Route>,
    /// The broker's name for the corporate service the flow goes to: set on every rule whose
    /// action is `corporate`, and on no other.
    pub service: Option<ServiceName>,
    /// HTTP rules (intercept rules only): each request on the flow is decided by the first
    /// that matches it, or by their explicit default. `None`: every request is allowed.
    pub http: Option<HttpRules>,
    /// The programs whose flows this rule allows ([`program`]): `None`, any flow, whatever
    /// program it claims or none; otherwise only a flow whose claimed program matches one.
    pub programs: Option<Vec<ProgramPattern>>,
    /// MCP rules (intercept rules only): JSON-RPC requests to the rule's MCP endpoint are
    /// decided by method and tool, and `tools/list` answers filtered. `None`: not read.
    pub mcp: Option<McpRules>,
}

/// Where a routed rule sends its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The upstream host (normalised): resolved on the host, its addresses classified, its
    /// certificate verified, and the `Host` of forwarded requests.
    pub host: String,
    /// The upstream port.
    pub port: u16,
    /// If set, the `model` field of JSON request bodies is rewritten to this (the agent asks
    /// for any model; the provider serves this one).
    pub model: Option<String>,
}

impl Rule {
    fn covers(&self, addr: IpAddr) -> bool {
        self.cidrs.iter().any(|net| net.contains(&addr))
    }

    /// Checks one address a named flow resolved to (or an IP literal's address): public
    /// addresses pass; any other class passes only inside one of the rule's `cidrs`.
    pub fn check_address(&self, addr: IpAddr) -> Result<IpAddr, AddrClass> {
        let canon = addr::canonical(addr);
        match classify(canon) {
            AddrClass::Public => Ok(canon),
            _ if self.covers(canon) => Ok(canon),
            class => Err(class),
        }
    }

    /// Does this rule allow `protocol`?
    pub fn allows_protocol(&self, protocol: Protocol) -> bool {
        self.protocols.contains(&protocol)
    }

    /// Does this rule allow a flow from `program` (the guest's claim; `None` when it names
    /// none)? Only narrows: a rule without `programs` allows every flow it matched.
    pub fn allows_program(&self, program: Option<&ProgramClaim<'_>>) -> bool {
        match (&self.programs, program) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(allowed), Some(claim)) => allowed.iter().any(|p| p.matches(claim)),
        }
    }
}

/// A compiled, verified policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The profile's name.
    pub name: String,
    /// The profile's serial (0 where it has none): signed with it, and raised by its signer at
    /// every new version, so that an enforcing proxy can refuse an older, validly signed profile
    /// replayed in its place (rollback).
    pub serial: u64,
    /// Rules in profile order; the first match decides.
    pub rules: Vec<Rule>,
    /// Secrets the proxy injects on intercepted flows, in profile order.
    pub secrets: Vec<SecretSpec>,
    /// Names the workspace answers itself, with one of its own services
    /// ([`LocalRoute`]); the egress proxy never sees their flows.
    pub local_routes: Vec<LocalRoute>,
}

/// `[[local_routes]]`: flows to `host` on `port` go to the workspace service `service` on its
/// loopback port, inside the workspace (a local model server as `inference.local`). `moat
/// run` reads them from the verified policy at start and hands them to guest-init, whose
/// netstack answers them: the signed policy chooses, not the agent. Fixed for the workspace's
/// life: a reload does not change them (docs/inference.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRoute {
    /// The name (normalised, exact).
    pub host: String,
    /// The port the agent connects to on that name.
    pub port: u16,
    /// The workspace service's name.
    pub service: crate::service::ServiceName,
}

/// The destination of a flow as the guest claims it.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The normalised hostname the guest resolved the address from, if any.
    pub hostname: Option<&'a str>,
    /// The address the guest connected to (a fake address for named flows).
    pub addr: IpAddr,
    /// The destination port.
    pub port: u16,
}

/// Why the policy denied a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule names this host and port.
    NoRule,
    /// A rule names the host, but not this port.
    PortNotAllowed,
    /// The destination is an IP literal no rule's `cidrs` covers.
    IpLiteral,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NoRule => "no rule allows this host",
            DenyReason::PortNotAllowed => "no rule allows this port for this host",
            DenyReason::IpLiteral => "IP-literal destination not named by any rule's cidrs",
        })
    }
}

/// The policy's first answer about a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'p> {
    /// Allowed by this rule (address and protocol checks still follow).
    Allow(&'p Rule),
    /// Denied.
    Deny(DenyReason),
}

impl Policy {
    /// Decides a flow by its claimed destination. Named flows match on hostname and port;
    /// hostname-less (IP-literal) flows match only rules that name no hosts, on their `cidrs`.
    pub fn decide(&self, dest: Destination<'_>) -> Decision<'_> {
        match dest.hostname {
            Some(host) => {
                let mut host_matched = false;
                for rule in &self.rules {
                    if rule.hosts.iter().any(|p| p.matches(host)) {
                        if rule.ports.contains(&dest.port) {
                            return Decision::Allow(rule);
                        }
                        host_matched = true;
                    }
                }
                Decision::Deny(if host_matched {
                    DenyReason::PortNotAllowed
                } else {
                    DenyReason::NoRule
                })
            }
            None => {
                let canon = addr::canonical(dest.addr);
                self.rules
                    .iter()
                    .find(|r| r.hosts.is_empty() && r.ports.contains(&dest.port) && r.covers(canon))
                    .map_or(Decision::Deny(DenyReason::IpLiteral), Decision::Allow)
            }
        }
    }

    /// Looks a rule up by name.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = r#"
version = 1
name = "test"

[[rules]]
name = "github"
hosts = ["github.com", "*.GitHub.com."]
ports = [443]
action = "passthrough"

[[rules]]
name = "internal-db"
hosts = ["db.corp.test"]
ports = [5432]
action = "passthrough"
protocols = ["tcp"]
cidrs = ["10.1.2.0/24"]

[[rules]]
name = "lab-literal"
ports = [8080]
action = "passthrough"
cidrs = ["::ffff:192.168.7.0/120"]

[[rules]]
name = "named-only"
hosts = ["lab.test"]
ports = [8443]
action = "passthrough"
cidrs = ["192.168.8.0/24"]
"#;

    fn policy() -> Policy {
        profile::parse(PROFILE).unwrap()
    }

    fn named(host: &str, port: u16) -> Destination<'_> {
        Destination {
            hostname: Some(host),
            addr: "198.18.0.1".parse().unwrap(),
            port,
        }
    }

    fn rule_name(d: Decision<'_>) -> String {
        match d {
            Decision::Allow(r) => r.name.clone(),
            Decision::Deny(reason) => format!("deny: {reason}"),
        }
    }

    #[test]
    fn listed_host_and_port_is_allowed_by_its_rule() {
        assert_eq!(
            rule_name(policy().decide(named("api.github.com", 443))),
            "github"
        );
    }

    #[test]
    fn unlisted_host_is_denied_by_default() {
        assert_eq!(
            policy().decide(named("example.com", 443)),
            Decision::Deny(DenyReason::NoRule)
        );
    }

    #[test]
    fn listed_host_on_other_port_is_denied() {
        assert_eq!(
            policy().decide(named("github.com", 80)),
            Decision::Deny(DenyReason::PortNotAllowed)
        );
    }

    #[test]
    fn ip_literal_is_denied_unless_a_rule_names_its_range() {
        let p = policy();
        let lit = |a: &str, port| Destination {
            hostname: None,
            addr: a.parse().unwrap(),
            port,
        };
        assert_eq!(
            p.decide(lit("140.82.112.3", 443)),
            Decision::Deny(DenyReason::IpLiteral)
        );
        assert_eq!(rule_name(p.decide(lit("192.168.7.9", 8080))), "lab-literal");
        assert_eq!(
            rule_name(p.decide(lit("::ffff:192.168.7.9", 8080))),
            "lab-literal"
        );
        assert_eq!(
            p.decide(lit("192.168.7.9", 443)),
            Decision::Deny(DenyReason::IpLiteral)
        );
    }

    #[test]
    fn corporate_rule_decides_like_any_rule_with_hosts() {
        let p = profile::parse(&format!(
            "{PROFILE}\n[[rules]]\nname = \"git\"\nhosts = [\"git.corp.test\"]\nports = [22]\n\
             action = \"corporate\"\nservice = \"git-corp\"\nprotocols = [\"tcp\"]\n"
        ))
        .unwrap();
        match p.decide(named("git.corp.test", 22)) {
            Decision::Allow(rule) => {
                assert_eq!(rule.action, Action::Corporate);
                assert_eq!(
                    rule.service.as_ref().map(ServiceName::as_str),
                    Some("git-corp")
                );
            }
            Decision::Deny(reason) => panic!("denied: {reason}"),
        }
        assert_eq!(
            p.decide(named("git.corp.test", 443)),
            Decision::Deny(DenyReason::PortNotAllowed)
        );
        assert_eq!(p.rule("github").unwrap().service, None);
    }

    #[test]
    fn resolved_private_address_needs_the_rules_cidrs() {
        let p = policy();
        let github = p.rule("github").unwrap();
        let db = p.rule("internal-db").unwrap();
        assert_eq!(
            github.check_address("10.1.2.3".parse().unwrap()),
            Err(AddrClass::Private)
        );
        assert!(db.check_address("10.1.2.3".parse().unwrap()).is_ok());
        assert_eq!(
            db.check_address("10.9.9.9".parse().unwrap()),
            Err(AddrClass::Private)
        );
        assert_eq!(
            github.check_address("::ffff:169.254.169.254".parse().unwrap()),
            Err(AddrClass::LinkLocal)
        );
        assert!(
            github
                .check_address("140.82.112.3".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn default_protocols_are_tls_and_http_and_tcp_must_be_named() {
        let p = policy();
        let github = p.rule("github").unwrap();
        assert!(github.allows_protocol(Protocol::Tls));
        assert!(github.allows_protocol(Protocol::Http));
        assert!(!github.allows_protocol(Protocol::Tcp));
        assert!(
            p.rule("internal-db")
                .unwrap()
                .allows_protocol(Protocol::Tcp)
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        let bad = PROFILE.replace(
            "action = \"passthrough\"\n\n[[rules]]\nname = \"internal-db\"",
            "action = \"passthrough\"\nallow_all = true\n\n[[rules]]\nname = \"internal-db\"",
        );
        assert!(matches!(
            profile::parse(&bad),
            Err(profile::ProfileError::Syntax(_))
        ));
        let top = format!("mode = \"open\"\n{PROFILE}");
        assert!(matches!(
            profile::parse(&top),
            Err(profile::ProfileError::Syntax(_))
        ));
    }

    #[test]
    fn malformed_profiles_are_refused_with_a_reason() {
        let cases = [
            ("version = 2\nname = \"x\"\n", "version"),
            (
                "version = 1\nname = \"x\"\n[[rules]]\nname = \"a\"\nports = [443]\naction = \"passthrough\"\n",
                "neither",
            ),
            (
                "version = 1\nname = \"x\"\n[[rules]]\nname = \"a\"\nhosts = [\"a.com\"]\nports = [0]\naction = \"passthrough\"\n",
                "ports",
            ),
            (
                "version = 1\nname = \"x\"\n[[rules]]\nname = \"a\"\nhosts = [\"a.*.com\"]\nports = [1]\naction = \"passthrough\"\n",
                "host pattern",
            ),
            (
                "version = 1\nname = \"x\"\n[[rules]]\nname = \"a\"\nhosts = [\"a.com\"]\nports = [1]\naction = \"allow-everything\"\n",
                "not valid",
            ),
            (
                "version = 1\nname = \"x\"\n[[rules]]\nname = \"a\"\nhosts = [\"a.com\"]\nports = [1]\naction = \"passthrough\"\n[[rules]]\nname = \"a\"\nhosts = [\"b.com\"]\nports = [1]\naction = \"passthrough\"\n",
                "twice",
            ),
        ];
        for (text, want) in cases {
            let err = profile::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn signed_profile_verifies_and_altered_or_foreign_signatures_do_not() {
        let key = signing::generate("").unwrap();
        let other = signing::generate("").unwrap();
        let pk = signing::parse_public_key(&key.public).unwrap();
        let sig = signing::sign(PROFILE.as_bytes(), &key.secret, "").unwrap();
        assert_eq!(
            signing::load_verified(PROFILE.as_bytes(), &sig, &pk)
                .unwrap()
                .name,
            "test"
        );

        let altered = PROFILE.replace("[443]", "[443, 22]");
        assert!(matches!(
            signing::load_verified(altered.as_bytes(), &sig, &pk),
            Err(signing::SignError::BadSignature(_))
        ));
        let foreign = signing::sign(PROFILE.as_bytes(), &other.secret, "").unwrap();
        assert!(matches!(
            signing::load_verified(PROFILE.as_bytes(), &foreign, &pk),
            Err(signing::SignError::BadSignature(_))
        ));
        assert!(matches!(
            signing::load_verified(PROFILE.as_bytes(), "not a signature", &pk),
            Err(signing::SignError::SignatureFormat(_))
        ));
    }

    #[test]
    fn encrypted_secret_key_needs_its_password() {
        let key = signing::generate("hunter2").unwrap();
        assert!(signing::sign(PROFILE.as_bytes(), &key.secret, "wrong").is_err());
        assert!(signing::sign(PROFILE.as_bytes(), &key.secret, "hunter2").is_ok());
    }

    #[test]
    fn invalid_profile_cannot_be_signed() {
        let key = signing::generate("").unwrap();
        assert!(matches!(
            signing::sign(b"version = 1\n", &key.secret, ""),
            Err(signing::SignError::Profile(_))
        ));
    }
}
