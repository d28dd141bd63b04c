//! `moat policy ...`: keys, signatures, checks and explanations.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use moat_policy::signing;
use moat_policy::{Decision, Destination, Policy, normalize, profile};

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Generate a signing key pair: <out>.pub (give to proxies) and <out>.key (keep secret).
    /// The secret key is encrypted with $MOAT_POLICY_KEY_PASSWORD (unencrypted if unset).
    Keygen {
        /// Path prefix for the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a profile: writes <profile>.minisig (readable by `minisign -V`).
    Sign {
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
        /// The profile to sign.
        profile: PathBuf,
    },
    /// Verify a profile's signature against a trusted public key, then check it.
    Verify {
        /// The trusted public key file.
        #[arg(long)]
        pubkey: PathBuf,
        /// The profile (its signature is <profile>.minisig).
        profile: PathBuf,
    },
    /// Check a profile's syntax and rules without any signature.
    Check {
        /// The profile.
        profile: PathBuf,
    },
    /// Say which rule decides a destination, and why.
    Explain {
        /// The profile (default: the development profile). Its signature is verified.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The trusted public key (default: the development key).
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// The program the flow comes from, as the workspace names it: its path (symlinks
        /// resolved), or path@sha256:HEX. Without it: a flow that names none.
        #[arg(long, value_name = "PATH[@sha256:HEX]")]
        program: Option<String>,
        /// host:port, or ip:port for an IP literal ([v6]:port).
        destination: String,
    },
    /// Check table-driven expectations (destination, request -> allow/deny, secrets injected)
    /// against a signed profile. Exit status 0: all pass; 1: one fails; 2: unusable input.
    Test {
        /// The profile (default: the development profile). Its signature is verified.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The trusted public key (default: the development key).
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// The case file ([[cases]]: destination, program, method, path, expect, inject).
        cases: PathBuf,
    },
}

fn password() -> String {
    std::env::var("MOAT_POLICY_KEY_PASSWORD").unwrap_or_default()
}

fn sig_path(profile: &Path) -> PathBuf {
    let mut p = profile.as_os_str().to_owned();
    p.push(".minisig");
    PathBuf::from(p)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn load_verified(profile: &Path, pubkey: &Path) -> Result<Policy> {
    let key = signing::parse_public_key(&String::from_utf8_lossy(&read(pubkey)?))
        .with_context(|| format!("cannot use {}", pubkey.display()))?;
    let sig = String::from_utf8_lossy(&read(&sig_path(profile))?).into_owned();
    signing::load_verified(&read(profile)?, &sig, &key)
        .with_context(|| format!("{} refused", profile.display()))
}

/// How a profile is named in output: its name and its serial (which a reload may not lower).
fn label(policy: &Policy) -> String {
    format!("profile {:?} (serial {})", policy.name, policy.serial)
}

fn summary(policy: &Policy) {
    println!("{}: {} rule(s)", label(policy), policy.rules.len());
    for rule in &policy.rules {
        let hosts: Vec<String> = rule.hosts.iter().map(ToString::to_string).collect();
        let cidrs: Vec<String> = rule.cidrs.iter().map(ToString::to_string).collect();
        println!(
            "  {:<20} {} ports {:?} hosts [{}]{}",
            rule.name,
            rule.action.as_str(),
            rule.ports,
            hosts.join(", "),
            if cidrs.is_empty() {
                String::new()
            } else {
                format!(" cidrs [{}]", cidrs.join(", "))
            }
        );
        if let Some(programs) = describe_programs(rule) {
            println!("  {:<20} {programs}", "");
        }
        if let Some(http) = &rule.http {
            println!(
                "  {:<20} {} HTTP rule(s), unmatched requests: {}",
                "",
                http.rules.len(),
                http.default.as_str()
            );
        }
        if let Some(mcp) = &rule.mcp {
            println!(
                "  {:<20} MCP rules at {}: methods {}, tools {}",
                "",
                mcp.path.as_deref().unwrap_or("every path"),
                describe_mcp_list(&mcp.methods),
                describe_mcp_list(&mcp.tools)
            );
        }
    }
    if !policy.secrets.is_empty() {
        println!(
            "{} secret(s) (values are read by the proxy, never shown):",
            policy.secrets.len()
        );
    }
    for secret in &policy.secrets {
        println!("  {}", describe_secret(secret));
    }
}

/// A line about a rule's `programs`, if it has any.
fn describe_programs(rule: &moat_policy::Rule) -> Option<String> {
    let programs: Vec<String> = rule
        .programs
        .as_ref()?
        .iter()
        .map(ToString::to_string)
        .collect();
    Some(format!(
        "only flows these programs open (the workspace's claim; none named: refused): [{}]",
        programs.join(", ")
    ))
}

/// The program a flow claims, from `PATH` or `PATH@sha256:HEX` (what `explain --program` and
/// a case's `program` take).
pub(crate) fn parse_program(text: &str) -> Result<moat_policy::ProgramPattern> {
    moat_policy::ProgramPattern::parse(text).with_context(|| format!("program {text:?}"))
}

/// The claim of a parsed program.
pub(crate) fn claim(program: &moat_policy::ProgramPattern) -> moat_policy::ProgramClaim<'_> {
    moat_policy::ProgramClaim {
        path: &program.path,
        sha256: program.sha256.as_ref(),
    }
}

