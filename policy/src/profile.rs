//! The policy profile: a TOML file, parsed strictly and compiled into a [`Policy`].
//!
//! ```toml
//! version = 1
//! name = "team-default"
//! serial = 42                       # raised at every signing; a reload may not lower it
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
//!
//! [[rules]]
//! name = "openai"                   # TLS terminated with the workspace CA, secrets injected
//! hosts = ["api.openai.com"]
//! ports = [443]
//! action = "intercept"              # protocols default to, and may only be, ["tls"]
//!
//! [rules.http]                      # optional, intercept rules only: see crate::http_rules
//! default = "deny"                  # required with [rules.http]: what unmatched requests get
//!
//! [[rules.http.requests]]           # first match decides
//! name = "chat"
//! methods = ["POST"]
//! paths = ["/v1/chat/completions", "/v1/models/**"]
//! action = "allow"
//!
//! [rules.mcp]                       # optional, intercept rules only: see crate::mcp_rules
//! path = "/mcp"                     # an MCP server over streamable HTTP at this path
//! methods = { default = "allow" }   # both lists and their defaults required
//! tools = { default = "deny", allow = ["search"] }
//!
//! [[rules]]
//! name = "pypi"                     # only these programs' flows (the guest's claim; narrows)
//! hosts = ["pypi.org", "files.pythonhosted.org"]
//! ports = [443]
//! action = "passthrough"
//! programs = ["/usr/bin/python3.11", "/usr/bin/pip@sha256:<64 hex digits>"]
//!
//! [[rules]]
//! name = "git-corp"                 # to a corporate service, through the broker
//! hosts = ["git.corp.example.com"]  # never resolved by the proxy; no cidrs
//! ports = [22]
//! action = "corporate"
//! service = "git-corp"              # the broker's name for it (a-z, 0-9, '-'; 1-63)
//! protocols = ["tcp"]               # SSH; the default is ["tls", "http"], as for passthrough
//!
//! [[local_routes]]                  # a name the workspace answers itself: its own service
//! host = "inference.local"          # flows to it (on port 80) go to the workspace service
//! service = "llm"                   # `llm` on its loopback port (moat run --service llm:8000=...)
//! # port = 80                       # the port the agent uses; default 80
//!
//! [[secrets]]                       # see crate::secret for every field
//! name = "openai"
//! source = { env = "OPENAI_API_KEY" }
//! placeholder = "sk-moat-placeholder-openai"
//! hosts = ["api.openai.com"]
//! presentation = "authorization_bearer"
//! ```

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::host::{HostError, HostPattern};
use crate::http_rules::{HttpRules, HttpRulesFile};
use crate::mcp_rules::{McpRules, McpRulesFile};
use crate::program::ProgramPattern;
use crate::secret::{Presentation, RESERVED_HEADERS, SecretSource, SecretSpec, is_token};
use crate::service::ServiceName;
use crate::{Action, LocalRoute, Policy, Protocol, Route, Rule};

