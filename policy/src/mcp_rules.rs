//! MCP rules: per-message decisions for an MCP server reached over streamable HTTP (JSON-RPC
//! 2.0 in POST bodies, answers as JSON or SSE) on an intercepted host.
//!
//! ```toml
//! [[rules]]
//! name = "tools"
//! hosts = ["mcp.example.com"]
//! ports = [443]
//! action = "intercept"
//!
//! [rules.mcp]
//! path = "/mcp"                     # optional: the endpoint; default: every path of the host
//! methods = { default = "allow", deny = ["sampling/createMessage"] }   # required
//! tools = { default = "deny", allow = ["search", "read_file"] }        # required
//! ```
//!
//! A JSON-RPC request or notification is allowed when its method is, and a `tools/call` also
//! when its tool (`params.name`) is. Each list is `allow` and `deny` names with a required
//! `default` for names neither lists: a name in `deny` is denied, else one in `allow` allowed,
//! else the default decides (so `deny` wins over a wildcard `allow`). Method names may end in
//! `/*` (`notifications/*`: every method under `notifications/`); tool names are exact. The
//! same lists decide which tools a `tools/list` answer may show the agent ([`McpRules::tool`]).

use std::collections::HashSet;

use serde::Deserialize;

use crate::http_rules::HttpAction;
use crate::path::normalize_path;

/// The method whose requests name a tool.
pub const TOOLS_CALL: &str = "tools/call";

/// Longest method or tool name a list may hold (MCP's tool names are 1 to 128 characters).
const MAX_NAME: usize = 128;

/// One list: names allowed, names denied, and what every other name gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpList {
    /// What a name neither list holds gets.
    pub default: HttpAction,
    /// Names allowed (unless denied).
    pub allow: Vec<String>,
    /// Names denied, whatever else says.
    pub deny: Vec<String>,
}

/// Which part of a list decided: `deny`, `allow` or `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpBy {
    /// The name is in the list's `deny`.
    Deny,
    /// The name is in the list's `allow`.
    Allow,
    /// Neither lists it: the list's default.
    Default,
}

impl McpBy {
    /// Stable name for output and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            McpBy::Deny => "deny",
            McpBy::Allow => "allow",
            McpBy::Default => "default",
        }
    }
}

/// The decision about one method or tool name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McpVerdict {
    /// What the message gets.
    pub action: HttpAction,
    /// `true`: decided by the `tools` list; `false`: by `methods`.
    pub tools: bool,
    /// Which part of the list decided.
    pub by: McpBy,
}

impl McpVerdict {
    /// The deciding entry, as audit records and refusals name it: `methods.deny`,
    /// `tools.default`, and so on.
    pub fn rule_name(&self) -> String {
        let list = if self.tools { "tools" } else { "methods" };
        format!("{list}.{}", self.by.as_str())
    }
}

impl McpList {
    fn decide(&self, name: &str, tools: bool) -> McpVerdict {
        let listed = |names: &[String]| names.iter().any(|n| name_matches(n, name));
        let (action, by) = if listed(&self.deny) {
            (HttpAction::Deny, McpBy::Deny)
        } else if listed(&self.allow) {
            (HttpAction::Allow, McpBy::Allow)
        } else {
            (self.default, McpBy::Default)
        };
        McpVerdict { action, tools, by }
    }
}

/// Does the listed `pattern` (exact, or `prefix/*`) name `name`?
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix),
        None => pattern == name,
    }
}

/// An intercept rule's MCP rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRules {
    /// The endpoint's normalised path; `None`: every path of the host is the endpoint.
    pub path: Option<String>,
    /// Decides every request and notification by its method.
    pub methods: McpList,
    /// Decides `tools/call` requests by their tool, and which tools `tools/list` shows.
    pub tools: McpList,
}

impl McpRules {
    /// Is the request with this *normalised* path one for the MCP endpoint?
    pub fn covers(&self, path: &str) -> bool {
        self.path.as_deref().is_none_or(|p| p == path)
    }

    /// Decides a request or notification by its method and, for `tools/call`, its tool
    /// (`None`: the call names none, which only the tools default can decide).
    pub fn decide(&self, method: &str, tool: Option<&str>) -> McpVerdict {
        let by_method = self.methods.decide(method, false);
        if by_method.action == HttpAction::Deny || method != TOOLS_CALL {
            return by_method;
        }
        match tool {
            Some(tool) => self.tools.decide(tool, true),
            None => McpVerdict {
                action: self.tools.default,
                tools: true,
                by: McpBy::Default,
            },
        }
    }