/// Lines about an intercept rule's HTTP rules, in the order they are tried.
fn describe_http(http: &moat_policy::HttpRules) -> Vec<String> {
    let mut lines = vec![format!(
        "HTTP rules (first match decides on the normalised path; unmatched: {}):",
        http.default.as_str()
    )];
    for r in &http.rules {
        let methods = if r.methods.is_empty() {
            "any method".to_owned()
        } else {
            r.methods.join(",")
        };
        let paths: Vec<String> = r.paths.iter().map(ToString::to_string).collect();
        let query = match &r.query {
            None => String::new(),
            Some(keys) if keys.is_empty() => " with no query".to_owned(),
            Some(keys) => format!(" query keys among [{}]", keys.join(", ")),
        };
        lines.push(format!(
            "  {:<5} {:<16} {methods} [{}]{query}",
            r.action.as_str(),
            r.name,
            paths.join(", ")
        ));
    }
    lines.push(format!(
        "  {:<5} {:<16} everything else",
        http.default.as_str(),
        moat_policy::http_rules::DEFAULT_NAME
    ));
    lines
}

/// One MCP list in words: `deny [..], allow [..], else <default>`.
fn describe_mcp_list(list: &moat_policy::mcp_rules::McpList) -> String {
    let mut parts = Vec::new();
    if !list.deny.is_empty() {
        parts.push(format!("deny [{}]", list.deny.join(", ")));
    }
    if !list.allow.is_empty() {
        parts.push(format!("allow [{}]", list.allow.join(", ")));
    }
    parts.push(format!("else {}", list.default.as_str()));
    parts.join(", ")
}

/// Lines about an intercept rule's MCP rules, in the order they are applied.
fn describe_mcp(mcp: &moat_policy::McpRules) -> Vec<String> {
    vec![
        format!(
            "MCP rules (JSON-RPC over streamable HTTP at {}; deny, then allow, then the default):",
            mcp.path.as_deref().unwrap_or("every path")
        ),
        format!("  methods: {}", describe_mcp_list(&mcp.methods)),
        format!(
            "  tools:   {} (tools/call, and what tools/list shows)",
            describe_mcp_list(&mcp.tools)
        ),
    ]
}

/// One line about a secret: where it comes from, where it is bound, how it is presented.
fn describe_secret(s: &moat_policy::SecretSpec) -> String {
    let hosts: Vec<String> = s.hosts.iter().map(ToString::to_string).collect();
    let source = match &s.source {
        moat_policy::SecretSource::Env(v) => format!("env {v}"),
        moat_policy::SecretSource::File(p) => format!("file {}", p.display()),
        moat_policy::SecretSource::Command(argv) => {
            format!("command {}", argv.first().map_or("", String::as_str))
        }
    };
    let paths = if s.paths.is_empty() {
        String::new()
    } else {
        format!(" paths [{}]", s.paths.join(", "))
    };
    let placeholder = if s.auto_placeholder {
        "auto (per workspace)".to_owned()
    } else {
        format!("{:?}", s.placeholder)
    };
    format!(
        "{:<20} from {source}, placeholder {placeholder}, bound to [{}] ports {:?}{paths}, as {}",
        s.name,
        hosts.join(", "),
        s.ports,
        s.presentation.header_name()
    )
}

