//! Refusals an agent can understand: what the proxy writes to the agent before closing a flow
//! it refused for a policy reason.
//!
//! A bare close (the guest netstack turns it into a reset) reads, to an agent and its tools, as
//! a network fault, and they retry. So a flow refused by the policy is answered in the protocol
//! the agent spoke, once its first bytes show which:
//!
//! - TLS (a whole ClientHello): a fatal alert record, in the clear as TLS allows before the
//!   server's first flight: `unrecognized_name` for a name no rule knows, `access_denied` for
//!   everything else the policy refuses. Clients report it as a TLS alert, not a reset.
//! - Plain HTTP (a whole request head): `403 Forbidden`, `Connection: close`, with a text body
//!   naming the reason and the rule (never the refusal's detail: it may hold addresses the
//!   host resolved).
//! - Anything else, a flow refused for a reason that is not the policy's (a malformed header or
//!   hello, a timeout, an upstream failure), or a flow that sends nothing within
//!   [`ANSWER_WAIT`]: the close alone, as before. A server-speaks-first protocol (SSH, SMTP)
//!   therefore waits that long for its reset.
//!
//! The refusal's audit record is written before the answer: the answer is best effort and
//! never delays or changes the record.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use crate::outcome::Reason;
use crate::sniff::{self, MAX_SNIFF, Sniffed};

/// How long a refused flow waits for the agent's first bytes (under the sniff timeout, if that
/// is shorter) before it is closed without an answer. Real TLS and HTTP clients send within a
/// round trip of connecting.
pub const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// TLS alert descriptions the proxy sends (RFC 8446 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Alert {
    /// 49: the policy refuses this flow.
    AccessDenied = 49,
    /// 112: no rule knows the server name asked for.
    UnrecognizedName = 112,
}

impl Alert {
    /// The alert a refusal for `reason` is answered with.
    pub fn for_reason(reason: Reason) -> Alert {
        match reason {
            Reason::NoRule => Alert::UnrecognizedName,
            _ => Alert::AccessDenied,
        }
    }

    /// The alert as a whole TLS record: content type 21 (alert), legacy version TLS 1.2, length
    /// 2, level 2 (fatal), description.
    pub fn record(self) -> [u8; 7] {
        [21, 3, 3, 0, 2, 2, self as u8]
    }
}

/// Whether a refusal for `reason` is one the agent is told about: the policy's own refusals,
/// where the agent's request was well formed and something clear can be said. Malformed
/// input, timeouts, resource limits and upstream failures keep the bare close.
pub fn answered(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::NoRule
            | Reason::PortNotAllowed
            | Reason::IpLiteral
            | Reason::ProgramNotAllowed
            | Reason::NonPublicAddress
            | Reason::SniMissing
            | Reason::SniMismatch
            | Reason::TlsHiddenName
            | Reason::HostMissing
            | Reason::HostMismatch
            | Reason::ProtocolNotAllowed
            | Reason::PlaceholderUnbound
            | Reason::RequestRefused
    )
}

/// One line saying why, for a 403 body.
fn explain(reason: Reason, host: Option<&str>, program: Option<&str>) -> String {
    let host = host.unwrap_or("this address");
    match reason {
        Reason::NoRule => format!("no rule allows {host}"),
        Reason::PortNotAllowed => format!("no rule allows {host} on this port"),
        Reason::IpLiteral => "no rule allows this IP address; use a host name".to_owned(),
        Reason::ProgramNotAllowed => match program {
            Some(p) => format!("the rule for {host} does not allow the program {p}"),
            None => format!(
                "the rule for {host} allows only the programs it names, and the workspace did \
                 not say which program opened this connection"
            ),
        },
        Reason::NonPublicAddress => format!("{host} resolves to a non-public address"),
        Reason::HostMissing => "the request has no Host header".to_owned(),
        Reason::HostMismatch => format!("the request's Host is not {host}"),
        Reason::ProtocolNotAllowed => format!("the rule for {host} does not allow plain HTTP"),
        Reason::PlaceholderUnbound => {
            "a secret's placeholder is sent where it is not bound (placeholders are only \
             replaced over intercepted TLS)"
                .to_owned()
        }
        Reason::RequestRefused => "the proxy does not forward CONNECT or upgrades".to_owned(),
        _ => "refused by the workspace's egress policy".to_owned(),
    }
}