    /// Decides whether the agent may see (and call) `tool`.
    pub fn tool(&self, tool: &str) -> McpVerdict {
        self.tools.decide(tool, true)
    }
}

/// `[rules.mcp]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct McpRulesFile {
    #[serde(default)]
    path: Option<String>,
    methods: McpListFile,
    tools: McpListFile,
}

/// `methods = { ... }` or `tools = { ... }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct McpListFile {
    default: HttpAction,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

impl McpListFile {
    fn compile(self, list: &str, wildcards: bool) -> Result<McpList, String> {
        let mut seen = HashSet::new();
        for name in self.allow.iter().chain(&self.deny) {
            check_name(name, wildcards).map_err(|why| format!("{list}: {why}"))?;
            if !seen.insert(name.as_str()) {
                return Err(format!(
                    "{list}: {name:?} is listed twice (in allow and deny, or twice in one)"
                ));
            }
        }
        Ok(McpList {
            default: self.default,
            allow: self.allow,
            deny: self.deny,
        })
    }
}

/// A method (`wildcards`: may end in `/*`) or tool name as a list may hold it.
fn check_name(name: &str, wildcards: bool) -> Result<(), String> {
    let bare = if wildcards {
        name.strip_suffix("/*").unwrap_or(name)
    } else {
        name
    };
    let ok_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/');
    if bare.is_empty()
        || name.len() > MAX_NAME
        || !bare.bytes().all(|b| ok_byte(b) && (wildcards || b != b'/'))
    {
        let allowed = if wildcards {
            "letters, digits, '_', '-', '.' and '/', optionally ending in \"/*\""
        } else {
            "letters, digits, '_', '-' and '.'"
        };
        return Err(format!(
            "{name:?} is not a name: 1 to {MAX_NAME} of {allowed}"
        ));
    }
    Ok(())
}

