//! How a flow ends, and who is to blame: the vocabulary shared by audit records, metrics and
//! logs. Every refusal and every close has exactly one [`Reason`], and every reason one [`Blame`].

use std::fmt;

/// Who caused an outcome (pingora's `ErrorSource`): the workspace's agent, the upstream
/// server or network, or the proxy itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The agent (or anything else in the workspace) sent something the policy refuses or a
    /// protocol error.
    Agent,
    /// The upstream: resolution failed, connection refused, reset, timed out.
    Upstream,
    /// The proxy: a local resource ran out, or an operator's policy change.
    Proxy,
    /// Nobody: the flow finished normally.
    None,
}

impl Blame {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Agent => "agent",
            Blame::Upstream => "upstream",
            Blame::Proxy => "proxy",
            Blame::None => "none",
        }
    }
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $code:literal, $blame:ident; )*) => {
        /// Why a flow was refused, failed or closed. `code()` is stable: audit records and
        /// metric labels use it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $variant, )*
        }

        impl Reason {
            /// Every reason, in declaration order (metrics keep one counter per reason).
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];

            /// Stable snake_case code.
            pub fn code(self) -> &'static str {
                match self { $( Reason::$variant => $code, )* }
            }

            /// Who is to blame.
            pub fn blame(self) -> Blame {
                match self { $( Reason::$variant => Blame::$blame, )* }
            }

            /// Position in [`Reason::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