pub(crate) fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Keygen { out } => {
            let pass = password();
            let key = signing::generate(&pass)?;
            let mut pub_path = out.as_os_str().to_owned();
            pub_path.push(".pub");
            let mut key_path = out.as_os_str().to_owned();
            key_path.push(".key");
            write_new(Path::new(&key_path), key.secret.as_bytes(), 0o600)?;
            write_new(Path::new(&pub_path), key.public.as_bytes(), 0o644)?;
            if pass.is_empty() {
                eprintln!(
                    "warning: secret key is not encrypted (set MOAT_POLICY_KEY_PASSWORD to encrypt it)"
                );
            }
            println!(
                "wrote {} and {}",
                Path::new(&pub_path).display(),
                Path::new(&key_path).display()
            );
        }
        PolicyCommand::Sign { key, profile } => {
            let secret = String::from_utf8_lossy(&read(&key)?).into_owned();
            let sig = signing::sign(&read(&profile)?, &secret, &password())
                .with_context(|| format!("cannot sign {}", profile.display()))?;
            let out = sig_path(&profile);
            std::fs::write(&out, sig).with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        PolicyCommand::Verify { pubkey, profile } => {
            let policy = load_verified(&profile, &pubkey)?;
            println!("signature OK");
            summary(&policy);
        }
        PolicyCommand::Check { profile } => {
            let text = String::from_utf8(read(&profile)?).context("profile is not UTF-8")?;
            let policy = profile::parse(&text)
                .with_context(|| format!("{} is invalid", profile.display()))?;
            summary(&policy);
        }
        PolicyCommand::Explain {
            profile,
            pubkey,
            program,
            destination,
        } => {
            let profile = profile.unwrap_or_else(|| crate::dev_dir().join("profile.toml"));
            let pubkey = pubkey.unwrap_or_else(|| crate::dev_dir().join("dev.pub"));
            let program = program.as_deref().map(parse_program).transpose()?;
            let policy = load_verified(&profile, &pubkey)?;
            return explain(&policy, &destination, program.as_ref());
        }
        PolicyCommand::Test {
            profile,
            pubkey,
            cases,
        } => {
            let profile = profile.unwrap_or_else(|| crate::dev_dir().join("profile.toml"));
            let pubkey = pubkey.unwrap_or_else(|| crate::dev_dir().join("dev.pub"));
            let policy = match load_verified(&profile, &pubkey) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {}", moat_egress::error_chain(e.as_ref()));
                    return Ok(ExitCode::from(2));
                }
            };
            println!("{}", label(&policy));
            return Ok(crate::policy_test::run(&policy, &cases));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Splits `host:port` / `ip:port` / `[v6]:port`.
pub(crate) fn parse_destination(text: &str) -> Result<(Option<String>, std::net::IpAddr, u16)> {
    if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
        return Ok((None, sa.ip(), sa.port()));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        bail!("{text:?} is not host:port");
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("{port:?} is not a port"))?;
    let host = normalize(host)?;
    Ok((Some(host), std::net::Ipv4Addr::UNSPECIFIED.into(), port))
}

