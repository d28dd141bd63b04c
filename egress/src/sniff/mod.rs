//! Recognise the protocol of a flow from its first client bytes and learn the name it is for,
//! so the name the agent *uses* can be held to the name the policy *allowed* (no domain fronting).

pub mod http;
pub mod requests;
pub mod tls;

use moat_policy::Protocol;

use crate::outcome::Reason;

/// Upper bound on bytes buffered while sniffing.
pub const MAX_SNIFF: usize = tls::MAX_CLIENT_HELLO + 5 * 4 + 64;

/// What the first bytes of a flow turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// TLS, with the ClientHello's server name if it had one, and the extension (ECH or ESNI)
    /// that hides the name it really asks for, if it had one.
    Tls(Option<String>, Option<u16>),
    /// Plain HTTP for this host (and port, if the Host header named one).
    Http(String, Option<u16>),
    /// Neither: opaque bytes.
    Other,
}

impl Sniffed {
    /// The policy protocol this corresponds to.
    pub fn protocol(&self) -> Protocol {
        match self {
            Sniffed::Tls(..) => Protocol::Tls,
            Sniffed::Http(..) => Protocol::Http,
            Sniffed::Other => Protocol::Tcp,
        }
    }
}

/// Classifies `buf`. `Ok(None)`: need more bytes.
pub fn sniff(buf: &[u8]) -> Result<Option<Sniffed>, Reason> {
    match buf.first() {
        None => Ok(None),
        Some(22) => match tls::parse(buf) {
            Ok(Some(hello)) => Ok(Some(Sniffed::Tls(hello.server_name, hello.hidden_name))),
            Ok(None) => Ok(None),
            Err(_) => Err(Reason::TlsMalformed),
        },
        Some(_) if http::looks_like_http(buf) => match http::parse(buf) {
            Ok(Some(head)) => Ok(Some(Sniffed::Http(head.host, head.port))),
            Ok(None) => Ok(None),
            Err(e) => Err(http_reason(&e)),
        },
        Some(_) => Ok(Some(Sniffed::Other)),
    }
}

/// The reason a request head refused by [`http::parse`] is refused for.
pub fn http_reason(e: &http::HttpError) -> Reason {
    match e {
        http::HttpError::NoHost => Reason::HostMissing,
        http::HttpError::AmbiguousHost => Reason::HostMismatch,
        http::HttpError::Tunnel => Reason::RequestRefused,
        http::HttpError::Malformed | http::HttpError::TooLarge => Reason::HttpMalformed,
    }
}

/// Holds what was sniffed to the flow's hostname (if named) and destination port.
pub fn check(sniffed: &Sniffed, hostname: Option<&str>, port: u16) -> Result<(), Reason> {
    match (sniffed, hostname) {
        (Sniffed::Tls(None, _), Some(_)) => Err(Reason::SniMissing),
        (Sniffed::Tls(Some(sni), _), Some(host)) if sni != host => Err(Reason::SniMismatch),
        (Sniffed::Http(host, _), Some(want)) if host != want => Err(Reason::HostMismatch),
        (Sniffed::Http(_, Some(p)), _) if *p != port => Err(Reason::HostMismatch),
        _ => Ok(()),
    }
}
