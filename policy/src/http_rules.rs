//! HTTP rules: per-request decisions on an intercepted host (method, path, query keys).
//!
//! ```toml
//! [[rules]]
//! name = "github-api"
//! hosts = ["api.github.com"]
//! ports = [443]
//! action = "intercept"
//!
//! [rules.http]
//! default = "deny"                 # required: what a request no HTTP rule matches gets
//!
//! [[rules.http.requests]]          # tried in order; the first match decides
//! name = "read-repos"              # unique in the rule; quoted in audit records and 403s
//! methods = ["GET", "HEAD"]        # optional: any method when absent
//! paths = ["/repos/**"]            # required: exact, `*` one segment, `**` any number
//! query = ["per_page", "page"]     # optional: the request's query keys must be among these
//! action = "allow"                 # or "deny"
//! ```
//!
//! Paths are matched against the request's normalised path only ([`normalize_path`]: one
//! decoding, dot segments resolved, `;` and `%25` refused), never the raw target, so `..`,
//! `%2e%2e` or `/repos;x/../admin` cannot walk out of a pattern. A request whose path has no
//! normal form matches nothing here; the proxy refuses it before asking (400). Patterns must
//! themselves be in normal form, so that what is written is what is matched.

use std::collections::HashSet;

use serde::Deserialize;

use crate::path::normalize_path;

/// What an HTTP rule, or an intercept rule's default, does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpAction {
    /// Forward the request (after the other request checks).
    Allow,
    /// Answer 403 without forwarding it.
    Deny,
}

impl HttpAction {
    /// Stable name for output and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpAction::Allow => "allow",
            HttpAction::Deny => "deny",
        }
    }
}

/// The name audit records and refusals give the default of an intercept rule's HTTP rules
/// (reserved: no HTTP rule may be called this).
pub const DEFAULT_NAME: &str = "default";

/// Methods whose answer is the request itself (RFC 9110 9.3.8 TRACE, and IIS's TRACK): the
/// upstream would send the injected secret back to the agent. Compared without regard to case,
/// as some servers do. No other registered method is defined to reflect the request; an
/// endpoint that echoes headers is the residual risk named in the threat model.
const REFLECTING_METHODS: &[&str] = &["TRACE", "TRACK"];

/// The reflecting method `method` is, if it is one (refused on intercepted flows).
pub fn reflecting_method(method: &str) -> Option<&'static str> {
    REFLECTING_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
}

/// Methods an HTTP rule may name. TRACE, TRACK and CONNECT are never forwarded on intercepted
/// flows, so naming them would be a rule that can never apply.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// This exact segment.
    Exact(String),
    /// `*`: any one non-empty segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
}

/// A compiled path pattern: `/`-separated segments, each exact, `*` or `**` (at most one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl PathPattern {
    /// Compiles `text`, or says why it is not a pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains(['?', '#']) {
            return Err(format!(
                "path pattern {text:?} holds '?' or '#' (query keys go in `query`)"
            ));
        }
        let normal = normalize_path(text).map_err(|e| format!("path pattern {text:?}: {e}"))?;
        if normal != text {
            return Err(format!(
                "path pattern {text:?} is not in normal form (write {normal:?}): requests are \
                 matched in normal form"
            ));
        }
        let mut segments = Vec::new();
        for seg in text[1..].split('/') {
            segments.push(match seg {
                "*" => Segment::One,
                "**" => Segment::Any,
                s if s.contains('*') => {
                    return Err(format!(
                        "path pattern {text:?}: '*' and '**' must be whole segments"
                    ));
                }
                s => Segment::Exact(s.to_owned()),
            });
        }
        if segments.iter().filter(|s| **s == Segment::Any).count() > 1 {
            return Err(format!(
                "path pattern {text:?}: at most one '**' per pattern"
            ));
        }
        Ok(PathPattern {
            text: text.to_owned(),
            segments,
        })
    }

    /// Does the normalised `path` match? Linear in the number of segments.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let fits = |pat: &[Segment], segs: &[&str]| {
            pat.len() == segs.len()
                && pat.iter().zip(segs).all(|(p, s)| match p {
                    Segment::Exact(e) => e == s,
                    Segment::One => !s.is_empty(),
                    Segment::Any => false,
                })
        };
        match self.segments.iter().position(|s| *s == Segment::Any) {
            None => fits(&self.segments, &segs),
            Some(k) => {
                let (before, after) = (&self.segments[..k], &self.segments[k + 1..]);
                segs.len() >= before.len() + after.len()
                    && fits(before, &segs[..before.len()])
                    && fits(after, &segs[segs.len() - after.len()..])
            }
        }
    }
}