reasons! {
    /// The flow header was malformed, of an unknown version or too long.
    HeaderInvalid => "header_invalid", Agent;
    /// The flow header did not arrive in time.
    HeaderTimeout => "header_timeout", Agent;
    /// The stream closed before a whole header arrived.
    HeaderTruncated => "header_truncated", Agent;
    /// The workspace already has the maximum number of concurrent flows.
    TooManyFlows => "too_many_flows", Agent;
    /// No rule allows this hostname.
    NoRule => "no_rule", Agent;
    /// A rule names the host but not this port.
    PortNotAllowed => "port_not_allowed", Agent;
    /// An IP-literal destination that no rule's cidrs cover.
    IpLiteral => "ip_literal", Agent;
    /// The rule for the destination names the programs it allows (`programs`), and the program
    /// the guest says opened the flow is none of them, or the guest named none.
    ProgramNotAllowed => "program_not_allowed", Agent;
    /// The hostname resolved to an address of a refused class (private, loopback, metadata...).
    NonPublicAddress => "non_public_address", Agent;
    /// TLS without a server_name.
    SniMissing => "sni_missing", Agent;
    /// TLS whose server_name differs from the flow's hostname.
    SniMismatch => "sni_mismatch", Agent;
    /// A ClientHello that does not parse, or names several servers.
    TlsMalformed => "tls_malformed", Agent;
    /// A ClientHello whose real server name is encrypted (ECH or ESNI), on a flow the proxy
    /// does not terminate.
    TlsHiddenName => "tls_hidden_name", Agent;
    /// Plain HTTP without a Host header.
    HostMissing => "host_missing", Agent;
    /// Plain HTTP whose Host (or absolute URI) differs from the flow's hostname, in any request
    /// head of the flow.
    HostMismatch => "host_mismatch", Agent;
    /// A request head that does not parse, or is too large.
    HttpMalformed => "http_malformed", Agent;
    /// An HTTP/1.1 request (intercepted, or on a plain-HTTP flow) framed both by
    /// Content-Length and Transfer-Encoding, or with Content-Length repeated (request-smuggling
    /// shapes), or on a connection whose framing could not be followed.
    AmbiguousFraming => "ambiguous_framing", Agent;
    /// The first bytes are a protocol the rule does not allow.
    ProtocolNotAllowed => "protocol_not_allowed", Agent;
    /// The first bytes did not arrive in time.
    SniffTimeout => "sniff_timeout", Agent;
    /// A secret's placeholder was sent to a host, port or path it is not bound to.
    PlaceholderUnbound => "placeholder_unbound", Agent;
    /// An intercepted request bound to a secret declared with `require = true` did not carry
    /// the secret's placeholder (no silent injection into every request to its hosts).
    PlaceholderRequired => "placeholder_required", Agent;
    /// An intercepted request named another authority than the flow's (Host or :authority
    /// switched on a kept-alive connection, or an absolute URI for another host).
    AuthorityMismatch => "authority_mismatch", Agent;
    /// A request the proxy does not forward, intercepted or plain HTTP (CONNECT, an upgrade).
    RequestRefused => "request_refused", Agent;
    /// An intercepted request that the intercept rule's HTTP rules deny (a denying HTTP rule,
    /// or the rule's default): answered 403, never forwarded.
    HttpRuleDenied => "http_rule_denied", Agent;
    /// A JSON-RPC message to an intercept rule's MCP endpoint that its MCP rules deny (by method,
    /// or for `tools/call` by tool; a batch holding one is refused whole), or a request method
    /// the streamable HTTP transport does not have: answered 403, never forwarded.
    McpDenied => "mcp_denied", Agent;
    /// A request to an MCP endpoint whose body is not JSON-RPC 2.0 the rules can judge (not
    /// JSON, nested too deep, a key twice, over the size bound): answered 400 or 413.
    McpMalformed => "mcp_malformed", Agent;
    /// An answer from an MCP endpoint that is not JSON-RPC 2.0 (or over the size bound), so its
    /// tools lists cannot be filtered: refused (502), or the SSE stream cut (fail closed).
    McpResponseRefused => "mcp_response_refused", Upstream;
    /// The agent's TLS handshake with the workspace CA's leaf failed (the agent does not
    /// trust the workspace CA, or spoke something else).
    AgentTls => "agent_tls", Agent;
    /// The upstream's TLS handshake failed or its certificate did not verify.
    UpstreamTls => "upstream_tls", Upstream;
    /// The proxy could not set interception up (a leaf could not be minted).
    InterceptSetup => "intercept_setup", Proxy;
    /// The hostname did not resolve.
    ResolveFailed => "resolve_failed", Upstream;
    /// No resolved address accepted a connection.
    ConnectFailed => "connect_failed", Upstream;
    /// The proxy could not accept or connect for lack of local resources.
    ProxyResources => "proxy_resources", Proxy;
    /// An audit record could not be written (a full or failing disk): the proxy refuses new
    /// flows until one is, and closes a flow whose Open record could not be written.
    AuditUnavailable => "audit_unavailable", Proxy;
    /// A corporate flow could not be handed to the broker: no corporate egress socket is
    /// configured, nothing listens on it (the host side's broker connector is not running), or
    /// it gave no valid answer in time.
    CorporateUnavailable => "corporate_unavailable", Proxy;
    /// The host side's broker connector answered `ERR` for a corporate flow: the broker refused
    /// the service for this workspace or could not reach it, or the connector is not connected
    /// to the broker.
    CorporateRefused => "corporate_refused", Upstream;
    /// An intercepted response carried a secret injected on its connection (raw or encoded):
    /// each hit was replaced by the secret's placeholder before the agent saw it. The
    /// response itself is passed on.
    SecretReflected => "secret_reflected", Upstream;
    /// An intercepted response on a connection whose responses are scanned for injected
    /// secrets came compressed (`Content-Encoding`), though the proxy asked for `identity`:
    /// it cannot be scanned, so it is answered 502 instead.
    ResponseEncoded => "response_encoded", Upstream;
    /// Both sides finished normally.
    Finished => "finished", None;
    /// No bytes moved for the idle timeout.
    IdleTimeout => "idle_timeout", Agent;
    /// The flow reached its maximum lifetime.
    TotalTimeout => "total_timeout", Agent;
    /// A policy reload denies this flow: it was cut.
    Revoked => "revoked", Proxy;
    /// The agent side failed (reset, error) while splicing.
    AgentError => "agent_error", Agent;
    /// The upstream side failed (reset, error) while splicing.
    UpstreamError => "upstream_error", Upstream;
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}