/// The shortest placeholder accepted: shorter ones could occur by chance in a request.
pub const MIN_PLACEHOLDER_LEN: usize = 12;

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
    /// An intercept rule that allows something other than TLS.
    #[error("rule {0:?} intercepts, so it may only allow protocol \"tls\"")]
    InterceptNotTls(String),
    /// A route on a rule that does not intercept, or to a malformed host or port 0.
    #[error("rule {rule:?} has a bad route: {why}")]
    BadRoute {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        why: String,
    },
    /// An intercept rule without hosts: interception needs a name for its certificate.
    #[error("rule {0:?} intercepts, so it must name hosts")]
    InterceptWithoutHosts(String),
    /// A `corporate` rule without a valid service, without hosts, with cidrs or an IP address
    /// for a host; or a `service` on a rule that is not `corporate`.
    #[error("rule {rule:?} is not a valid corporate rule: {why}")]
    BadCorporate {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        why: String,
    },
    /// HTTP rules on a rule that does not intercept, or an HTTP rule that is not valid.
    #[error("rule {rule:?} has bad HTTP rules{}: {why}", http_rule.as_ref().map(|h| format!(" ({h:?})")).unwrap_or_default())]
    Http {
        /// The rule's name.
        rule: String,
        /// The HTTP rule to blame, if one is.
        http_rule: Option<String>,
        /// What is wrong.
        why: String,
    },
    /// MCP rules on a rule that does not intercept, or MCP rules that are not valid.
    #[error("rule {rule:?} has bad MCP rules: {why}")]
    Mcp {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        why: String,
    },
    /// A rule's `programs` that is empty or holds an entry that is not a program.
    #[error("rule {rule:?} has bad programs: {why}")]
    Programs {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        why: String,
    },
    /// A `[[local_routes]]` entry that is not valid.
    #[error("local route {host:?} is not valid: {why}")]
    BadLocalRoute {
        /// The route's host, as written.
        host: String,
        /// What is wrong.
        why: String,
    },
    /// A secret declaration that is not valid; names the secret, never a value.
    #[error("secret {name:?} is not valid: {why}")]
    Secret {
        /// The secret's name (or its position when it has none).
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A secret declaration with an unknown field, a missing field or a wrong type.
    #[error("secret {name:?} is not valid")]
    SecretSyntax {
        /// The secret's name (or its position when it has none).
        name: String,
        /// The parser's complaint.
        #[source]
        source: Box<toml::de::Error>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    version: u32,
    name: String,
    /// Absent: 0, below every profile that has one.
    #[serde(default)]
    serial: u64,
    #[serde(default)]
    rules: Vec<RuleFile>,
    /// Parsed one by one, so that an error can name the secret.
    #[serde(default)]
    secrets: Vec<toml::Table>,
    #[serde(default)]
    local_routes: Vec<LocalRouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRouteFile {
    host: String,
    service: String,
    #[serde(default = "default_local_route_port")]
    port: u16,
}

fn default_local_route_port() -> u16 {
    80
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    name: String,
    source: SecretSource,
    placeholder: String,
    hosts: Vec<String>,
    #[serde(default = "default_secret_ports")]
    ports: Vec<u16>,
    #[serde(default)]
    paths: Vec<String>,
    presentation: Presentation,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    require: bool,
}

/// The `placeholder` value that asks for a random placeholder per workspace.
const AUTO_PLACEHOLDER: &str = "auto";

fn default_secret_ports() -> Vec<u16> {
    vec![443]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    ports: Vec<u16>,
    action: Action,
    #[serde(default)]
    protocols: Option<Vec<Protocol>>,
    #[serde(default)]
    cidrs: Vec<IpNet>,
    #[serde(default)]
    route: Option<RouteFile>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    http: Option<HttpRulesFile>,
    #[serde(default)]
    programs: Option<Vec<String>>,
    #[serde(default)]
    mcp: Option<McpRulesFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    host: String,
    #[serde(default = "default_route_port")]
    port: u16,
    #[serde(default)]
    model: Option<String>,
}

fn default_route_port() -> u16 {
    443
}

fn default_protocols(action: Action) -> Vec<Protocol> {
    match action {
        Action::Intercept => vec![Protocol::Tls],
        _ => vec![Protocol::Tls, Protocol::Http],
    }
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
        let protocols = r.protocols.unwrap_or_else(|| default_protocols(r.action));
        if protocols.is_empty() {
            return Err(ProfileError::NoProtocol(r.name));
        }
        if r.action == Action::Intercept && protocols.iter().any(|p| *p != Protocol::Tls) {
            return Err(ProfileError::InterceptNotTls(r.name));
        }
        if r.action == Action::Intercept && r.hosts.is_empty() {
            return Err(ProfileError::InterceptWithoutHosts(r.name));
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
        let service = corporate_service(&r.name, r.action, r.service.as_deref(), &hosts, &r.cidrs)?;
        let route = match r.route {
            None => None,
            Some(route) => {
                let bad = |why: String| ProfileError::BadRoute {
                    rule: r.name.clone(),
                    why,
                };
                if r.action != Action::Intercept {
                    return Err(bad("only intercept rules can route".into()));
                }
                if route.port == 0 {
                    return Err(bad("port 0".into()));
                }
                let host = crate::host::normalize(&route.host).map_err(|e| bad(e.to_string()))?;
                if route.model.as_deref().is_some_and(str::is_empty) {
                    return Err(bad("an empty model name".into()));
                }
                Some(Route {
                    host,
                    port: route.port,
                    model: route.model,
                })
            }
        };
        let http = http_rules(&r.name, r.action, r.http)?;
        let mcp = mcp_rules(&r.name, r.action, r.mcp)?;
        let programs = programs(&r.name, r.programs)?;
        rules.push(Rule {
            name: r.name,
            hosts,
            ports: r.ports,
            action: r.action,
            protocols,
            cidrs,
            programs,
            route,
            service,
            http,
            mcp,
        });
    }
    let mut secrets: Vec<SecretSpec> = Vec::with_capacity(file.secrets.len());
    for (i, table) in file.secrets.into_iter().enumerate() {
        let name = match table.get("name").and_then(|v| v.as_str()) {
            Some(n) => n.to_owned(),
            None => format!("#{}", i + 1),
        };
        let raw = SecretFile::deserialize(toml::Value::Table(table)).map_err(|source| {
            ProfileError::SecretSyntax {
                name: name.clone(),
                source: Box::new(source),
            }
        })?;
        let spec = compile_secret(raw)?;
        check_secret_against_others(&spec, &secrets)?;
        secrets.push(spec);
    }
    let local_routes = local_routes(file.local_routes)?;
    Ok(Policy {
        name: file.name,
        serial: file.serial,
        rules,
        secrets,
        local_routes,
    })
}

/// The `[[local_routes]]`: exact names (no pattern: the netstack answers one name), each name
/// and port once, a port above 0, a service name of the grammar services have.
fn local_routes(raw: Vec<LocalRouteFile>) -> Result<Vec<LocalRoute>, ProfileError> {
    let mut routes: Vec<LocalRoute> = Vec::with_capacity(raw.len());
    for r in raw {
        let bad = |why: &str| ProfileError::BadLocalRoute {
            host: r.host.clone(),
            why: why.to_owned(),
        };
        if r.host.contains('*') || r.host.parse::<std::net::IpAddr>().is_ok() {
            return Err(bad("the host must be one exact name"));
        }
        let host = crate::host::normalize(&r.host).map_err(|e| bad(&e.to_string()))?;
        if r.port == 0 {
            return Err(bad("port 0"));
        }
        let service = ServiceName::parse(&r.service).map_err(|e| bad(&e.to_string()))?;
        if routes.iter().any(|o| o.host == host && o.port == r.port) {
            return Err(bad("routed twice on the same port"));
        }
        routes.push(LocalRoute {
            host,
            port: r.port,
            service,
        });
    }
    Ok(routes)
}

/// The service of a `corporate` rule, checked with everything else such a rule must (not) have;
/// `None` for any other rule, which must not name a service.
fn corporate_service(
    rule: &str,
    action: Action,
    service: Option<&str>,
    hosts: &[HostPattern],
    cidrs: &[IpNet],
) -> Result<Option<ServiceName>, ProfileError> {
    let bad = |why: String| ProfileError::BadCorporate {
        rule: rule.to_owned(),
        why,
    };
    if action != Action::Corporate {
        return match service {
            Some(_) => Err(bad(
                "a service is only allowed with action = \"corporate\"".into()
            )),
            None => Ok(None),
        };
    }
    let Some(name) = service else {
        return Err(bad(
            "action = \"corporate\" needs a service (the broker's name for it)".into(),
        ));
    };
    let service = ServiceName::parse(name).map_err(|e| bad(e.to_string()))?;
    if hosts.is_empty() {
        return Err(bad(
            "it must name hosts (IP-literal destinations never go to the broker)".into(),
        ));
    }
    if let Some(HostPattern::Exact(ip)) = hosts
        .iter()
        .find(|h| matches!(h, HostPattern::Exact(n) if n.parse::<Ipv4Addr>().is_ok()))
    {
        return Err(bad(format!("host {ip:?} is an IP address, not a name")));
    }
    if !cidrs.is_empty() {
        return Err(bad(
            "cidrs do not apply: the proxy does not resolve its hosts, the broker connects to \
             the service's configured address"
                .into(),
        ));
    }
    Ok(Some(service))
}

/// A rule's `programs`, parsed: each entry a path or `path@sha256:hex`, at least one.
fn programs(
    rule: &str,
    programs: Option<Vec<String>>,
) -> Result<Option<Vec<ProgramPattern>>, ProfileError> {
    let Some(list) = programs else {
        return Ok(None);
    };
    let bad = |why: String| ProfileError::Programs {
        rule: rule.to_owned(),
        why,
    };
    if list.is_empty() {
        return Err(bad(
            "programs = [] allows no flow at all; remove the rule, or the field to allow any program"
                .into(),
        ));
    }
    list.iter()
        .map(|p| ProgramPattern::parse(p).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The HTTP rules of an intercept rule, compiled; refused on any other rule (the proxy sees
/// requests only where it terminates TLS).
fn http_rules(
    rule: &str,
    action: Action,
    http: Option<HttpRulesFile>,
) -> Result<Option<HttpRules>, ProfileError> {
    let Some(file) = http else {
        return Ok(None);
    };
    if action != Action::Intercept {
        return Err(ProfileError::Http {
            rule: rule.to_owned(),
            http_rule: None,
            why: "HTTP rules need action = \"intercept\": the proxy sees requests only on \
                  flows it terminates"
                .into(),
        });
    }
    file.compile().map(Some).map_err(|e| ProfileError::Http {
        rule: rule.to_owned(),
        http_rule: e.http_rule,
        why: e.why,
    })
}

/// The MCP rules of an intercept rule, compiled; refused on any other rule (the proxy reads
/// JSON-RPC only where it terminates TLS).
fn mcp_rules(
    rule: &str,
    action: Action,
    mcp: Option<McpRulesFile>,
) -> Result<Option<McpRules>, ProfileError> {
    let Some(file) = mcp else {
        return Ok(None);
    };
    let bad = |why: String| ProfileError::Mcp {
        rule: rule.to_owned(),
        why,
    };
    if action != Action::Intercept {
        return Err(bad(
            "MCP rules need action = \"intercept\": the proxy reads requests only on flows it \
             terminates"
                .into(),
        ));
    }
    file.compile().map(Some).map_err(bad)
}

fn compile_secret(raw: SecretFile) -> Result<SecretSpec, ProfileError> {
    let bad = |why: String| ProfileError::Secret {
        name: raw.name.clone(),
        why,
    };
    if raw.name.is_empty()
        || !raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad("the name must be letters, digits, '-' or '_'".into()));
    }
    match &raw.source {
        SecretSource::Env(var) if var.is_empty() || var.contains('=') => {
            return Err(bad("source env must name a variable".into()));
        }
        SecretSource::File(path) if !path.is_absolute() => {
            return Err(bad("source file must be an absolute path".into()));
        }
        SecretSource::Command(argv) if argv.first().is_none_or(String::is_empty) => {
            return Err(bad("source command must name a program".into()));
        }
        _ => {}
    }
    let auto_placeholder = raw.placeholder == AUTO_PLACEHOLDER;
    let p = &raw.placeholder;
    if !auto_placeholder
        && (p.len() < MIN_PLACEHOLDER_LEN || !p.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(bad(format!(
            "the placeholder must be \"auto\" or at least {MIN_PLACEHOLDER_LEN} visible ASCII \
             characters"
        )));
    }
    match &raw.env {
        None if auto_placeholder => {
            return Err(bad(
                "an \"auto\" placeholder needs env, the variable the agent finds it in".into(),
            ));
        }
        Some(var) if !is_env_name(var) => {
            return Err(bad(format!(
                "env {var:?} must be letters, digits and '_', not starting with a digit"
            )));
        }
        _ => {}
    }
    if raw.hosts.is_empty() {
        return Err(bad("it must be bound to at least one host".into()));
    }
    let hosts = raw
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if raw.ports.is_empty() || raw.ports.contains(&0) {
        return Err(bad("ports must be between 1 and 65535".into()));
    }
    if let Some(path) = raw.paths.iter().find(|p| !p.starts_with('/')) {
        return Err(bad(format!("path prefix {path:?} must start with '/'")));
    }
    if let Presentation::Header(h) = &raw.presentation
        && (!is_token(h) || RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str()))
    {
        return Err(bad(format!("{h:?} cannot carry a credential")));
    }
    Ok(SecretSpec {
        name: raw.name,
        source: raw.source,
        placeholder: if auto_placeholder {
            String::new()
        } else {
            raw.placeholder
        },
        auto_placeholder,
        env: raw.env,
        require: raw.require,
        hosts,
        ports: raw.ports,
        paths: raw.paths,
        presentation: raw.presentation,
    })
}

/// Is `name` a portable environment variable name?
fn is_env_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Names and placeholders are unique, and no placeholder contains another (a request that
/// holds the longer one would also hold the shorter one).
fn check_secret_against_others(
    spec: &SecretSpec,
    others: &[SecretSpec],
) -> Result<(), ProfileError> {
    for o in others {
        // Auto placeholders are drawn later, at random: they overlap nothing.
        let fixed = !o.auto_placeholder && !spec.auto_placeholder;
        let why = if o.name == spec.name {
            "the name is used twice"
        } else if spec.env.is_some() && o.env == spec.env {
            "its env variable is used by another secret"
        } else if fixed
            && (o.placeholder.contains(&spec.placeholder)
                || spec.placeholder.contains(&o.placeholder))
        {
            "its placeholder overlaps another secret's"
        } else {
            continue;
        };
        return Err(ProfileError::Secret {
            name: spec.name.clone(),
            why: why.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(text: &str) -> Result<Policy, ProfileError> {
        parse(&format!("version = 1\nname = \"l\"\n{text}"))
    }

    #[test]
    fn a_local_route_names_a_host_a_service_and_port_80_by_default() {
        let p = local("[[local_routes]]\nhost = \"Inference.Local\"\nservice = \"llm\"\n").unwrap();
        assert_eq!(p.local_routes.len(), 1);
        let r = &p.local_routes[0];
        assert_eq!(
            (r.host.as_str(), r.port, r.service.as_str()),
            ("inference.local", 80, "llm")
        );
    }

    #[test]
    fn bad_local_routes_are_refused() {
        for bad in [
            "host = \"*.local\"\nservice = \"llm\"",
            "host = \"10.0.0.1\"\nservice = \"llm\"",
            "host = \"inference.local\"\nservice = \"LLM\"",
            "host = \"inference.local\"\nservice = \"llm\"\nport = 0",
            "host = \"inference.local\"\nservice = \"llm\"\nmodel = \"x\"",
        ] {
            assert!(
                local(&format!("[[local_routes]]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
        let twice = "[[local_routes]]\nhost = \"a.local\"\nservice = \"x\"\n\
                     [[local_routes]]\nhost = \"a.local\"\nservice = \"y\"\n";
        assert!(matches!(
            local(twice),
            Err(ProfileError::BadLocalRoute { .. })
        ));
    }

    const BASE: &str = r#"
version = 1
name = "inject"

[[rules]]
name = "openai"
hosts = ["api.openai.com"]
ports = [443]
action = "intercept"
"#;

    const SECRET: &str = r#"
[[secrets]]
name = "openai"
source = { env = "OPENAI_API_KEY" }
placeholder = "sk-moat-placeholder-openai"
hosts = ["api.openai.com"]
paths = ["/v1/"]
presentation = "authorization_bearer"
"#;

    fn with(extra: &str) -> Result<Policy, ProfileError> {
        parse(&format!("{BASE}{extra}"))
    }

    #[test]
    fn serial_is_read_and_absent_means_zero() {
        assert_eq!(with("").unwrap().serial, 0);
        let p =
            parse(&BASE.replace("name = \"inject\"\n", "name = \"inject\"\nserial = 7\n")).unwrap();
        assert_eq!(p.serial, 7);
        for bad in ["serial = -1", "serial = \"7\"", "serial = 1.5"] {
            let text = BASE.replace(
                "name = \"inject\"\n",
                &format!("name = \"inject\"\n{bad}\n"),
            );
            assert!(
                matches!(parse(&text), Err(ProfileError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn intercept_rule_defaults_to_tls_only() {
        let p = with("").unwrap();
        assert_eq!(p.rules[0].action, Action::Intercept);
        assert_eq!(p.rules[0].protocols, vec![Protocol::Tls]);
    }

    #[test]
    fn routed_rule_names_its_upstream() {
        let text = BASE.replace(
            "action = \"intercept\"",
            "action = \"intercept\"\nroute = { host = \"API.Provider.test\" }",
        );
        let route = parse(&text).unwrap().rules[0].route.clone().unwrap();
        assert_eq!(
            (route.host.as_str(), route.port),
            ("api.provider.test", 443)
        );
    }

    #[test]
    fn route_on_a_passthrough_rule_is_refused() {
        let text = BASE.replace(
            "action = \"intercept\"",
            "action = \"passthrough\"\nroute = { host = \"api.provider.test\" }",
        );
        assert!(matches!(parse(&text), Err(ProfileError::BadRoute { .. })));
    }

    #[test]
    fn intercept_rule_allowing_plain_http_is_refused() {
        let text = BASE.replace(
            "action = \"intercept\"",
            "action = \"intercept\"\nprotocols = [\"tls\", \"http\"]",
        );
        assert!(matches!(
            parse(&text),
            Err(ProfileError::InterceptNotTls(_))
        ));
    }

    const CORPORATE: &str = r#"
version = 1
name = "corp"

[[rules]]
name = "git"
hosts = ["git.corp.example.com"]
ports = [22]
action = "corporate"
service = "git-corp"
protocols = ["tcp"]
"#;

    /// The corporate rule's error message, with `from` replaced by `to` in its profile.
    fn corporate_error(from: &str, to: &str) -> String {
        assert!(CORPORATE.contains(from), "{from:?} is not in the profile");
        parse(&CORPORATE.replace(from, to)).unwrap_err().to_string()
    }

    #[test]
    fn corporate_rule_names_its_service() {
        let p = parse(CORPORATE).unwrap();
        let rule = &p.rules[0];
        assert_eq!(rule.action, Action::Corporate);
        assert_eq!(rule.action.as_str(), "corporate");
        assert_eq!(rule.service.as_ref().unwrap().as_str(), "git-corp");
        assert_eq!(rule.protocols, vec![Protocol::Tcp]);
        assert!(rule.cidrs.is_empty());
    }

    #[test]
    fn corporate_rule_defaults_to_tls_and_http_like_passthrough() {
        let p = parse(&CORPORATE.replace("protocols = [\"tcp\"]\n", "")).unwrap();
        assert_eq!(p.rules[0].protocols, vec![Protocol::Tls, Protocol::Http]);
    }

    #[test]
    fn corporate_rule_accepts_wildcard_hosts() {
        let p = parse(&CORPORATE.replace(
            "hosts = [\"git.corp.example.com\"]",
            "hosts = [\"*.corp.example.com\"]",
        ))
        .unwrap();
        assert_eq!(p.rules[0].service.as_ref().unwrap().as_str(), "git-corp");
    }

    #[test]
    fn corporate_rule_without_a_service_is_refused() {
        let err = corporate_error("service = \"git-corp\"\n", "");
        assert!(err.contains("rule \"git\""), "{err}");
        assert!(err.contains("needs a service"), "{err}");
    }

    #[test]
    fn corporate_rule_with_a_malformed_service_name_is_refused() {
        let too_long = format!("service = \"{}\"", "s".repeat(64));
        for bad in [
            "service = \"\"",
            "service = \"Git-Corp\"",
            "service = \"-git\"",
            "service = \"git.corp.example.com\"",
            "service = \"git-corp:22\"",
            "service = \"git corp\"",
            "service = \"git\\ncorp\"",
            too_long.as_str(),
        ] {
            let err = corporate_error("service = \"git-corp\"", bad);
            assert!(err.contains("rule \"git\""), "{bad}: {err}");
            assert!(err.contains("is not a service name"), "{bad}: {err}");
        }
    }

    #[test]
    fn corporate_service_that_is_not_a_string_is_refused() {
        let err = corporate_error("service = \"git-corp\"", "service = 22");
        assert!(err.contains("not valid"), "{err}");
    }

    #[test]
    fn service_on_a_rule_that_is_not_corporate_is_refused() {
        for action in ["passthrough", "intercept"] {
            let text = CORPORATE
                .replace("action = \"corporate\"", &format!("action = \"{action}\""))
                .replace("protocols = [\"tcp\"]", "protocols = [\"tls\"]");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("rule \"git\""), "{action}: {err}");
            assert!(err.contains("only allowed with action"), "{action}: {err}");
        }
    }

    #[test]
    fn corporate_rule_without_hosts_is_refused() {
        let err = corporate_error(
            "hosts = [\"git.corp.example.com\"]",
            "cidrs = [\"10.1.2.0/24\"]",
        );
        assert!(err.contains("rule \"git\""), "{err}");
        assert!(err.contains("must name hosts"), "{err}");
    }

    #[test]
    fn corporate_rule_with_an_ip_address_for_a_host_is_refused() {
        let err = corporate_error(
            "hosts = [\"git.corp.example.com\"]",
            "hosts = [\"git.corp.example.com\", \"10.1.2.3.\"]",
        );
        assert!(err.contains("rule \"git\""), "{err}");
        assert!(err.contains("\"10.1.2.3\" is an IP address"), "{err}");
    }

    #[test]
    fn corporate_rule_with_cidrs_is_refused() {
        let err = corporate_error(
            "protocols = [\"tcp\"]",
            "protocols = [\"tcp\"]\ncidrs = [\"10.1.2.0/24\"]",
        );
        assert!(err.contains("rule \"git\""), "{err}");
        assert!(err.contains("cidrs do not apply"), "{err}");
    }

    #[test]
    fn corporate_rule_with_a_route_is_refused() {
        let err = corporate_error(
            "protocols = [\"tcp\"]",
            "protocols = [\"tcp\"]\nroute = { host = \"git2.corp.example.com\" }",
        );
        assert!(err.contains("rule \"git\""), "{err}");
        assert!(err.contains("only intercept rules can route"), "{err}");
    }

    #[test]
    fn corporate_rule_with_an_unknown_field_is_refused() {
        let err = corporate_error("service = \"git-corp\"", "services = [\"git-corp\"]");
        assert!(err.contains("not valid"), "{err}");
        let err = corporate_error(
            "service = \"git-corp\"",
            "service = \"git-corp\"\naddress = \"10.1.2.3:22\"",
        );
        assert!(err.contains("not valid"), "{err}");
    }

    #[test]
    fn auto_placeholder_needs_an_env_and_compiles_empty_for_the_proxy_to_fill() {
        let auto = SECRET.replace(
            "placeholder = \"sk-moat-placeholder-openai\"",
            "placeholder = \"auto\"\nenv = \"OPENAI_API_KEY\"\nrequire = true",
        );
        let p = with(&auto).unwrap();
        let s = &p.secrets[0];
        assert!(s.auto_placeholder && s.require);
        assert_eq!(s.placeholder, "");
        assert_eq!(s.env.as_deref(), Some("OPENAI_API_KEY"));
        // Two auto placeholders never overlap (they are drawn at random).
        let second = auto
            .replace("name = \"openai\"", "name = \"other\"")
            .replace("env = \"OPENAI_API_KEY\"", "env = \"OTHER\"");
        assert!(with(&format!("{auto}{second}")).is_ok());

        let err = with(&SECRET.replace("sk-moat-placeholder-openai", "auto"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs env"), "{err}");
        for bad in ["1X", "A-B", "", "A=B"] {
            let text = SECRET.replace("presentation", &format!("env = \"{bad}\"\npresentation"));
            assert!(with(&text).is_err(), "{bad}");
        }
        // A fixed placeholder may be exported too.
        let fixed = SECRET.replace("presentation", "env = \"OPENAI_API_KEY\"\npresentation");
        let p = with(&fixed).unwrap();
        assert!(!p.secrets[0].auto_placeholder);
        assert_eq!(p.secrets[0].placeholder, "sk-moat-placeholder-openai");
    }

    #[test]
    fn secret_declaration_compiles_with_defaults() {
        let p = with(SECRET).unwrap();
        let s = &p.secrets[0];
        assert_eq!(s.name, "openai");
        assert_eq!(s.source, SecretSource::Env("OPENAI_API_KEY".into()));
        assert_eq!(s.ports, vec![443]);
        assert_eq!(s.paths, vec!["/v1/".to_owned()]);
        assert_eq!(s.presentation, Presentation::AuthorizationBearer);
    }

    #[test]
    fn every_source_and_presentation_form_parses() {
        let text = r#"
[[secrets]]
name = "a"
source = { file = "/run/secrets/a" }
placeholder = "moat-placeholder-a"
hosts = ["*.a.test"]
presentation = "x_api_key"

[[secrets]]
name = "b"
source = { command = ["vault", "read", "-field=token", "secret/b"] }
placeholder = "moat-placeholder-b"
hosts = ["b.test"]
ports = [8443]
presentation = { header = "X-Auth-Token" }

[[secrets]]
name = "c"
source = { env = "C" }
placeholder = "moat-placeholder-c"
hosts = ["c.test"]
presentation = "authorization_basic"
"#;
        let p = with(text).unwrap();
        assert_eq!(
            p.secrets[1].presentation,
            Presentation::Header("X-Auth-Token".into())
        );
        assert_eq!(p.secrets[1].presentation.header_name(), "x-auth-token");
        assert_eq!(p.secrets[2].presentation.header_name(), "authorization");
    }

    #[test]
    fn unknown_field_in_a_secret_is_an_error_naming_it() {
        let err = with(&SECRET.replace("paths", "value = \"sk-real\"\npaths"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret \"openai\""), "{err}");
    }

    #[test]
    fn malformed_secrets_are_refused_naming_the_secret() {
        let cases = [
            (
                "placeholder = \"sk-moat-placeholder-openai\"",
                "placeholder = \"short\"",
                "placeholder",
            ),
            ("hosts = [\"api.openai.com\"]", "hosts = []", "host"),
            (
                "hosts = [\"api.openai.com\"]",
                "hosts = [\"api.*.com\"]",
                "host pattern",
            ),
            (
                "paths = [\"/v1/\"]",
                "paths = [\"v1\"]",
                "must start with '/'",
            ),
            (
                "source = { env = \"OPENAI_API_KEY\" }",
                "source = { file = \"relative\" }",
                "absolute",
            ),
            (
                "source = { env = \"OPENAI_API_KEY\" }",
                "source = { command = [] }",
                "program",
            ),
            (
                "presentation = \"authorization_bearer\"",
                "presentation = { header = \"Content-Length\" }",
                "cannot carry",
            ),
        ];
        for (from, to, want) in cases {
            let err = with(&SECRET.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains("secret \"openai\""), "{err}");
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn overlapping_placeholders_are_refused() {
        let second = SECRET
            .replace("name = \"openai\"", "name = \"other\"")
            .replace("sk-moat-placeholder-openai", "sk-moat-placeholder-openai-2");
        let err = with(&format!("{SECRET}{second}")).unwrap_err().to_string();
        assert!(err.contains("overlaps"), "{err}");
    }

    const HTTP: &str = r#"
[rules.http]
default = "deny"

[[rules.http.requests]]
name = "chat"
methods = ["POST"]
paths = ["/v1/chat/completions"]
action = "allow"
"#;

    #[test]
    fn intercept_rule_carries_its_http_rules() {
        let p = with(HTTP).unwrap();
        let http = p.rules[0].http.as_ref().unwrap();
        assert_eq!(http.default, crate::HttpAction::Deny);
        assert_eq!(http.rules[0].name, "chat");
        assert_eq!(with("").unwrap().rules[0].http, None);
    }

    #[test]
    fn http_rules_on_a_passthrough_rule_are_refused() {
        let text = format!("{BASE}{HTTP}").replace("\"intercept\"", "\"passthrough\"");
        let e = parse(&text).unwrap_err();
        assert!(matches!(&e, ProfileError::Http { rule, http_rule: None, .. } if rule == "openai"));
        assert!(e.to_string().contains("need action = \"intercept\""), "{e}");
    }

    #[test]
    fn a_bad_http_rule_is_refused_naming_rule_and_http_rule() {
        let e = with(&HTTP.replace("\"POST\"", "\"SEND\"")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"openai\"") && text.contains("\"chat\"") && text.contains("SEND"),
            "{text}"
        );
        assert!(matches!(
            with(&HTTP.replace("default = \"deny\"\n", "")),
            Err(ProfileError::Syntax(_))
        ));
        assert!(matches!(
            with(&HTTP.replace("action = \"allow\"", "action = \"allow\"\nhost = \"x\"")),
            Err(ProfileError::Syntax(_))
        ));
    }

    const MCP: &str = r#"
[rules.mcp]
path = "/mcp"
methods = { default = "allow" }
tools = { default = "deny", allow = ["echo"] }
"#;

    #[test]
    fn intercept_rule_carries_its_mcp_rules() {
        let p = with(MCP).unwrap();
        let mcp = p.rules[0].mcp.as_ref().unwrap();
        assert_eq!(mcp.path.as_deref(), Some("/mcp"));
        assert_eq!(mcp.tools.allow, vec!["echo".to_owned()]);
        assert_eq!(with("").unwrap().rules[0].mcp, None);
    }

    #[test]
    fn bad_mcp_rules_are_refused_naming_the_rule() {
        let text = format!("{BASE}{MCP}").replace("\"intercept\"", "\"passthrough\"");
        let e = parse(&text).unwrap_err();
        assert!(
            matches!(&e, ProfileError::Mcp { rule, .. } if rule == "openai"),
            "{e}"
        );
        assert!(e.to_string().contains("need action = \"intercept\""), "{e}");
        let e = with(&MCP.replace("[\"echo\"]", "[\"ec ho\"]")).unwrap_err();
        assert!(
            e.to_string()
                .contains("rule \"openai\" has bad MCP rules: tools: \"ec ho\""),
            "{e}"
        );
        assert!(matches!(
            with(&MCP.replace("tools = { default = \"deny\", allow = [\"echo\"] }\n", "")),
            Err(ProfileError::Syntax(_))
        ));
    }

    #[test]
    fn programs_narrow_a_rule_by_path_and_digest() {
        let hex = "ab".repeat(32);
        let p = with(&format!(
            "programs = [\"/usr/bin/curl\", \"/usr/bin/git@sha256:{hex}\"]\n"
        ))
        .unwrap();
        let rule = &p.rules[0];
        let digest = [0xab; 32];
        let claim = |path, sha256| crate::ProgramClaim { path, sha256 };
        assert!(rule.allows_program(Some(&claim("/usr/bin/curl", None))));
        assert!(rule.allows_program(Some(&claim("/usr/bin/git", Some(&digest)))));
        assert!(!rule.allows_program(Some(&claim("/usr/bin/git", None))));
        assert!(!rule.allows_program(Some(&claim("/usr/bin/python3.11", None))));
        assert!(!rule.allows_program(None));
        // Without programs, the claim is not looked at.
        assert!(with("").unwrap().rules[0].allows_program(None));
    }

    #[test]
    fn bad_programs_are_refused_naming_the_rule() {
        for (bad, want) in [
            ("programs = []", "allows no flow"),
            ("programs = [\"curl\"]", "not an absolute program path"),
            ("programs = [\"/usr/bin/git@sha256:12\"]", "64 hex digits"),
        ] {
            let err = with(&format!("{bad}\n")).unwrap_err().to_string();
            assert!(err.contains("rule \"openai\""), "{bad}: {err}");
            assert!(err.contains(want), "{bad}: {err}");
        }
        assert!(matches!(
            with("programs = \"/usr/bin/curl\"\n"),
            Err(ProfileError::Syntax(_))
        ));
    }
}
