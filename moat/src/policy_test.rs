//! `moat policy test CASES.toml`: table-driven expectations checked against a signed profile,
//! for the people who approve profiles.
//!
//! ```toml
//! [[cases]]
//! name = "agents read repositories"   # optional; default: "case N"
//! destination = "api.github.com:443"  # host:port, or ip:port
//! method = "GET"                      # optional (default GET when a path is given)
//! path = "/repos/o/r?per_page=5"      # optional: the request, decided by the HTTP rules
//! expect = "allow"                    # or "deny"
//! inject = ["github"]                 # optional: exactly the secrets injected ([] = none)
//! tool = "search"                     # optional: an MCP tools/call of this tool (POST to the
//!                                     # rule's MCP endpoint unless method/path say otherwise)
//! program = "/usr/bin/curl"           # optional: the program the flow comes from (path, or
//!                                     # path@sha256:HEX); absent: it names none
//! ```
//!
//! Each case is decided the way the proxy decides: the flow by the profile's rules (and the
//! rule's `programs`, against the case's program), then, on
//! an intercepted flow, the request by the rule's HTTP rules on its normalised path, and the
//! secrets by their hosts, ports and path prefixes. The report names every case, and for a
//! failing one the expected (`-`) and actual (`+`) outcome. Exit status: 0 when every case
//! passes, 1 when one fails, 2 when the profile or the case file cannot be used.

use std::collections::HashSet;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use moat_policy::{Action, Decision, Destination, HttpAction, Policy};
use serde::Deserialize;

/// The case file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    cases: Vec<Case>,
}

/// What a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Expect {
    Allow,
    Deny,
}

/// One expectation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    name: Option<String>,
    destination: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    /// The program the flow comes from, as the workspace would name it.
    #[serde(default)]
    program: Option<String>,
    /// An MCP `tools/call` of this tool, decided by the rule's MCP rules.
    #[serde(default)]
    tool: Option<String>,
    expect: Expect,
    #[serde(default)]
    inject: Option<Vec<String>>,
}

/// What the policy does with a case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    allowed: bool,
    /// Why, in words: the rule, the HTTP rule, the deny reason.
    why: String,
    /// The secrets injected, in profile order.
    injected: Vec<String>,
}

