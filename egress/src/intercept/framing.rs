//! The HTTP/1.1 message framing of what the agent sends, followed byte for byte between the
//! agent's TLS and hyper, so that every request head is seen whole *as sent*.
//!
//! hyper reads a request that carries both `Content-Length` and `Transfer-Encoding` by its
//! chunked framing, drops the `Content-Length` and closes the connection after the response:
//! safe, but the request is still forwarded, and the handler never learns what was sent. Such
//! a request (the classic smuggling shape) is to be *refused* instead. This module
//! records, for every request head in order, whether it carried both; the handler takes one
//! record per HTTP/1 request (hyper serves them in order) and refuses the request with 400.
//!
//! The framing followed is hyper's (RFC 9112): heads parsed by httparse, as hyper parses them;
//! a chunked body when the last `Transfer-Encoding` ends in `chunked`, else a `Content-Length`
//! body, else none. Bytes it cannot follow (a head or chunk hyper would refuse too, a head
//! over `MAX_HEAD`) make the connection [`Head::Lost`]: every later request on it is
//! refused. So this can only ever refuse more, never let through what hyper would not.
//!
//! The follower itself ([`Follower`]) does no I/O and holds each head until it is whole: plain
//! HTTP flows use it too (`crate::sniff::requests`), to check every request head before any
//! byte of it leaves.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MAX_REQUEST_HEAD;

/// Largest head followed (hyper refuses larger ones with 431 before any handler runs).
const MAX_HEAD: usize = MAX_REQUEST_HEAD;
/// Headers parsed per head at most (hyper's own limit is 100).
const MAX_HEADERS: usize = 128;
/// Chunk-extension bytes allowed per chunk line.
const MAX_CHUNK_LINE: usize = 16 * 1024;
/// Heads read ahead of the handler at most (hyper's read-ahead bounds this well below).
const MAX_QUEUED: usize = 4096;

/// What one request head carried, as far as smuggling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Framed by at most one of Content-Length and Transfer-Encoding.
    Clean,
    /// Carried both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
    /// Carried `Content-Length` more than once (hyper keeps one when they agree).
    DuplicateLength,
    /// The framing of this connection's bytes could not be followed.
    Lost,
}

/// The heads seen, oldest first, for the request handler.
#[derive(Debug, Default)]
pub struct Heads {
    queue: Mutex<(VecDeque<Head>, bool)>,
}

impl Heads {
    /// The record of the next request hyper hands over. A request whose head was not seen is
    /// [`Head::Lost`] (fail closed).
    pub fn next(&self) -> Head {
        let mut q = self.lock();
        match q.0.pop_front() {
            Some(head) => head,
            None => Head::Lost,
        }
    }

    /// Takes every record not yet taken, oldest first (for tests and fuzzing).
    pub fn drain(&self) -> Vec<Head> {
        self.lock().0.drain(..).collect()
    }

    fn push(&self, head: Head) {
        let mut q = self.lock();
        if q.1 {
            return;
        }
        if head == Head::Lost || q.0.len() >= MAX_QUEUED {
            // Everything after the last head seen is lost.
            q.1 = true;
            q.0.push_back(Head::Lost);
            return;
        }
        q.0.push_back(head);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<Head>, bool)> {
        match self.queue.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of the size (at least one seen when `digits`).
    Size {
        digits: bool,
    },
    /// Spaces or tabs after the size.
    SizeLws,
    /// A chunk extension, up to CR.
    Extension,
    /// LF after the size line's CR.
    SizeLf,
    /// Chunk data.
    Data,
    /// CR, then LF, after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: CR of the final empty line, or a trailer line.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// A Content-Length body with this many bytes left.
    Length(u64),
    /// A chunked body.
    Chunked { at: Chunk, size: u64, line: usize },
    /// Framing lost; nothing more is followed.
    Lost,
}

/// One step of [`Follower::step`]: how many bytes at the start of its input it consumed, and
/// what they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Bytes of a body (or of its chunked framing).
    Body(usize),
    /// Bytes of a head that is not yet whole (the follower holds them).
    Partial(usize),
    /// The last bytes of a head, and its record; the whole head is [`Follower::head`] until
    /// the next step.
    Head(usize, Head),
    /// The framing could not be followed: nothing was consumed, and every later step is `Lost`.
    Lost,
}

