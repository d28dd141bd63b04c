//! Every request head of a plain-HTTP flow, not only the first, is held to the flow's name.
//!
//! Sniffing reads the first request head; a kept-alive connection then carries more requests,
//! each free to name another Host (a virtual host at the same address: domain fronting), to
//! upgrade to h2c (whose streams name any authority) or to carry a secret's placeholder. So the
//! agent's bytes of a plain-HTTP flow go through a [`RequestChecker`] on their way upstream:
//! it follows the request framing (`intercept::framing::Follower`, the follower intercepted
//! flows use: Content-Length and chunked bodies, a head held until whole and bounded), and runs
//! every whole head through the same checks as the first ([`super::http::parse`],
//! [`super::check`], the placeholder check) before any byte of it is passed on. A head that
//! fails, or framing that cannot be followed or is ambiguous (Content-Length with
//! Transfer-Encoding, Content-Length repeated), ends the flow; none of its bytes leave.
//!
//! Re-checking was chosen over refusing keep-alive: refusing reuse would need the proxy to find
//! where each *response* ends (HEAD, 1xx, 204/304, close-delimited bodies) or to rewrite request
//! heads, and would break every client that pipelines or reuses connections; the request side's
//! framing is all a check needs, and the follower for it exists and is fuzzed.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

use super::http::{self, MAX_HEAD};
use super::{Sniffed, check, http_reason};
use crate::intercept::framing::{Follower, Head, Step};
use crate::outcome::Reason;
use crate::secrets::Secrets;

/// Why a request of a plain-HTTP flow was refused (the flow ends there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, as the first head would have been refused for.
    pub reason: Reason,
    /// Which request, and what was wrong with it (never a header value).
    pub detail: String,
}

/// Follows the agent's side of one plain-HTTP flow and checks every request head.
#[derive(Debug)]
pub struct RequestChecker {
    follower: Follower,
    /// The flow's hostname (none for an IP-literal flow) and destination port.
    hostname: Option<String>,
    port: u16,
    /// The secrets in force when the flow was admitted, for their placeholders.
    secrets: Arc<Secrets>,
    /// Request heads seen so far.
    requests: u64,
    /// The refusal, once there was one: every later call returns it again.
    refused: Option<Refusal>,
}

impl RequestChecker {
    /// A checker for a flow to `hostname` (if named) on `port`.
    pub fn new(hostname: Option<&str>, port: u16, secrets: Arc<Secrets>) -> Self {
        RequestChecker {
            follower: Follower::with_max_head(MAX_HEAD),
            hostname: hostname.map(str::to_owned),
            port,
            secrets,
            requests: 0,
            refused: None,
        }
    }