/// Decides a case as the proxy would.
fn decide(policy: &Policy, case: &Case) -> Result<Outcome> {
    let (host, addr, port) = crate::policy_cmd::parse_destination(&case.destination)?;
    let dest = Destination {
        hostname: host.as_deref(),
        addr,
        port,
    };
    let rule = match policy.decide(dest) {
        Decision::Allow(rule) => rule,
        Decision::Deny(reason) => {
            return Ok(Outcome {
                allowed: false,
                why: format!("{reason} (default deny)"),
                injected: Vec::new(),
            });
        }
    };
    let flow = format!("rule {:?} ({})", rule.name, rule.action.as_str());
    let program = case
        .program
        .as_deref()
        .map(crate::policy_cmd::parse_program)
        .transpose()?;
    let claim = program.as_ref().map(crate::policy_cmd::claim);
    if !rule.allows_program(claim.as_ref()) {
        let who = claim.map_or("a flow that names no program".to_owned(), |c| {
            format!("program {c}")
        });
        return Ok(Outcome {
            allowed: false,
            why: format!("{flow}: does not allow {who}"),
            injected: Vec::new(),
        });
    }
    let allow = |why: String, injected| Outcome {
        allowed: true,
        why,
        injected,
    };
    let deny = |why: String| Outcome {
        allowed: false,
        why,
        injected: Vec::new(),
    };
    if rule.action != Action::Intercept {
        let note = if case.path.is_some() || case.method.is_some() {
            ": not intercepted, requests are not seen"
        } else {
            ""
        };
        return Ok(allow(format!("{flow}{note}"), Vec::new()));
    }
    // A tool call is a POST to the MCP endpoint, unless the case says otherwise.
    let mcp_path = rule.mcp.as_ref().and_then(|m| m.path.as_deref());
    let (method, target) = match &case.tool {
        Some(_) => (
            case.method.as_deref().unwrap_or("POST"),
            case.path.as_deref().or(mcp_path).unwrap_or("/"),
        ),
        None => (
            case.method.as_deref().unwrap_or("GET"),
            case.path.as_deref().unwrap_or("/"),
        ),
    };
    let (raw_path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    if moat_policy::http_rules::reflecting_method(method).is_some()
        || method.eq_ignore_ascii_case("CONNECT")
    {
        return Ok(deny(format!(
            "{flow}: {method} is never forwarded on intercepted flows"
        )));
    }
    // The proxy normalises the path where HTTP rules or a bound secret's path prefixes depend
    // on it, and refuses a path that has no normal form there (400).
    let (up_host, up_port) = upstream(rule, host.as_deref(), port);
    let prefixes = policy
        .secrets
        .iter()
        .any(|s| s.has_paths() && up_host.is_some_and(|h| s.binds_host(h, up_port)));
    let path = match moat_policy::normalize_path(raw_path) {
        Ok(p) => p,
        Err(e) if rule.http.is_some() || prefixes => {
            return Ok(deny(format!(
                "{flow}: 400, the path has no normal form: {e}"
            )));
        }
        Err(_) => raw_path.to_owned(),
    };
    let mut why = flow.clone();
    if let Some(http) = &rule.http {
        let verdict = http.decide(method, &path, query);
        let by = match verdict.rule {
            Some(r) => format!("HTTP rule {:?}", r.name),
            None => "the default (no HTTP rule matched)".to_owned(),
        };
        if verdict.action == HttpAction::Deny {
            return Ok(deny(format!("{flow}: {method} {path} denied by {by}")));
        }
        why = format!("{flow}: {method} {path} allowed by {by}");
    }
    if let Some(tool) = &case.tool {
        match rule.mcp.as_ref().filter(|m| m.covers(&path)) {
            Some(mcp) => {
                let verdict = mcp.decide(moat_policy::mcp_rules::TOOLS_CALL, Some(tool));
                let by = format!("{} of its MCP rules", verdict.rule_name());
                if verdict.action == HttpAction::Deny {
                    return Ok(deny(format!("{flow}: tool {tool:?} denied by {by}")));
                }
                why = format!("{why}; tool {tool:?} allowed by {by}");
            }
            None => why = format!("{why}; no MCP rules apply to {path}: the tool is not judged"),
        }
    }
    Ok(allow(
        why,
        injected(policy, rule, host.as_deref(), port, &path),
    ))
}

/// The secrets the proxy would inject into a request for `path` on `rule`'s flow to `host`:
/// each bound to the upstream (a route's host and port, if any), port and path, the first in
/// profile order winning a header.
fn injected(
    policy: &Policy,
    rule: &moat_policy::Rule,
    host: Option<&str>,
    port: u16,
    path: &str,
) -> Vec<String> {
    let (Some(host), port) = upstream(rule, host, port) else {
        return Vec::new();
    };
    let mut headers = HashSet::new();
    policy
        .secrets
        .iter()
        .filter(|s| s.binds(host, port, path))
        .filter(|s| headers.insert(s.presentation.header_name()))
        .map(|s| s.name.clone())
        .collect()
}

/// The name and port secrets are bound against: a routed rule's route, else the flow's.
fn upstream<'a>(
    rule: &'a moat_policy::Rule,
    host: Option<&'a str>,
    port: u16,
) -> (Option<&'a str>, u16) {
    match &rule.route {
        Some(r) => (Some(r.host.as_str()), r.port),
        None => (host, port),
    }
}

/// The outcome written for a report line.
fn show(allowed: bool, injected: &[String]) -> String {
    let verdict = if allowed { "allow" } else { "deny" };
    if injected.is_empty() {
        verdict.to_owned()
    } else {
        format!("{verdict}, inject [{}]", injected.join(", "))
    }
}

/// Checks every case; returns the report and whether all passed.
fn check_cases(policy: &Policy, text: &str) -> Result<(String, bool)> {
    let file: CaseFile = toml::from_str(text).context("the case file is not valid")?;
    if file.cases.is_empty() {
        bail!("the case file holds no [[cases]]");
    }
    let mut report = String::new();
    let (mut passed, mut failed) = (0usize, 0usize);
    for (i, case) in file.cases.iter().enumerate() {
        let name = case
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", i + 1));
        let got = decide(policy, case).with_context(|| name.clone())?;
        let expected_inject = case.inject.clone();
        let ok = (got.allowed == (case.expect == Expect::Allow))
            && expected_inject.as_ref().is_none_or(|want| {
                let mut want = want.clone();
                let mut have = got.injected.clone();
                want.sort();
                have.sort();
                want == have
            });
        if ok {
            passed += 1;
            let _ = writeln!(report, "ok   {name}: {}", show(got.allowed, &got.injected));
        } else {
            failed += 1;
            let want = show(
                case.expect == Expect::Allow,
                expected_inject.as_deref().unwrap_or(&got.injected),
            );
            let _ = writeln!(report, "FAIL {name}");
            let _ = writeln!(report, "  - {want}");
            let _ = writeln!(
                report,
                "  + {}: {}",
                show(got.allowed, &got.injected),
                got.why
            );
        }
    }
    let _ = writeln!(report, "{passed} passed, {failed} failed");
    Ok((report, failed == 0))
}