/// Follows the framing of the request bytes fed to it, step by step, holding each head until
/// it is whole. Sans I/O: the intercept path records the heads ([`Framing`]); plain-HTTP
/// flows check each one before it leaves (`crate::sniff::requests`).
#[derive(Debug)]
pub struct Follower {
    state: State,
    /// The head being read, or (when `whole`) the head just completed.
    head: Vec<u8>,
    /// `head` holds a whole head, for [`Follower::head`].
    whole: bool,
    /// How far `head` was searched for its end (so each byte is searched once).
    searched: usize,
    /// Largest head followed.
    max_head: usize,
}

impl Default for Follower {
    fn default() -> Self {
        Self::with_max_head(MAX_HEAD)
    }
}

impl Follower {
    /// Follows a new connection's bytes; a head longer than `max_head` loses the framing.
    pub fn with_max_head(max_head: usize) -> Self {
        Follower {
            state: State::Head,
            head: Vec::new(),
            whole: false,
            searched: 0,
            max_head,
        }
    }

    /// The head the last step completed (empty unless that step was [`Step::Head`]).
    pub fn head(&self) -> &[u8] {
        if self.whole { &self.head } else { &[] }
    }

    /// Follows the start of `bytes`, the next bytes of the stream. Consumes at least one byte
    /// of a non-empty input unless the framing is lost.
    pub fn step(&mut self, bytes: &[u8]) -> Step {
        if bytes.is_empty() {
            return Step::Body(0);
        }
        match self.state {
            State::Lost => Step::Lost,
            State::Head => self.step_head(bytes),
            State::Length(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                let left = left - n as u64;
                self.state = if left == 0 {
                    State::Head
                } else {
                    State::Length(left)
                };
                Step::Body(n)
            }
            State::Chunked { at, size, line } => self.step_chunked(at, size, line, bytes),
        }
    }

    fn lose(&mut self) -> Step {
        self.state = State::Lost;
        self.head = Vec::new();
        self.whole = false;
        Step::Lost
    }