    /// Follows `input`, the next bytes from the agent, and appends to `out` the bytes that may
    /// go upstream now: bodies as they come, a head once it is whole and checked. An error
    /// refuses the request whose head or framing is at fault: nothing of it is in `out`, and
    /// the flow must end (every later call fails the same way).
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if let Some(r) = &self.refused {
            return Err(r.clone());
        }
        while !input.is_empty() {
            let n = match self.follower.step(input) {
                Step::Body(n) => {
                    out.extend_from_slice(&input[..n]);
                    n
                }
                Step::Partial(n) => n,
                Step::Head(n, framing) => {
                    self.requests += 1;
                    if let Err(r) = self.check_head(framing) {
                        self.refused = Some(r.clone());
                        return Err(r);
                    }
                    out.extend_from_slice(self.follower.head());
                    n
                }
                Step::Lost => {
                    let r = self.refusal(
                        Reason::AmbiguousFraming,
                        "framing that cannot be followed (a malformed or oversized head, or a \
                         bad chunk)",
                    );
                    self.refused = Some(r.clone());
                    return Err(r);
                }
            };
            input = input.get(n..).unwrap_or(&[]);
        }
        Ok(())
    }

    /// How many request heads have been seen (checked or refused).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    fn refusal(&self, reason: Reason, what: &str) -> Refusal {
        Refusal {
            reason,
            detail: format!("plain HTTP request {}: {what}", self.requests + 1),
        }
    }

    /// The checks the first head passed when the flow was sniffed, for the head just whole.
    fn check_head(&self, framing: Head) -> Result<(), Refusal> {
        let at = |reason, what: &str| Refusal {
            reason,
            detail: format!("plain HTTP request {}: {what}", self.requests),
        };
        match framing {
            Head::Clean => {}
            Head::LengthAndChunked => {
                return Err(at(
                    Reason::AmbiguousFraming,
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            Head::DuplicateLength => {
                return Err(at(Reason::AmbiguousFraming, "Content-Length repeated"));
            }
            Head::Lost => {
                return Err(at(Reason::AmbiguousFraming, "framing lost"));
            }
        }
        let head = self.follower.head();
        let (host, port) = match http::parse(head) {
            Ok(Some(h)) => (h.host, h.port),
            Ok(None) => return Err(at(Reason::HttpMalformed, "incomplete head")),
            Err(e) => return Err(at(http_reason(&e), &e.to_string())),
        };
        let sniffed = Sniffed::Http(host, port);
        if let Err(reason) = check(&sniffed, self.hostname.as_deref(), self.port) {
            let named = match &sniffed {
                Sniffed::Http(h, Some(p)) => format!("named {h}:{p}"),
                Sniffed::Http(h, None) => format!("named {h}"),
                _ => String::new(),
            };
            return Err(at(reason, &named));
        }
        if let Some(spec) = self.secrets.placeholder_in(head) {
            return Err(at(
                Reason::PlaceholderUnbound,
                &format!("placeholder of secret {:?}", spec.name),
            ));
        }
        Ok(())
    }
}

/// The agent's read half of a plain-HTTP flow, yielding only what its [`RequestChecker`] lets
/// go upstream. A refusal is kept in `refused` (for the flow's Close record) and read as an
/// error, which ends the splice.
pub(crate) struct Checked<R> {
    inner: R,
    checker: RequestChecker,
    /// Checked bytes not yet read, from `at`.
    ready: Vec<u8>,
    at: usize,
    /// What the last read from `inner` got.
    scratch: Vec<u8>,
    refused: Arc<Mutex<Option<Refusal>>>,
}

impl<R> Checked<R> {
    /// Checks what `inner` yields with `checker`, reading up to `buffer` bytes at a time.
    pub(crate) fn new(
        inner: R,
        checker: RequestChecker,
        buffer: usize,
        refused: Arc<Mutex<Option<Refusal>>>,
    ) -> Self {
        Checked {
            inner,
            checker,
            ready: Vec::new(),
            at: 0,
            scratch: vec![0; buffer.max(1)],
            refused,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Checked<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                return Poll::Ready(Ok(()));
            }
            this.ready.clear();
            this.at = 0;
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let got = read.filled();
            if got.is_empty() {
                // EOF. A head still held was never whole: it is dropped, not sent.
                return Poll::Ready(Ok(()));
            }
            if let Err(refusal) = this.checker.push(got, &mut this.ready) {
                let msg = refusal.detail.clone();
                let mut slot = match this.refused.lock() {
                    Ok(s) => s,
                    Err(poisoned) => poisoned.into_inner(),
                };
                slot.get_or_insert(refusal);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, msg)));
            }
            // Nothing checked yet (a head still arriving): read on.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Result<(), Refusal>) {
        let mut c = RequestChecker::new(Some("a.example"), 80, Arc::default());
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(r) = c.push(chunk, &mut out) {
                return (out, Err(r));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn kept_alive_requests_for_the_flows_host_pass_whole() {
        let s: &[u8] = b"GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n\
            POST /2 HTTP/1.1\r\nHost: a.example:80\r\nContent-Length: 35\r\n\r\n\
            GET / HTTP/1.1\r\nHost: b.example\r\n\r\n\
            POST /3 HTTP/1.1\r\nHost: A.Example.\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n0\r\n\r\n";
        for size in 1..=s.len() {
            let pieces: Vec<&[u8]> = s.chunks(size).collect();
            assert_eq!(run(&pieces), (s.to_vec(), Ok(())), "reads of {size}");
        }
    }

    #[test]
    fn a_later_head_for_another_host_is_refused_and_held_back() {
        let first = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let second = b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n";
        let mut c = RequestChecker::new(Some("a.example"), 80, Arc::default());
        let mut out = Vec::new();
        c.push(first, &mut out).unwrap();
        assert_eq!(out, first);
        out.clear();
        // Arriving a byte at a time, none of it is passed on, even before the head is whole.
        let mut refused = None;
        for b in second.chunks(1) {
            if let Err(r) = c.push(b, &mut out) {
                refused = Some(r);
                break;
            }
        }
        assert!(out.is_empty());
        let r = refused.unwrap();
        assert_eq!(r.reason, Reason::HostMismatch);
        assert!(r.detail.contains("request 2"), "{}", r.detail);
        // Sticky: nothing more passes.
        assert_eq!(c.push(first, &mut out), Err(r));
        assert!(out.is_empty());
    }

    #[test]
    fn each_check_of_the_first_head_applies_to_later_ones() {
        let first = "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
        for (second, reason) in [
            (
                "GET HTTP://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
                Reason::HostMismatch,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
                Reason::HostMismatch,
            ),
            ("GET / HTTP/1.1\r\n\r\n", Reason::HostMissing),
            (
                "GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: h2c\r\n\r\n",
                Reason::RequestRefused,
            ),
            (
                "CONNECT b.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n",
                Reason::RequestRefused,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Reason::AmbiguousFraming,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Reason::AmbiguousFraming,
            ),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Reason::AmbiguousFraming),
        ] {
            let (out, result) = run(&[format!("{first}{second}").as_bytes()]);
            assert_eq!(out, first.as_bytes(), "{second}");
            assert_eq!(result.map_err(|r| r.reason), Err(reason), "{second}");
        }
    }

    #[test]
    fn a_head_inside_a_body_is_body() {
        let body = "GET / HTTP/1.1\r\nHost: b.example\r\n\r\n";
        let s = format!(
            "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(run(&[s.as_bytes()]), (s.into_bytes(), Ok(())));
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let mut head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        let (out, result) = run(&[&head]);
        assert!(out.is_empty());
        assert_eq!(result.map_err(|r| r.reason), Err(Reason::AmbiguousFraming));
    }
}