fn explain(
    policy: &Policy,
    destination: &str,
    program: Option<&moat_policy::ProgramPattern>,
) -> Result<ExitCode> {
    let (host, addr, port) = parse_destination(destination)?;
    let dest = Destination {
        hostname: host.as_deref(),
        addr,
        port,
    };
    match policy.decide(dest) {
        Decision::Allow(rule) => {
            let claim = program.map(claim);
            if !rule.allows_program(claim.as_ref()) {
                let who = claim.map_or("a flow that names no program".to_owned(), |c| {
                    format!("program {c}")
                });
                println!(
                    "deny: rule {:?} ({}) in {} matches, but does not allow {who}",
                    rule.name,
                    rule.action.as_str(),
                    label(policy)
                );
                if let Some(programs) = describe_programs(rule) {
                    println!("  programs: {programs}");
                }
                return Ok(ExitCode::from(3));
            }
            println!(
                "allow: rule {:?} ({}) in {}",
                rule.name,
                rule.action.as_str(),
                label(policy)
            );
            if let Some(programs) = describe_programs(rule) {
                println!("  programs: {programs}");
            }
            let protos: Vec<&str> = rule
                .protocols
                .iter()
                .map(|p| match p {
                    moat_policy::Protocol::Tls => "tls (SNI must match)",
                    moat_policy::Protocol::Http => "http (Host must match)",
                    moat_policy::Protocol::Tcp => "tcp (unchecked)",
                })
                .collect();
            println!("  protocols: {}", protos.join(", "));
            if let Some(service) = &rule.service {
                println!(
                    "  via the broker: corporate service \"{service}\" on port {port} (not resolved \
                     here; the broker connects to the service's configured address)"
                );
            }
            if let Some(http) = &rule.http {
                for line in describe_http(http) {
                    println!("  {line}");
                }
            }
            if let Some(mcp) = &rule.mcp {
                for line in describe_mcp(mcp) {
                    println!("  {line}");
                }
            }
            if let Some(route) = &rule.route {
                println!(
                    "  routed to {}:{} (resolved, classified and verified as that name)",
                    route.host, route.port
                );
            }
            let upstream = rule
                .route
                .as_ref()
                .map(|r| (Some(r.host.clone()), r.port))
                .unwrap_or((host.clone(), port));
            if let (Some(h), port) = (upstream.0.as_deref(), upstream.1) {
                for secret in policy.secrets.iter().filter(|s| s.binds_host(h, port)) {
                    let note = if rule.action == moat_policy::Action::Intercept {
                        "injected"
                    } else {
                        "NOT injected: the rule does not intercept"
                    };
                    println!("  secret ({note}): {}", describe_secret(secret));
                }
            }
            if host.is_some() && rule.service.is_none() {
                let cidrs: Vec<String> = rule.cidrs.iter().map(ToString::to_string).collect();
                println!(
                    "  resolved addresses must be public{}",
                    if cidrs.is_empty() {
                        String::new()
                    } else {
                        format!(" or inside {}", cidrs.join(", "))
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Decision::Deny(reason) => {
            println!("deny: {reason} (default deny, {})", label(policy));
            Ok(ExitCode::from(3))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn explain_shows_mcp_rules_lists_in_the_order_they_apply() {
        let p = moat_policy::profile::parse(
            "version = 1\nname = \"t\"\n[[rules]]\nname = \"m\"\nhosts = [\"m.test\"]\n\
             ports = [443]\naction = \"intercept\"\n[rules.mcp]\npath = \"/mcp\"\n\
             methods = { default = \"allow\", deny = [\"sampling/*\"] }\n\
             tools = { default = \"deny\", allow = [\"echo\"] }\n",
        )
        .unwrap();
        let lines = describe_mcp(p.rules[0].mcp.as_ref().unwrap());
        assert_eq!(
            lines,
            vec![
                "MCP rules (JSON-RPC over streamable HTTP at /mcp; deny, then allow, then the \
                 default):"
                    .to_owned(),
                "  methods: deny [sampling/*], else allow".to_owned(),
                "  tools:   allow [echo], else deny (tools/call, and what tools/list shows)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn explain_lists_http_rules_in_order_with_the_default() {
        let p = moat_policy::profile::parse(
            "version = 1\nname = \"t\"\n[[rules]]\nname = \"gh\"\nhosts = [\"api.github.com\"]\n\
             ports = [443]\naction = \"intercept\"\n[rules.http]\ndefault = \"deny\"\n\
             [[rules.http.requests]]\nname = \"read\"\nmethods = [\"GET\", \"HEAD\"]\n\
             paths = [\"/repos/**\", \"/user\"]\nquery = [\"page\"]\naction = \"allow\"\n\
             [[rules.http.requests]]\nname = \"no-delete\"\nmethods = [\"DELETE\"]\n\
             paths = [\"/**\"]\naction = \"deny\"\n",
        )
        .unwrap();
        let lines = describe_http(p.rules[0].http.as_ref().unwrap());
        assert!(lines[0].contains("unmatched: deny"), "{lines:?}");
        assert!(
            lines[1].contains("allow")
                && lines[1].contains("read")
                && lines[1].contains("GET,HEAD [/repos/**, /user] query keys among [page]"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("deny") && lines[2].contains("no-delete"),
            "{lines:?}"
        );
        assert!(lines[3].contains("default") && lines[3].contains("everything else"));
    }

    #[test]
    fn a_profile_is_shown_with_its_serial() {
        let p = moat_policy::profile::parse("version = 1\nname = \"t\"\nserial = 12\n").unwrap();
        assert_eq!(label(&p), "profile \"t\" (serial 12)");
        let p = moat_policy::profile::parse("version = 1\nname = \"t\"\n").unwrap();
        assert_eq!(label(&p), "profile \"t\" (serial 0)");
    }
}
