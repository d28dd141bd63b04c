//! Secrets: what the profile says about a credential the proxy injects. Never the value.
//!
//! A secret is *declared* here (where its value comes from on the host, the placeholder the
//! agent sees, the hosts, ports and path prefixes it is bound to, and how it is presented);
//! the egress proxy *reads* it on the host at start and reload. This crate does no I/O.
//!
//! ```toml
//! [[secrets]]
//! name = "openai"
//! source = { env = "OPENAI_API_KEY" }      # or { file = "/path" } or { command = ["vault", "read", "x"] }
//! placeholder = "sk-moat-placeholder-openai"
//! hosts = ["api.openai.com"]
//! ports = [443]                             # default [443]
//! paths = ["/v1/"]                          # optional path prefixes
//! presentation = "authorization_bearer"    # authorization_basic, x_api_key, { header = "Name" }
//! env = "OPENAI_API_KEY"                    # optional: the agent's variable holding the placeholder
//! require = true                            # optional: refuse a bound request without it
//! ```
//!
//! `placeholder = "auto"` makes the proxy draw a fresh random placeholder for each workspace it
//! serves (kept across policy reloads while the workspace lives), so a placeholder seen in one
//! workspace's logs means nothing anywhere else; the agent learns it from the environment
//! variable `env` names, which an auto placeholder therefore requires.

use std::path::PathBuf;

use serde::Deserialize;

use crate::host::HostPattern;

/// Where a secret's value is read from, on the host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable of the proxy process.
    Env(String),
    /// A file (absolute path); one trailing newline is removed.
    File(PathBuf),
    /// A command (argv, no shell) whose standard output is the value; one trailing newline is
    /// removed. For vaults.
    Command(Vec<String>),
}

/// How a secret is presented to its upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Presentation {
    /// `Authorization: Bearer <value>`.
    AuthorizationBearer,
    /// `Authorization: Basic base64(<value>)`; the value is `user:password`.
    AuthorizationBasic,
    /// `x-api-key: <value>`.
    XApiKey,
    /// `<Name>: <value>`.
    Header(String),
}

impl Presentation {
    /// The header this presentation sets, lowercase.
    pub fn header_name(&self) -> String {
        match self {
            Presentation::AuthorizationBearer | Presentation::AuthorizationBasic => {
                "authorization".into()
            }
            Presentation::XApiKey => "x-api-key".into(),
            Presentation::Header(name) => name.to_ascii_lowercase(),
        }
    }
}

/// One compiled secret declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    /// Unique name, quoted in audit records (never the value).
    pub name: String,
    /// Where the value comes from.
    pub source: SecretSource,
    /// The string the agent is given instead of the value. Empty in a compiled profile when
    /// [`SecretSpec::auto_placeholder`]: the proxy fills it in for each workspace.
    pub placeholder: String,
    /// `placeholder = "auto"`: a random placeholder per workspace, drawn by the proxy.
    pub auto_placeholder: bool,
    /// The environment variable the agent is given the placeholder in, if any.
    pub env: Option<String>,
    /// A request bound to the secret (host, port and path) must carry its placeholder in the
    /// presentation header, or it is refused: no silent injection into every request.
    pub require: bool,
    /// Hosts the secret is bound to.
    pub hosts: Vec<HostPattern>,
    /// Ports the secret is bound to.
    pub ports: Vec<u16>,
    /// Path prefixes the secret is bound to; empty means every path.
    pub paths: Vec<String>,
    /// How it is presented.
    pub presentation: Presentation,
}

impl SecretSpec {
    /// Is the secret bound to this (normalised) host and port, whatever the path?
    pub fn binds_host(&self, host: &str, port: u16) -> bool {
        self.ports.contains(&port) && self.hosts.iter().any(|p| p.matches(host))
    }

    /// Is the secret bound to this host, port and request path? The path is matched against
    /// the prefixes in its normalised form ([`crate::path::normalize_path`]); a path that has
    /// none (path parameters, double encoding, encoded separators, non-ASCII) never matches a
    /// prefix, since the upstream could read it as a path outside the prefix.
    pub fn binds(&self, host: &str, port: u16, path: &str) -> bool {
        self.binds_host(host, port)
            && (self.paths.is_empty()
                || crate::path::normalize_path(path).is_ok_and(|p| {
                    self.paths
                        .iter()
                        .any(|prefix| p.starts_with(prefix.as_str()))
                }))
    }

    /// Does the request's path decide whether this secret applies (it has path prefixes)?
    pub fn has_paths(&self) -> bool {
        !self.paths.is_empty()
    }
}

/// Is `name` a valid HTTP header field name (an RFC 9110 token)?
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers a secret may never be presented in: they frame or route the request.
pub(crate) const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(paths: &[&str]) -> SecretSpec {
        SecretSpec {
            name: "s".into(),
            source: SecretSource::Env("X".into()),
            placeholder: "sk-moat-placeholder-s".into(),
            auto_placeholder: false,
            env: None,
            require: false,
            hosts: vec![HostPattern::parse("api.example.com").unwrap()],
            ports: vec![443],
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            presentation: Presentation::AuthorizationBearer,
        }
    }

    #[test]
    fn secret_binds_only_its_hosts_and_ports() {
        let s = spec(&[]);
        assert!(s.binds("api.example.com", 443, "/anything"));
        assert!(!s.binds("api.example.com", 8443, "/anything"));
        assert!(!s.binds("example.com", 443, "/anything"));
    }

    #[test]
    fn path_prefix_binds_only_paths_below_it() {
        let s = spec(&["/v1/"]);
        assert!(s.binds("api.example.com", 443, "/v1/chat"));
        assert!(!s.binds("api.example.com", 443, "/v2/chat"));
    }

    #[test]
    fn dot_segments_and_encoded_separators_never_match_a_path_prefix() {
        let s = spec(&["/v1/"]);
        for path in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/..%2Fadmin",
            "/v1/..;/admin",
            "/v1/%252e%252e/admin",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/\u{e9}/../../admin",
            "/v1/..\\admin",
            "/v2/../v1x",
        ] {
            assert!(!s.binds("api.example.com", 443, path), "{path}");
        }
    }

    #[test]
    fn a_path_is_matched_in_its_normalised_form() {
        let s = spec(&["/v1/"]);
        for path in ["/v1/./x", "/v2/../v1/x", "/%76%31/x", "/v1/a/../b"] {
            assert!(s.binds("api.example.com", 443, path), "{path}");
        }
    }
}