/// One HTTP rule: a request matches when its method, path and query keys all do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    /// Unique within its intercept rule; quoted in audit records and refusals.
    pub name: String,
    /// Methods matched (upper case, exact); empty means any method.
    pub methods: Vec<String>,
    /// Path patterns; one must match.
    pub paths: Vec<PathPattern>,
    /// If set, every query key of the request must be one of these (no query at all matches).
    pub query: Option<Vec<String>>,
    /// What a matching request gets.
    pub action: HttpAction,
}

impl HttpRule {
    fn matches(&self, method: &str, path: &str, query: Option<&str>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && self.paths.iter().any(|p| p.matches(path))
            && self
                .query
                .as_ref()
                .is_none_or(|allowed| query_keys(query).all(|k| allowed.iter().any(|a| a == k)))
    }
}

/// The keys of a query string (`a=1&b&c=` -> a, b, c), as sent: a percent-encoded key is not
/// decoded, so it never equals a listed key (listed keys hold no `%`).
fn query_keys(query: Option<&str>) -> impl Iterator<Item = &str> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
}

/// An intercept rule's HTTP rules, in order, and its explicit default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRules {
    /// What a request that no HTTP rule matches gets.
    pub default: HttpAction,
    /// First match decides.
    pub rules: Vec<HttpRule>,
}

/// The decision about one request: the action, and the HTTP rule that gave it (`None`: the
/// default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpVerdict<'a> {
    /// What the request gets.
    pub action: HttpAction,
    /// The deciding HTTP rule, or `None` for the default.
    pub rule: Option<&'a HttpRule>,
}

impl HttpVerdict<'_> {
    /// The deciding rule's name, or [`DEFAULT_NAME`].
    pub fn rule_name(&self) -> &str {
        self.rule.map_or(DEFAULT_NAME, |r| r.name.as_str())
    }
}

impl HttpRules {
    /// Decides a request by its method, its *normalised* path ([`normalize_path`]'s output)
    /// and its raw query (without `?`). First match wins; no match gets the default.
    pub fn decide(&self, method: &str, path: &str, query: Option<&str>) -> HttpVerdict<'_> {
        self.rules
            .iter()
            .find(|r| r.matches(method, path, query))
            .map_or(
                HttpVerdict {
                    action: self.default,
                    rule: None,
                },
                |r| HttpVerdict {
                    action: r.action,
                    rule: Some(r),
                },
            )
    }
}

/// `[rules.http]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpRulesFile {
    default: HttpAction,
    #[serde(default)]
    requests: Vec<HttpRuleFile>,
}

/// `[[rules.http.requests]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRuleFile {
    name: String,
    #[serde(default)]
    methods: Option<Vec<String>>,
    paths: Vec<String>,
    #[serde(default)]
    query: Option<Vec<String>>,
    action: HttpAction,
}

/// Why an intercept rule's HTTP rules are not valid: the HTTP rule (if one is to blame) and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpRuleError {
    pub(crate) http_rule: Option<String>,
    pub(crate) why: String,
}