    /// Accumulates a head; once whole, records it and moves to its body. The head is parsed
    /// (by httparse, as hyper parses it) once, when its end has arrived: the first empty line
    /// after the request line.
    fn step_head(&mut self, bytes: &[u8]) -> Step {
        if self.whole {
            self.head.clear();
            self.whole = false;
            self.searched = 0;
        }
        let before = self.head.len();
        let take = bytes.len().min(self.max_head + 1 - before);
        self.head.extend_from_slice(&bytes[..take]);
        let Some(end) = head_end(&self.head, &mut self.searched) else {
            if self.head.len() > self.max_head {
                return self.lose();
            }
            return Step::Partial(take);
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = match req.parse(&self.head[..end]) {
            Ok(httparse::Status::Complete(len)) if len == end => body_of(&req),
            _ => None,
        };
        let Some((next, head)) = parsed else {
            return self.lose();
        };
        // Bytes of this input past the head belong to the body (or the next head). The head
        // ends in this input (an end within earlier inputs was found then).
        self.head.truncate(end);
        self.whole = true;
        self.searched = 0;
        self.state = next;
        Step::Head(end.saturating_sub(before), head)
    }

    fn step_chunked(&mut self, at: Chunk, size: u64, line: usize, bytes: &[u8]) -> Step {
        if at == Chunk::Data {
            let n = usize::try_from(size).unwrap_or(usize::MAX).min(bytes.len());
            let size = size - n as u64;
            let at = if size == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data
            };
            self.state = State::Chunked { at, size, line: 0 };
            return Step::Body(n);
        }
        let b = bytes[0];
        let line = line + 1;
        let next = match (at, b) {
            (Chunk::Size { .. }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from(hex(b));
                size.checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .map(|size| (Chunk::Size { digits: true }, size))
            }
            (Chunk::Size { digits: true } | Chunk::SizeLws, b' ' | b'\t') => {
                Some((Chunk::SizeLws, size))
            }
            (Chunk::Size { digits: true } | Chunk::SizeLws, b';') => Some((Chunk::Extension, size)),
            (Chunk::Size { digits: true } | Chunk::SizeLws | Chunk::Extension, b'\r') => {
                Some((Chunk::SizeLf, size))
            }
            (Chunk::Extension, b'\n') => None,
            (Chunk::Extension, _) => Some((Chunk::Extension, size)),
            (Chunk::SizeLf, b'\n') if size == 0 => Some((Chunk::EndCr, 0)),
            (Chunk::SizeLf, b'\n') => Some((Chunk::Data, size)),
            (Chunk::DataCr, b'\r') => Some((Chunk::DataLf, 0)),
            (Chunk::DataLf, b'\n') => Some((Chunk::Size { digits: false }, 0)),
            (Chunk::EndCr, b'\r') => Some((Chunk::EndLf, 0)),
            (Chunk::Trailer, b'\r') => Some((Chunk::TrailerLf, 0)),
            (Chunk::EndCr | Chunk::Trailer, _) => Some((Chunk::Trailer, 0)),
            (Chunk::TrailerLf, b'\n') => Some((Chunk::EndCr, 0)),
            (Chunk::EndLf, b'\n') => {
                self.state = State::Head;
                return Step::Body(1);
            }
            _ => None,
        };
        match next {
            Some((at, size)) if line <= MAX_CHUNK_LINE => {
                // A new line starts after each LF.
                let line = if matches!(at, Chunk::Data | Chunk::EndCr | Chunk::Size { .. }) {
                    0
                } else {
                    line
                };
                self.state = State::Chunked { at, size, line };
                Step::Body(1)
            }
            _ => self.lose(),
        }
    }
}

/// Follows the framing of the request bytes fed to it, recording each head in `heads`.
#[derive(Debug)]
pub struct Framing {
    follower: Follower,
    heads: Arc<Heads>,
}

impl Framing {
    /// Follows a new connection's bytes, recording into `heads`.
    pub fn new(heads: Arc<Heads>) -> Self {
        Framing {
            follower: Follower::default(),
            heads,
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = match self.follower.step(bytes) {
                Step::Lost => {
                    // Recorded once: `Heads` ignores everything after a loss.
                    self.heads.push(Head::Lost);
                    return;
                }
                Step::Head(n, head) => {
                    self.heads.push(head);
                    n
                }
                Step::Body(n) | Step::Partial(n) => n,
            };
            bytes = bytes.get(n..).unwrap_or(&[]);
        }
    }
}

/// The length of the head at the start of `buf` (through its empty line), once it is all
/// there. Empty lines before the request line are part of it (httparse skips them, as hyper
/// does). `searched` keeps the search position between calls.
fn head_end(buf: &[u8], searched: &mut usize) -> Option<usize> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let from = (*searched).max(start);
    let found = buf[from..].iter().enumerate().find_map(|(i, &b)| {
        let at = from + i;
        // An LF followed by LF, or by CR LF, ends the head.
        (b == b'\n' && at > start).then_some(())?;
        match (buf.get(at + 1), buf.get(at + 2)) {
            (Some(b'\n'), _) => Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => Some(at + 3),
            _ => None,
        }
    });
    // Resume a little before the end: a terminator may be split across reads.
    *searched = buf.len().saturating_sub(2).max(start);
    found
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// How the body of `req` is framed, as hyper frames it, and the record of its head. `None`
/// when hyper would refuse the head.
fn body_of(req: &httparse::Request<'_, '_>) -> Option<(State, Head)> {
    let mut length: Option<u64> = None;
    let mut lengths = 0;
    let mut chunked: Option<bool> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last encoding of the last Transfer-Encoding line decides.
            let last = h.value.rsplit(|&b| b == b',').next()?;
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).ok()?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = text.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
            lengths += 1;
        }
    }
    let head = if chunked.is_some() && length.is_some() {
        Head::LengthAndChunked
    } else if lengths > 1 {
        Head::DuplicateLength
    } else {
        Head::Clean
    };
    let state = match (chunked, length) {
        (Some(true), _) => State::Chunked {
            at: Chunk::Size { digits: false },
            size: 0,
            line: 0,
        },
        (Some(false), _) => return None,
        (None, Some(n)) if n > 0 => State::Length(n),
        (None, _) => State::Head,
    };
    Some((state, head))
}