impl McpRulesFile {
    /// Compiles and checks the MCP rules, or says what is wrong.
    pub(crate) fn compile(self) -> Result<McpRules, String> {
        let path = match self.path {
            None => None,
            Some(p) => {
                let normal = normalize_path(&p).map_err(|e| format!("path {p:?}: {e}"))?;
                if normal != p || p.contains(['?', '#', '*']) {
                    return Err(format!(
                        "path {p:?} must be one exact path in normal form (no query, no '*')"
                    ));
                }
                Some(p)
            }
        };
        Ok(McpRules {
            path,
            methods: self.methods.compile("methods", true)?,
            tools: self.tools.compile("tools", false)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<McpRules, String> {
        toml::from_str::<McpRulesFile>(text)
            .map_err(|e| e.to_string())?
            .compile()
    }

    const RULES: &str = r#"
path = "/mcp"
methods = { default = "allow", deny = ["sampling/createMessage", "resources/*"] }
tools = { default = "deny", allow = ["echo", "search"], deny = ["delete_everything"] }
"#;

    fn said(v: McpVerdict) -> String {
        format!("{} {}", v.action.as_str(), v.rule_name())
    }

    #[test]
    fn a_tool_call_needs_its_method_and_its_tool_allowed() {
        let r = rules(RULES).unwrap();
        assert_eq!(
            said(r.decide("tools/call", Some("echo"))),
            "allow tools.allow"
        );
        assert_eq!(
            said(r.decide("tools/call", Some("delete_everything"))),
            "deny tools.deny"
        );
        assert_eq!(
            said(r.decide("tools/call", Some("rm"))),
            "deny tools.default"
        );
        assert_eq!(said(r.decide("tools/call", None)), "deny tools.default");
        // Tool names are exact and case-sensitive.
        assert_eq!(
            said(r.decide("tools/call", Some("Echo"))),
            "deny tools.default"
        );
        assert_eq!(
            said(r.decide("tools/call", Some("echo "))),
            "deny tools.default"
        );
    }

    #[test]
    fn methods_are_decided_by_deny_then_allow_then_the_default() {
        let r = rules(RULES).unwrap();
        assert_eq!(said(r.decide("tools/list", None)), "allow methods.default");
        assert_eq!(said(r.decide("initialize", None)), "allow methods.default");
        assert_eq!(
            said(r.decide("sampling/createMessage", None)),
            "deny methods.deny"
        );
        assert_eq!(said(r.decide("resources/read", None)), "deny methods.deny");
        // `resources/*` is everything under resources/, not resources itself or a lookalike.
        assert_eq!(said(r.decide("resources", None)), "allow methods.default");
        assert_eq!(said(r.decide("resources/", None)), "allow methods.default");
        assert_eq!(
            said(r.decide("resourcesx/read", None)),
            "allow methods.default"
        );
        let closed = rules(
            "methods = { default = \"deny\", allow = [\"initialize\", \"notifications/*\"] }\n\
             tools = { default = \"allow\", deny = [\"x\"] }\n",
        )
        .unwrap();
        assert_eq!(said(closed.decide("ping", None)), "deny methods.default");
        assert_eq!(
            said(closed.decide("notifications/initialized", None)),
            "allow methods.allow"
        );
        // tools/call itself is denied by the methods list before any tool is asked.
        assert_eq!(
            said(closed.decide("tools/call", Some("y"))),
            "deny methods.default"
        );
    }

    #[test]
    fn deny_wins_over_a_wildcard_allow() {
        let r = rules(
            "methods = { default = \"deny\", allow = [\"notifications/*\"], deny = \
             [\"notifications/cancelled\"] }\ntools = { default = \"deny\" }\n",
        )
        .unwrap();
        assert_eq!(
            said(r.decide("notifications/cancelled", None)),
            "deny methods.deny"
        );
        assert_eq!(
            said(r.decide("notifications/progress", None)),
            "allow methods.allow"
        );
    }

    #[test]
    fn the_endpoint_path_is_exact_or_every_path() {
        let r = rules(RULES).unwrap();
        assert!(r.covers("/mcp"));
        assert!(!r.covers("/mcp/"));
        assert!(!r.covers("/other"));
        let everywhere = rules(&RULES.replace("path = \"/mcp\"\n", "")).unwrap();
        assert!(everywhere.covers("/anything"));
    }

    #[test]
    fn both_lists_and_their_defaults_are_required() {
        for text in [
            "tools = { default = \"deny\" }\n",
            "methods = { default = \"deny\" }\n",
            "methods = { allow = [\"ping\"] }\ntools = { default = \"deny\" }\n",
            "methods = { default = \"maybe\" }\ntools = { default = \"deny\" }\n",
            "methods = { default = \"deny\", also = [] }\ntools = { default = \"deny\" }\n",
        ] {
            assert!(rules(text).is_err(), "{text}");
        }
    }

    #[test]
    fn bad_names_and_paths_are_refused_with_a_reason() {
        let cases = [
            (
                "tools = { default = \"deny\", allow = [\"a*\"] }",
                "tools: \"a*\"",
            ),
            (
                "tools = { default = \"deny\", allow = [\"a/b\"] }",
                "tools: \"a/b\"",
            ),
            (
                "tools = { default = \"deny\", allow = [\"\"] }",
                "not a name",
            ),
            (
                "tools = { default = \"deny\", allow = [\"a\"], deny = [\"a\"] }",
                "listed twice",
            ),
            (
                "tools = { default = \"deny\", allow = [\"a b\"] }",
                "not a name",
            ),
        ];
        for (tools, why) in cases {
            let e = rules(&format!("methods = {{ default = \"allow\" }}\n{tools}\n")).unwrap_err();
            assert!(e.contains(why), "{tools}: {e}");
        }
        let long = "x".repeat(MAX_NAME + 1);
        assert!(
            rules(&format!(
                "methods = {{ default = \"allow\" }}\ntools = {{ default = \"deny\", allow = \
                 [\"{long}\"] }}\n"
            ))
            .is_err()
        );
        for (methods, why) in [
            (
                "methods = { default = \"allow\", deny = [\"*\"] }",
                "methods: \"*\"",
            ),
            (
                "methods = { default = \"allow\", deny = [\"a/*/b\"] }",
                "not a name",
            ),
        ] {
            let e = rules(&format!("{methods}\ntools = {{ default = \"deny\" }}\n")).unwrap_err();
            assert!(e.contains(why), "{methods}: {e}");
        }
        for path in ["mcp", "/a/../mcp", "/mcp?x", "/mcp/*", "/m%63p"] {
            let e = rules(&RULES.replace("\"/mcp\"", &format!("{path:?}"))).unwrap_err();
            assert!(e.contains("path"), "{path}: {e}");
        }
    }
}