/// The whole `403 Forbidden` response for a plain-HTTP request refused for `reason`, by `rule`
/// if one matched, to `host` (the flow's hostname), from `program` (as the guest named it).
pub fn forbidden(
    reason: Reason,
    rule: Option<&str>,
    host: Option<&str>,
    program: Option<&str>,
) -> Vec<u8> {
    let mut body = format!(
        "moat egress refused this request: {}\nreason: {reason}\n",
        explain(reason, host, program)
    );
    if let Some(rule) = rule {
        body.push_str(&format!("rule: {rule}\n"));
    }
    if let Some(program) = program {
        body.push_str(&format!("program: {program}\n"));
    }
    let mut out = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nX-Moat-Refusal: {reason}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// What the agent's first bytes turned out to be, as far as answering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spoke {
    Tls,
    Http,
}

/// Classifies `buf`: `Ok(None)` means read more, `Err(())` nothing to answer in.
fn spoke(buf: &[u8]) -> Result<Option<Spoke>, ()> {
    match sniff::sniff(buf) {
        Ok(Some(Sniffed::Tls(..))) => Ok(Some(Spoke::Tls)),
        Ok(Some(Sniffed::Http(..))) => Ok(Some(Spoke::Http)),
        // A whole request head that the Host checks refuse is still HTTP.
        Err(Reason::HostMissing | Reason::HostMismatch | Reason::RequestRefused) => {
            Ok(Some(Spoke::Http))
        }
        Ok(None) if buf.len() < MAX_SNIFF => Ok(None),
        _ => Err(()),
    }
}

/// Answers a flow refused for `reason` (by `rule`, to `host`, from `program`) in the protocol
/// the agent spoke:
/// reads its first bytes into `buf` (which may hold some already) for at most [`ANSWER_WAIT`]
/// or `sniff_timeout`, then writes the alert or the 403. Does nothing for a reason that is
/// not [`answered`]. The caller closes the stream.
pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &mut S,
    buf: &mut Vec<u8>,
    reason: Reason,
    rule: Option<&str>,
    host: Option<&str>,
    program: Option<&str>,
    sniff_timeout: Duration,
) {
    if !answered(reason) {
        return;
    }
    let deadline = Instant::now() + sniff_timeout.min(ANSWER_WAIT);
    let kind = loop {
        match spoke(buf) {
            Ok(Some(kind)) => break kind,
            Ok(None) => {}
            Err(()) => return,
        }
        match timeout_at(deadline, agent.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    };
    let bytes = match kind {
        Spoke::Tls => Alert::for_reason(reason).record().to_vec(),
        Spoke::Http => forbidden(reason, rule, host, program),
    };
    write_answer(agent, &bytes, deadline).await;
}

/// Writes `bytes` and flushes, bounded by `deadline`; failures are ignored (the agent may
/// have gone, and the flow is closed either way).
pub(crate) async fn write_answer<S: AsyncWrite + Unpin>(
    agent: &mut S,
    bytes: &[u8],
    deadline: Instant,
) {
    let _ = timeout_at(deadline, async {
        agent.write_all(bytes).await?;
        agent.flush().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_records_are_fatal_tls_alerts() {
        assert_eq!(Alert::AccessDenied.record(), [0x15, 3, 3, 0, 2, 2, 49]);
        assert_eq!(
            Alert::for_reason(Reason::NoRule).record(),
            [0x15, 3, 3, 0, 2, 2, 112]
        );
        assert_eq!(Alert::for_reason(Reason::SniMismatch), Alert::AccessDenied);
    }

    #[test]
    fn forbidden_names_the_reason_and_rule_with_a_true_length() {
        let out = forbidden(
            Reason::PortNotAllowed,
            Some("github"),
            Some("github.com"),
            None,
        );
        let text = String::from_utf8(out).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("port_not_allowed"));
        assert!(body.contains("rule: github"));
        let none = forbidden(Reason::NoRule, None, Some("evil.test"), None);
        assert!(String::from_utf8_lossy(&none).contains("no rule allows evil.test"));
    }

    #[test]
    fn a_program_refusal_names_the_rule_and_the_program() {
        let out = forbidden(
            Reason::ProgramNotAllowed,
            Some("github"),
            Some("github.com"),
            Some("/usr/bin/python3.11"),
        );
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.contains("does not allow the program /usr/bin/python3.11"));
        assert!(text.contains("rule: github\n"));
        assert!(text.contains("program: /usr/bin/python3.11\n"));
        let unknown = forbidden(Reason::ProgramNotAllowed, Some("github"), None, None);
        assert!(String::from_utf8_lossy(&unknown).contains("did not say which program"));
    }

    #[test]
    fn only_the_policys_refusals_are_answered() {
        assert!(answered(Reason::NoRule));
        assert!(!answered(Reason::HeaderInvalid));
        assert!(!answered(Reason::ConnectFailed));
        assert!(!answered(Reason::TlsMalformed));
    }
}