impl HttpRulesFile {
    /// Compiles and checks the HTTP rules.
    pub(crate) fn compile(self) -> Result<HttpRules, HttpRuleError> {
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(self.requests.len());
        for r in self.requests {
            let err = |why: String| HttpRuleError {
                http_rule: Some(r.name.clone()),
                why,
            };
            check_name(&r.name).map_err(err)?;
            if !names.insert(r.name.clone()) {
                return Err(err("the name is used twice".into()));
            }
            let methods = r.methods.clone().unwrap_or_default();
            if r.methods.is_some() && methods.is_empty() {
                return Err(err(
                    "methods = [] matches nothing (leave it out for any method)".into(),
                ));
            }
            if let Some(m) = methods.iter().find(|m| !METHODS.contains(&m.as_str())) {
                return Err(err(format!(
                    "unknown method {m:?} (one of {})",
                    METHODS.join(", ")
                )));
            }
            if r.paths.is_empty() {
                return Err(err("it must list paths (\"/**\" for every path)".into()));
            }
            let paths = r
                .paths
                .iter()
                .map(|p| PathPattern::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            if let Some(k) = r.query.iter().flatten().find(|k| !query_key_ok(k)) {
                return Err(err(format!(
                    "query key {k:?} must be letters, digits, '-', '.', '_' or '~'"
                )));
            }
            rules.push(HttpRule {
                name: r.name,
                methods,
                paths,
                query: r.query,
                action: r.action,
            });
        }
        Ok(HttpRules {
            default: self.default,
            rules,
        })
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("the name must be letters, digits, '-', '_' or '.'".into());
    }
    if name == DEFAULT_NAME {
        return Err(format!(
            "{DEFAULT_NAME:?} is reserved for the rule's default"
        ));
    }
    Ok(())
}

fn query_key_ok(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> PathPattern {
        PathPattern::parse(p).unwrap()
    }

    fn rules(toml_text: &str) -> Result<HttpRules, HttpRuleError> {
        let file: HttpRulesFile = toml::from_str(toml_text).unwrap();
        file.compile()
    }

    const GITHUB: &str = r#"
default = "deny"
[[requests]]
name = "no-admin"
paths = ["/repos/*/*/hooks/**"]
action = "deny"
[[requests]]
name = "read-repos"
methods = ["GET", "HEAD"]
paths = ["/repos/**", "/user"]
query = ["per_page", "page"]
action = "allow"
[[requests]]
name = "comment"
methods = ["POST"]
paths = ["/repos/*/*/issues/*/comments"]
action = "allow"
"#;

    /// Normalises as the proxy does, then decides; `Err` for a path with no normal form.
    fn decide(r: &HttpRules, method: &str, target: &str) -> Result<String, String> {
        let (path, query) = target
            .split_once('?')
            .map_or((target, None), |(p, q)| (p, Some(q)));
        let path = normalize_path(path).map_err(|e| e.to_string())?;
        let v = r.decide(method, &path, query);
        Ok(format!("{} {}", v.action.as_str(), v.rule_name()))
    }

    #[test]
    fn exact_star_and_double_star_segments() {
        assert!(pat("/user").matches("/user"));
        assert!(!pat("/user").matches("/user/"));
        assert!(!pat("/user").matches("/users"));
        assert!(pat("/a/*/c").matches("/a/b/c"));
        assert!(!pat("/a/*/c").matches("/a/c"));
        assert!(!pat("/a/*/c").matches("/a//c"));
        assert!(!pat("/a/*/c").matches("/a/b/x/c"));
        assert!(pat("/a/**/c").matches("/a/c"));
        assert!(pat("/a/**/c").matches("/a/b/x/c"));
        assert!(!pat("/a/**/c").matches("/a/b/x/d"));
        assert!(pat("/").matches("/"));
        assert!(!pat("/").matches("/x"));
        assert!(pat("/**").matches("/"));
        assert!(pat("/**").matches("/anything/at/all"));
    }

    #[test]
    fn trailing_double_star_is_a_segment_prefix() {
        let p = pat("/repos/**");
        for ok in ["/repos", "/repos/", "/repos/a", "/repos/a/b/c"] {
            assert!(p.matches(ok), "{ok}");
        }
        for no in ["/reposx", "/repo", "/", "/x/repos/a"] {
            assert!(!p.matches(no), "{no}");
        }
    }

    #[test]
    fn first_match_wins_and_unmatched_gets_the_default() {
        let r = rules(GITHUB).unwrap();
        assert_eq!(decide(&r, "GET", "/repos/o/r").unwrap(), "allow read-repos");
        // The deny rule comes first, so the broader allow never sees hooks.
        assert_eq!(
            decide(&r, "GET", "/repos/o/r/hooks/1").unwrap(),
            "deny no-admin"
        );
        assert_eq!(
            decide(&r, "POST", "/repos/o/r/issues/7/comments").unwrap(),
            "allow comment"
        );
        assert_eq!(decide(&r, "POST", "/repos/o/r").unwrap(), "deny default");
        assert_eq!(decide(&r, "DELETE", "/user").unwrap(), "deny default");
        assert_eq!(decide(&r, "get", "/user").unwrap(), "deny default");
        let open = rules("default = \"allow\"\n").unwrap();
        assert_eq!(decide(&open, "PUT", "/x").unwrap(), "allow default");
    }

    #[test]
    fn listed_query_keys_must_hold_every_key_of_the_request() {
        let r = rules(GITHUB).unwrap();
        for ok in [
            "/user",
            "/user?",
            "/user?page=2",
            "/user?per_page=5&page=2",
            "/user?page",
        ] {
            assert_eq!(decide(&r, "GET", ok).unwrap(), "allow read-repos", "{ok}");
        }
        for no in ["/user?sort=x", "/user?page=1&admin=1", "/user?pa%67e=1"] {
            assert_eq!(decide(&r, "GET", no).unwrap(), "deny default", "{no}");
        }
    }

    #[test]
    fn dot_segments_and_encoded_tricks_never_walk_out_of_a_pattern() {
        let r = rules(GITHUB).unwrap();
        // Resolved before matching: these are /user/../admin = /admin, and so on.
        for t in [
            "/repos/../admin",
            "/repos/%2e%2e/admin",
            "/repos/%2E%2E/admin",
            "/repos/./../admin",
            "/user/..",
        ] {
            assert_eq!(decide(&r, "GET", t).unwrap(), "deny default", "{t}");
        }
        // No normal form at all: refused before any rule is asked.
        for t in [
            "/repos/..;/admin",
            "/repos;x/a",
            "/repos/%252e%252e/admin",
            "/repos%2f..%2fadmin",
            "/repos/%c0%ae%c0%ae/admin",
            "/repos\\..\\admin",
        ] {
            assert!(decide(&r, "GET", t).is_err(), "{t}");
        }
        // An encoded unreserved character is the character.
        assert_eq!(
            decide(&r, "GET", "/%72epos/o/r").unwrap(),
            "allow read-repos"
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for (p, why) in [
            ("repos/**", "does not start"),
            ("/repos/a**", "whole segments"),
            ("/repos/*x", "whole segments"),
            ("/**/a/**", "at most one"),
            ("/a/../b", "normal form"),
            ("/a/%7e", "normal form"),
            ("/a;b", "path parameter"),
            ("/a%25", "percent"),
            ("/a?x=1", "query"),
        ] {
            let e = PathPattern::parse(p).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
    }

    #[test]
    fn bad_http_rules_are_refused_naming_the_http_rule() {
        let one = |body: &str| {
            rules(&format!(
                "default = \"deny\"\n[[requests]]\nname = \"r1\"\n{body}"
            ))
            .unwrap_err()
        };
        let cases = [
            (
                "methods = [\"FETCH\"]\npaths = [\"/\"]\naction = \"allow\"",
                "unknown method",
            ),
            (
                "methods = [\"get\"]\npaths = [\"/\"]\naction = \"allow\"",
                "unknown method",
            ),
            (
                "methods = [\"TRACE\"]\npaths = [\"/\"]\naction = \"allow\"",
                "unknown method",
            ),
            (
                "methods = []\npaths = [\"/\"]\naction = \"allow\"",
                "matches nothing",
            ),
            ("paths = []\naction = \"allow\"", "must list paths"),
            ("paths = [\"/a/**x\"]\naction = \"allow\"", "whole segments"),
            (
                "paths = [\"/\"]\nquery = [\"a=b\"]\naction = \"allow\"",
                "query key",
            ),
        ];
        for (body, why) in cases {
            let e = one(body);
            assert_eq!(e.http_rule.as_deref(), Some("r1"), "{body}");
            assert!(e.why.contains(why), "{body}: {}", e.why);
        }
        let dup = "default = \"deny\"\n[[requests]]\nname = \"a\"\npaths = [\"/\"]\naction = \
                   \"allow\"\n[[requests]]\nname = \"a\"\npaths = [\"/\"]\naction = \"deny\"\n";
        assert!(rules(dup).unwrap_err().why.contains("twice"));
        let reserved = "default = \"deny\"\n[[requests]]\nname = \"default\"\npaths = [\"/\"]\n\
                        action = \"allow\"\n";
        assert!(rules(reserved).unwrap_err().why.contains("reserved"));
    }

    #[test]
    fn the_default_must_be_written() {
        assert!(
            toml::from_str::<HttpRulesFile>(
                "[[requests]]\nname = \"a\"\npaths = [\"/\"]\naction = \"allow\"\n"
            )
            .is_err()
        );
        assert!(toml::from_str::<HttpRulesFile>("default = \"maybe\"\n").is_err());
    }
}
