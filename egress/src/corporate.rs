//! The corporate hop: a flow whose rule's action is `corporate` leaves through the broker, never
//! straight to an address.
//!
//! The workspace's host side (moat-broker's connector, `moat-broker connect --egress-uds PATH`)
//! listens on a local Unix socket. For each corporate flow the proxy connects to it, writes one
//! line naming the service (never an address; the broker resolves and connects to the service's
//! configured address) and the flow's destination port, and reads one answer line:
//!
//! ```text
//!  proxy -> connector   CONNECT <service>:<port>\n
//!  connector -> proxy   OK\n                 then the stream carries the service's bytes
//!                       ERR <why>\n          then EOF
//! ```
//!
//! The answer is read one byte at a time, so no byte of the service's that follows `OK\n` is
//! consumed here; it is bounded in size ([`MAX_ANSWER`]) and, with the connect and the request,
//! in time (`Limits::corporate_timeout`). After `OK` the flow is spliced like a passthrough flow.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use moat_policy::ServiceName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

use crate::outcome::Reason;

/// The longest answer line accepted, newline excluded (`OK`, or `ERR` and a short reason).
pub const MAX_ANSWER: usize = 64;

/// Why a corporate flow could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
pub enum CorporateError {
    /// The proxy was started without a corporate egress socket.
    #[error("no corporate egress socket is configured")]
    NotConfigured,
    /// Nothing accepted on the socket.
    #[error("cannot connect to the corporate egress socket {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the request or reading the answer failed.
    #[error("the corporate egress socket failed")]
    Io(#[source] io::Error),
    /// The socket closed before a whole answer line.
    #[error("the corporate egress socket closed without answering")]
    NoAnswer,
    /// No whole answer within the time allowed.
    #[error("the corporate egress socket did not answer in time")]
    Timeout,
    /// An answer that is neither `OK` nor `ERR ...`, or too long.
    #[error("the corporate egress socket's answer is not OK or ERR: {0}")]
    BadAnswer(Printable),
    /// The connector answered `ERR`.
    #[error("the broker side refused the service: ERR {0}")]
    Refused(Printable),
}

impl CorporateError {
    /// The flow's reason: `corporate_refused` when the broker side answered `ERR`, else
    /// `corporate_unavailable`.
    pub fn reason(&self) -> Reason {
        match self {
            CorporateError::Refused(_) => Reason::CorporateRefused,
            _ => Reason::CorporateUnavailable,
        }
    }
}

/// Bytes from the socket, shown with anything but printable ASCII escaped (they go into audit
/// records and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printable(Vec<u8>);

impl fmt::Display for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b == b' ' || b.is_ascii_graphic() {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// The request line for `service` on `port`. A [`ServiceName`] holds only `a-z`, `0-9` and
/// `-`, so it cannot end the line or name a second target.
pub fn request_line(service: &ServiceName, port: u16) -> String {
    format!("CONNECT {service}:{port}\n")
}

/// Reads what an answer line says (`line` without its newline).
pub fn parse_answer(line: &[u8]) -> Result<(), CorporateError> {
    if line == b"OK" {
        return Ok(());
    }
    match line.strip_prefix(b"ERR") {
        Some(rest) if rest.is_empty() || rest.starts_with(b" ") => Err(CorporateError::Refused(
            Printable(rest.trim_ascii_start().to_vec()),
        )),
        _ => Err(CorporateError::BadAnswer(Printable(line.to_vec()))),
    }
}

/// Asks the connector listening on `uds` for `service` on `port`, all of it before `deadline`.
/// On `OK`, returns the stream, positioned at the service's first byte.
pub async fn open(
    uds: Option<&Path>,
    service: &ServiceName,
    port: u16,
    deadline: Instant,
) -> Result<UnixStream, CorporateError> {
    let uds = uds.ok_or(CorporateError::NotConfigured)?;
    let exchange = async {
        let mut stream =
            UnixStream::connect(uds)
                .await
                .map_err(|source| CorporateError::Connect {
                    path: uds.to_owned(),
                    source,
                })?;
        stream
            .write_all(request_line(service, port).as_bytes())
            .await
            .map_err(CorporateError::Io)?;
        let mut line = Vec::with_capacity(MAX_ANSWER);
        loop {
            // One byte at a time: whatever follows the newline is the service's.
            let b = match stream.read_u8().await {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(CorporateError::NoAnswer);
                }
                Err(e) => return Err(CorporateError::Io(e)),
            };
            if b == b'\n' {
                break;
            }
            if line.len() == MAX_ANSWER {
                return Err(CorporateError::BadAnswer(Printable(line)));
            }
            line.push(b);
        }
        parse_answer(&line)?;
        Ok(stream)
    };
    timeout_at(deadline, exchange)
        .await
        .unwrap_or(Err(CorporateError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_names_the_service_and_port() {
        let service = ServiceName::parse("git-corp").unwrap();
        assert_eq!(request_line(&service, 22), "CONNECT git-corp:22\n");
    }

    #[test]
    fn ok_answer_opens_the_flow() {
        assert!(parse_answer(b"OK").is_ok());
    }

    #[test]
    fn err_answers_are_refusals_with_their_reason() {
        for (line, why) in [
            (&b"ERR 403"[..], "403"),
            (b"ERR broker not connected", "broker not connected"),
            (b"ERR", ""),
        ] {
            let err = parse_answer(line).unwrap_err();
            assert_eq!(err.reason(), Reason::CorporateRefused);
            assert_eq!(
                err.to_string(),
                format!("the broker side refused the service: ERR {why}")
            );
        }
    }

    #[test]
    fn other_answers_are_unavailability_never_success() {
        for line in [
            &b"OK "[..],
            b"ok",
            b"OKAY",
            b"ERROR",
            b"",
            b"HTTP/1.1 200 OK",
        ] {
            let err = parse_answer(line).unwrap_err();
            assert_eq!(err.reason(), Reason::CorporateUnavailable, "{line:?}");
        }
    }

    #[test]
    fn control_bytes_in_an_answer_are_escaped() {
        let err = parse_answer(b"ERR \x1b[31mred\r").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the broker side refused the service: ERR \\x1b[31mred\\x0d"
        );
    }
}