/// The agent's decrypted stream, its request bytes followed by a [`Framing`] on their way to
/// hyper.
pub(crate) struct Followed<S> {
    inner: S,
    framing: Framing,
}

impl<S> Followed<S> {
    pub(crate) fn new(inner: S, heads: Arc<Heads>) -> Self {
        Followed {
            inner,
            framing: Framing::new(heads),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Followed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.framing.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Followed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(chunks: &[&[u8]]) -> Vec<Head> {
        let heads = Arc::new(Heads::default());
        let mut f = Framing::new(Arc::clone(&heads));
        for c in chunks {
            f.feed(c);
        }
        heads.drain()
    }

    #[test]
    fn length_and_chunked_is_recorded_in_either_order() {
        let a = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let b = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n";
        assert_eq!(follow(&[a]), vec![Head::LengthAndChunked]);
        assert_eq!(follow(&[b]), vec![Head::LengthAndChunked]);
    }

    #[test]
    fn pipelined_heads_after_length_and_chunked_bodies_are_each_seen() {
        let s = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                  POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5;ext=1\r\nGET /\r\n0\r\nX-T: 1\r\n\r\n\
                  GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(follow(&[s]), vec![Head::Clean; 3]);
    }

    #[test]
    fn heads_and_chunks_split_across_every_byte_are_followed() {
        let s: &[u8] = b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                  a\r\n0123456789\r\n0\r\n\r\n\
                  GET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(follow(&bytes), vec![Head::Clean, Head::LengthAndChunked]);
    }

    #[test]
    fn body_that_looks_like_a_head_is_not_a_head() {
        let body = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let s = format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(follow(&[s.as_bytes()]), vec![Head::Clean]);
    }

    #[test]
    fn leading_empty_lines_and_bare_lf_heads_are_followed() {
        let s = b"\r\n\r\nGET /a HTTP/1.1\nHost: a\n\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(follow(&[s]), vec![Head::Clean; 2]);
    }

    #[test]
    fn framing_it_cannot_follow_loses_the_connection() {
        let bad_chunk = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(follow(&[bad_chunk]), vec![Head::Clean, Head::Lost]);
        let bad_head = b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n";
        assert_eq!(follow(&[bad_head]), vec![Head::Lost]);
        let gzip = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(follow(&[gzip]), vec![Head::Lost]);
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(follow(&[b"GET /", &huge]), vec![Head::Lost]);
    }

    #[test]
    fn chunk_size_overflow_loses_the_connection() {
        let s = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n";
        assert_eq!(follow(&[s]), vec![Head::Clean, Head::Lost]);
    }

    #[test]
    fn records_do_not_depend_on_how_reads_split_the_bytes() {
        let s: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            3;e\r\nabc\r\n0\r\nTrailer: x\r\n\r\n\
            GET /c HTTP/1.1\nHost: a\nContent-Length: 0\nTransfer-Encoding: chunked\n\n0\r\n\r\n";
        let whole = follow(&[s]);
        assert_eq!(
            whole,
            vec![Head::Clean, Head::Clean, Head::LengthAndChunked]
        );
        for size in 1..=s.len() {
            let pieces: Vec<&[u8]> = s.chunks(size).collect();
            assert_eq!(follow(&pieces), whole, "reads of {size} bytes");
        }
    }

    #[test]
    fn repeated_content_length_is_recorded() {
        let s = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(follow(&[s]), vec![Head::DuplicateLength]);
    }

    #[test]
    fn request_not_seen_is_lost() {
        assert_eq!(Heads::default().next(), Head::Lost);
    }
}