/// Runs the cases in `cases` against `policy`, prints the report; 0 all passed, 1 one failed,
/// 2 the case file cannot be used.
pub(crate) fn run(policy: &Policy, cases: &std::path::Path) -> std::process::ExitCode {
    let result = std::fs::read_to_string(cases)
        .with_context(|| format!("cannot read {}", cases.display()))
        .and_then(|text| {
            check_cases(policy, &text).with_context(|| format!("{} is not usable", cases.display()))
        });
    match result {
        Ok((report, all)) => {
            print!("{report}");
            std::process::ExitCode::from(if all { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("error: {}", moat_egress::error_chain(e.as_ref()));
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PROFILE: &str = r#"
version = 1
name = "t"

[[rules]]
name = "gh"
hosts = ["api.github.com"]
ports = [443]
action = "intercept"

[rules.http]
default = "deny"

[[rules.http.requests]]
name = "read"
methods = ["GET"]
paths = ["/repos/**"]
action = "allow"

[[rules]]
name = "pypi"
hosts = ["pypi.org"]
ports = [443]
action = "passthrough"

[[rules]]
name = "curl-only"
hosts = ["example.org"]
ports = [443]
action = "passthrough"
programs = ["/usr/bin/curl", "/usr/bin/git@sha256:abababababababababababababababababababababababababababababababab"]

[[secrets]]
name = "github"
source = { env = "GH_TOKEN" }
placeholder = "ghp-moat-placeholder"
hosts = ["api.github.com"]
paths = ["/repos/"]
presentation = "authorization_bearer"
"#;

    fn policy() -> Policy {
        moat_policy::profile::parse(PROFILE).unwrap()
    }

    const PASSING: &str = r#"
[[cases]]
name = "read repos"
destination = "api.github.com:443"
path = "/repos/o/r"
expect = "allow"
inject = ["github"]

[[cases]]
name = "no writes"
destination = "api.github.com:443"
method = "POST"
path = "/repos/o/r"
expect = "deny"

[[cases]]
name = "dot segments stay out"
destination = "api.github.com:443"
path = "/repos/../admin"
expect = "deny"

[[cases]]
destination = "pypi.org:443"
expect = "allow"
inject = []

[[cases]]
destination = "example.com:443"
expect = "deny"
"#;

    #[test]
    fn a_passing_case_file_reports_every_case_ok() {
        let (report, all) = check_cases(&policy(), PASSING).unwrap();
        assert!(all, "{report}");
        assert!(
            report.contains("ok   read repos: allow, inject [github]"),
            "{report}"
        );
        assert!(report.contains("ok   case 5: deny"), "{report}");
        assert!(report.ends_with("5 passed, 0 failed\n"), "{report}");
    }

    #[test]
    fn a_failing_case_is_reported_as_a_diff_with_the_reason() {
        let cases = r#"
[[cases]]
name = "agents may delete"
destination = "api.github.com:443"
method = "DELETE"
path = "/repos/o/r"
expect = "allow"

[[cases]]
name = "wrong secret"
destination = "api.github.com:443"
path = "/repos/o/r"
expect = "allow"
inject = ["other"]
"#;
        let (report, all) = check_cases(&policy(), cases).unwrap();
        assert!(!all);
        assert!(
            report.contains("FAIL agents may delete\n  - allow\n  + deny: "),
            "{report}"
        );
        assert!(report.contains("denied by the default"), "{report}");
        assert!(
            report.contains(
                "FAIL wrong secret\n  - allow, inject [other]\n  + allow, inject [github]"
            ),
            "{report}"
        );
        assert!(report.ends_with("0 passed, 2 failed\n"), "{report}");
    }

    #[test]
    fn a_path_without_a_normal_form_is_denied_where_the_proxy_refuses_it() {
        let cases = "[[cases]]\nname = \"params\"\ndestination = \"api.github.com:443\"\n\
                     path = \"/repos/..;/admin\"\nexpect = \"deny\"\n";
        let (report, all) = check_cases(&policy(), cases).unwrap();
        assert!(all, "{report}");
        let cases = cases.replace("expect = \"deny\"", "expect = \"allow\"");
        let (report, _) = check_cases(&policy(), &cases).unwrap();
        assert!(
            report.contains("400, the path has no normal form"),
            "{report}"
        );
    }

    #[test]
    fn a_case_names_the_program_and_the_rules_programs_decide() {
        let digest = "ab".repeat(32);
        let cases = format!(
            r#"
[[cases]]
name = "curl"
destination = "example.org:443"
program = "/usr/bin/curl"
expect = "allow"

[[cases]]
name = "python"
destination = "example.org:443"
program = "/usr/bin/python3.11"
expect = "deny"

[[cases]]
name = "none named"
destination = "example.org:443"
expect = "deny"

[[cases]]
name = "git as built"
destination = "example.org:443"
program = "/usr/bin/git@sha256:{digest}"
expect = "allow"

[[cases]]
name = "git rebuilt"
destination = "example.org:443"
program = "/usr/bin/git@sha256:{}"
expect = "deny"

[[cases]]
name = "rules without programs ignore it"
destination = "pypi.org:443"
program = "/usr/bin/python3.11"
expect = "allow"
"#,
            "cd".repeat(32)
        );
        let (report, all) = check_cases(&policy(), &cases).unwrap();
        assert!(all, "{report}");
        let wrong = cases.replacen("expect = \"deny\"", "expect = \"allow\"", 1);
        let (report, all) = check_cases(&policy(), &wrong).unwrap();
        assert!(!all);
        assert!(
            report.contains(
                "FAIL python\n  - allow\n  + deny: rule \"curl-only\" (passthrough): does not \
                 allow program /usr/bin/python3.11"
            ),
            "{report}"
        );
    }

    #[test]
    fn a_malformed_program_makes_the_case_file_unusable() {
        let cases = "[[cases]]\ndestination = \"example.org:443\"\nprogram = \"curl\"\n\
                     expect = \"deny\"\n";
        let err = check_cases(&policy(), cases).unwrap_err();
        assert!(format!("{err:#}").contains("program \"curl\""), "{err:#}");
    }

    const MCP_PROFILE: &str = r#"
[[rules]]
name = "mcp"
hosts = ["mcp.example.com"]
ports = [443]
action = "intercept"

[rules.mcp]
path = "/mcp"
methods = { default = "allow" }
tools = { default = "deny", allow = ["echo"], deny = ["delete_everything"] }
"#;

    #[test]
    fn tool_cases_are_decided_by_the_rules_mcp_rules() {
        let policy = moat_policy::profile::parse(&format!("{PROFILE}{MCP_PROFILE}")).unwrap();
        let cases = r#"
[[cases]]
name = "echo"
destination = "mcp.example.com:443"
tool = "echo"
expect = "allow"

[[cases]]
name = "delete"
destination = "mcp.example.com:443"
tool = "delete_everything"
expect = "deny"

[[cases]]
name = "unlisted"
destination = "mcp.example.com:443"
tool = "rm"
expect = "deny"

[[cases]]
name = "elsewhere"
destination = "mcp.example.com:443"
path = "/other"
tool = "delete_everything"
expect = "allow"
"#;
        let (report, all) = check_cases(&policy, cases).unwrap();
        assert!(all, "{report}");
        let wrong = cases.replace(
            "tool = \"rm\"\nexpect = \"deny\"",
            "tool = \"rm\"\nexpect = \"allow\"",
        );
        let (report, all) = check_cases(&policy, &wrong).unwrap();
        assert!(!all);
        assert!(
            report.contains("FAIL unlisted\n  - allow\n  + deny: rule \"mcp\" (intercept): tool \"rm\" denied by tools.default of its MCP rules"),
            "{report}"
        );
    }

    #[test]
    fn unusable_case_files_are_errors() {
        assert!(check_cases(&policy(), "").is_err());
        assert!(check_cases(&policy(), "[[cases]]\ndestination = \"a:1\"\n").is_err());
        let typo = "[[cases]]\ndestination = \"a.com:1\"\nexpect = \"deny\"\nmethdo = \"GET\"\n";
        assert!(check_cases(&policy(), typo).is_err());
    }
}
