//! Secrets never come back: every response on an intercepted connection is scanned for every
//! secret injected into a request on that connection so far, in the forms an echo would
//! produce, and each hit is overwritten with the secret's placeholder before a byte of it
//! reaches the agent (an echo server, a TRACE-like `/headers` endpoint, an error page that
//! repeats the request). The status line's reason phrase, every header name and value, the
//! body and the trailers are scanned.
//!
//! Forms ([`Patterns::new`]), for each secret value:
//! - raw;
//! - percent-encoded: every byte (upper- and lower-case hex), and every byte outside the
//!   characters each common encoder leaves alone (RFC 3986 unreserved; JavaScript's
//!   `encodeURIComponent`; Python's `quote`, which keeps `/`; HTML forms and `quote_plus`,
//!   which write a space as `+`);
//! - JSON-escaped: `\"` and `\\` and control characters, with or without `\/`, with or without
//!   `<>&'` as `\u003c` (Go, and HTML-safe serialisers), `\u` in lower- or upper-case hex, and
//!   every character as `\uXXXX`;
//! - base64, standard and URL-safe alphabets, at each of the three byte alignments the secret
//!   can start at inside a longer encoded string (only the characters that depend on the
//!   secret's bytes alone: the partial characters at either edge mix in the neighbours'
//!   bits), raw, with `\/` (a JSON string) or percent-encoded (a URL).
//!
//! Replacement keeps every length: a hit is overwritten with the placeholder, cut or padded
//! with `*` to the secret's length and written in the hit's own form (so a base64 hit decodes
//! to the placeholder), cut at a whole escape and padded to the hit's length. The body's
//! length never changes, so `Content-Length`, `Content-Range` and HTTP/2's length checks stay
//! true, and nothing is buffered or re-framed.
//!
//! Streaming, bounded: a body is passed on frame by frame. Of each frame only the shortest
//! ending that could begin a hit is held back (at most the longest form less one byte) and
//! searched again with the next frame; text that cannot begin a hit (the end of a server-sent
//! event, usually) is passed on at once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use aho_corasick::{AhoCorasick, AhoCorasickKind, Match, MatchKind, packed};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

/// The shortest encoded form searched for (a raw value is always searched for): shorter ones,
/// from very short secrets, would match ordinary text.
const MIN_ENCODED_FORM: usize = 6;

/// Where in a response a secret was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// The status line's reason phrase or a header.
    Head,
    /// The body.
    Body,
    /// The trailers.
    Trailers,
}

impl Place {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Place::Head => "headers",
            Place::Body => "body",
            Place::Trailers => "trailers",
        }
    }
}

/// One secret injected on a connection: its name, value and placeholder.
pub(crate) struct Injected<'a> {
    pub(crate) name: &'a str,
    pub(crate) value: &'a [u8],
    pub(crate) placeholder: &'a [u8],
}

/// How a secret's bytes are laid out before they are escaped.
#[derive(Clone, Copy)]
enum Base {
    Raw,
    /// Base64 (URL-safe alphabet when `url`) of the secret preceded by `align` bytes.
    Base64 {
        url: bool,
        align: usize,
    },
}

impl Base {
    fn apply(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Base::Raw => bytes.to_vec(),
            Base::Base64 { url, align } => {
                let mut shifted = vec![0u8; align];
                shifted.extend_from_slice(bytes);
                let engine = if url {
                    &URL_SAFE_NO_PAD
                } else {
                    &STANDARD_NO_PAD
                };
                let enc = engine.encode(&shifted).into_bytes();
                // Characters wholly inside the secret's bits: from the first after the
                // `align` bytes' bits, to the last ending before the secret's end.
                let start = (8 * align).div_ceil(6);
                let end = (8 * (align + bytes.len())) / 6;
                enc.get(start..end).map_or_else(Vec::new, <[u8]>::to_vec)
            }
        }
    }

    /// The byte a replacement is padded with: valid wherever the form occurs.
    fn filler(self) -> u8 {
        match self {
            Base::Raw => b'*',
            Base::Base64 { .. } => b'A',
        }
    }
}

/// How each byte of a form is escaped.
#[derive(Clone, Copy)]
enum Escape {
    None,
    /// Percent-encoding of every byte not in `keep` (a space as `+` when `plus`).
    Percent {
        keep: &'static [u8],
        plus: bool,
        upper: bool,
        all: bool,
    },
    /// JSON string escaping.
    Json {
        slash: bool,
        html: bool,
        upper: bool,
        all: bool,
    },
}

const UNRESERVED: &[u8] = b"-._~";
const JS_COMPONENT: &[u8] = b"-_.!~*'()";
const PY_QUOTE: &[u8] = b"-._~/";
const FORM: &[u8] = b"*-._";
const QUOTE_PLUS: &[u8] = b"-._~";

fn hex(out: &mut Vec<u8>, b: u8, upper: bool) {
    let digits = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    out.push(digits[usize::from(b >> 4)]);
    out.push(digits[usize::from(b & 0xf)]);
}

impl Escape {
    /// Appends the escaped form of `b`.
    fn unit(self, b: u8, out: &mut Vec<u8>) {
        match self {
            Escape::None => out.push(b),
            Escape::Percent {
                keep,
                plus,
                upper,
                all,
            } => {
                if !all && (b.is_ascii_alphanumeric() || keep.contains(&b)) {
                    out.push(b);
                } else if plus && b == b' ' {
                    out.push(b'+');
                } else {
                    out.push(b'%');
                    hex(out, b, upper);
                }
            }
            Escape::Json {
                slash,
                html,
                upper,
                all,
            } => {
                let u = |out: &mut Vec<u8>| {
                    out.extend_from_slice(b"\\u00");
                    hex(out, b, upper);
                };
                match b {
                    _ if all => u(out),
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'/' if slash => out.extend_from_slice(b"\\/"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'<' | b'>' | b'&' | b'\'' if html => u(out),
                    0..0x20 | 0x7f => u(out),
                    _ => out.push(b),
                }
            }
        }
    }

    fn apply(self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            self.unit(b, &mut out);
        }
        out
    }

    /// The escaped form of `bytes` cut at a whole escape to at most `len` bytes and padded with
    /// `filler` to exactly `len`.
    fn fit(self, bytes: &[u8], len: usize, filler: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut unit = Vec::with_capacity(6);
        for &b in bytes {
            unit.clear();
            self.unit(b, &mut unit);
            if out.len() + unit.len() > len {
                break;
            }
            out.extend_from_slice(&unit);
        }
        out.resize(len, filler);
        out
    }
}

/// Every escape a form of each base is searched under.
fn escapes(base: Base) -> Vec<Escape> {
    let mut all = vec![Escape::None];
    match base {
        Base::Raw => {
            for upper in [true, false] {
                all.push(Escape::Percent {
                    keep: b"",
                    plus: false,
                    upper,
                    all: true,
                });
                for (keep, plus) in [
                    (UNRESERVED, false),
                    (JS_COMPONENT, false),
                    (PY_QUOTE, false),
                    (FORM, true),
                    (QUOTE_PLUS, true),
                ] {
                    all.push(Escape::Percent {
                        keep,
                        plus,
                        upper,
                        all: false,
                    });
                }
                all.push(Escape::Json {
                    slash: false,
                    html: false,
                    upper,
                    all: true,
                });
                for slash in [false, true] {
                    for html in [false, true] {
                        all.push(Escape::Json {
                            slash,
                            html,
                            upper,
                            all: false,
                        });
                    }
                }
            }
        }
        Base::Base64 { .. } => {
            all.push(Escape::Json {
                slash: true,
                html: false,
                upper: false,
                all: false,
            });
            for upper in [true, false] {
                all.push(Escape::Percent {
                    keep: UNRESERVED,
                    plus: false,
                    upper,
                    all: false,
                });
            }
        }
    }
    all
}

/// The secret's byte length, filled from the placeholder: cut, or padded with `*`.
fn fitted_placeholder(placeholder: &[u8], len: usize) -> Vec<u8> {
    let mut p = placeholder[..placeholder.len().min(len)].to_vec();
    p.resize(len, b'*');
    p
}

/// Error building the search: the forms of the connection's secrets are too many or too long
/// for the automaton (not expected: a handful of secrets give a few dozen short forms).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the search for reflected secrets")]
pub(crate) struct BuildError(#[source] aho_corasick::BuildError);

/// The forms of the secrets injected on one connection, compiled for search, with their
/// replacements.
pub(crate) struct Patterns {
    search: Search,
    forms: Vec<Vec<u8>>,
    /// The replacement of each form, of the same length.
    replacements: Vec<Vec<u8>>,
    /// The secret (index into `names`) each form belongs to.
    secret_of: Vec<usize>,
    names: Vec<String>,
    /// Forms by their first byte, for finding what could begin a form at a frame's end.
    by_first: Vec<Vec<u32>>,
    longest: usize,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the forms: they are the secrets.
        f.debug_struct("Patterns")
            .field("secrets", &self.names)
            .field("forms", &self.forms.len())
            .finish()
    }
}

/// The search over every form at once. Teddy (`packed`, SIMD) where the CPU has it and the
/// forms are few enough: measured on JSON-like text, 13 GB/s, where the automaton with its
/// default prefilter ran at 140 MB/s (its start-byte and rare-byte prefilters stop at every
/// `%`, `\\` and letter the forms begin with) and without one at 550 MB/s, the fallback.
enum Search {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

impl Search {
    fn new(forms: &[Vec<u8>]) -> Result<Search, BuildError> {
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostLongest)
            .builder()
            .extend(forms)
            .build();
        if let Some(searcher) = packed {
            return Ok(Search::Packed(searcher));
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .kind(Some(AhoCorasickKind::DFA))
            .prefilter(false)
            .build(forms)
            .map_err(BuildError)?;
        Ok(Search::Automaton(ac))
    }

    /// Every match, leftmost-longest, not overlapping, in order.
    fn find_all(&self, haystack: &[u8]) -> Vec<Match> {
        match self {
            Search::Packed(s) => s.find_iter(haystack).collect(),
            Search::Automaton(ac) => ac.find_iter(haystack).collect(),
        }
    }

    fn is_match(&self, haystack: &[u8]) -> bool {
        match self {
            Search::Packed(s) => s.find(haystack).is_some(),
            Search::Automaton(ac) => ac.is_match(haystack),
        }
    }
}

impl Patterns {
    /// Every form of every secret in `injected`.
    pub(crate) fn new(injected: &[Injected<'_>]) -> Result<Patterns, BuildError> {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        let mut replacements = Vec::new();
        let mut secret_of = Vec::new();
        let mut bases = vec![Base::Raw];
        for url in [false, true] {
            for align in 0..3 {
                bases.push(Base::Base64 { url, align });
            }
        }
        for (i, secret) in injected.iter().enumerate() {
            let fitted = fitted_placeholder(secret.placeholder, secret.value.len());
            for &base in &bases {
                let (laid, laid_fill) = (base.apply(secret.value), base.apply(&fitted));
                for escape in escapes(base) {
                    let form = escape.apply(&laid);
                    let raw = matches!((base, escape), (Base::Raw, Escape::None));
                    if form.is_empty()
                        || (!raw && form.len() < MIN_ENCODED_FORM)
                        || forms.contains(&form)
                    {
                        continue;
                    }
                    replacements.push(escape.fit(&laid_fill, form.len(), base.filler()));
                    forms.push(form);
                    secret_of.push(i);
                }
            }
        }
        let search = Search::new(&forms)?;
        let mut by_first = vec![Vec::new(); 256];
        for (id, form) in forms.iter().enumerate() {
            if let (Some(&b), Ok(id)) = (form.first(), u32::try_from(id)) {
                by_first[usize::from(b)].push(id);
            }
        }
        let longest = forms.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Patterns {
            search,
            forms,
            replacements,
            secret_of,
            names: injected.iter().map(|s| s.name.to_owned()).collect(),
            by_first,
            longest,
        })
    }

    /// Overwrites every form in `bytes`, telling `hit` the secret of each. True if any.
    fn replace_all(&self, bytes: &mut [u8], mut hit: impl FnMut(usize)) -> bool {
        let found = self.search.find_all(bytes);
        for m in &found {
            bytes[m.range()].copy_from_slice(&self.replacements[m.pattern().as_usize()]);
            hit(self.secret_of[m.pattern().as_usize()]);
        }
        !found.is_empty()
    }

    /// Where the bytes that must wait for the next frame begin: the first position in the last
    /// `longest - 1` bytes of `buf` from which the rest is a proper prefix of a form, outside
    /// every match in `found` (a match starting there waits too: a longer form may complete it).
    fn hold_from(&self, buf: &[u8], found: &[Match]) -> usize {
        let start = buf.len().saturating_sub(self.longest.saturating_sub(1));
        let mut m = found.iter().peekable();
        for i in start..buf.len() {
            while m.next_if(|m| m.end() <= i).is_some() {}
            if m.peek().is_some_and(|m| m.start() < i) {
                continue;
            }
            let rest = &buf[i..];
            let could_begin = self.by_first[usize::from(buf[i])].iter().any(|&id| {
                let form = &self.forms[id as usize];
                form.len() > rest.len() && form.starts_with(rest)
            });
            if could_begin {
                return i;
            }
        }
        buf.len()
    }
}

/// Called on a secret's first hit in a response, with its name and where it was.
pub(crate) type Alert = Box<dyn Fn(&str, Place) + Send + Sync>;

/// The secrets found in one response, with their counts; `alert` is called on each secret's
/// first hit (it writes the `secret_reflected` record).
pub(crate) struct Reflections {
    names: Vec<String>,
    counts: Mutex<Vec<u64>>,
    alert: Alert,
}

impl Reflections {
    pub(crate) fn new(patterns: &Patterns, alert: Alert) -> Self {
        Reflections {
            names: patterns.names.clone(),
            counts: Mutex::new(vec![0; patterns.names.len()]),
            alert,
        }
    }

    fn hit(&self, secret: usize, place: Place) {
        let first = {
            let mut counts = match self.counts.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            match counts.get_mut(secret) {
                Some(c) => {
                    *c += 1;
                    *c == 1
                }
                None => false,
            }
        };
        // Outside the lock: the alert writes an audit record.
        if first && let Some(name) = self.names.get(secret) {
            (self.alert)(name, place);
        }
    }

    /// Each secret found, with how many times.
    pub(crate) fn counts(&self) -> Vec<(String, u64)> {
        let counts = match self.counts.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        self.names
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| (name.clone(), n))
            .collect()
    }
}

/// Overwrites every form found in the names and values of `headers`.
pub(crate) fn scan_headers(
    patterns: &Patterns,
    headers: &mut HeaderMap,
    found: &Reflections,
    place: Place,
) {
    let hit = |secret| found.hit(secret, place);
    for value in headers.values_mut() {
        // Searched in place; copied only to be corrected.
        if !patterns.search.is_match(value.as_bytes()) {
            continue;
        }
        let mut bytes = value.as_bytes().to_vec();
        if patterns.replace_all(&mut bytes, hit) {
            // A replacement is visible ASCII, as valid in a header as what it replaced.
            *value = HeaderValue::from_bytes(&bytes)
                .unwrap_or_else(|_| HeaderValue::from_static("[moat: secret removed]"));
        }
    }
    let renamed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| patterns.search.is_match(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in renamed {
        let mut bytes = name.as_str().as_bytes().to_vec();
        patterns.replace_all(&mut bytes, hit);
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        headers.remove(&name);
        // A replacement's `*` is a token character; a name that still does not parse is
        // dropped with its values.
        if let Ok(new) = HeaderName::from_bytes(&bytes) {
            for v in values {
                headers.append(new.clone(), v);
            }
        }
    }
}

/// The reason phrase of an HTTP/1.1 status line, scanned like a header value; `None` when the
/// phrase must be dropped (hyper then writes the canonical one).
pub(crate) fn scan_reason(
    patterns: &Patterns,
    reason: &hyper::ext::ReasonPhrase,
    found: &Reflections,
) -> Option<hyper::ext::ReasonPhrase> {
    if !patterns.search.is_match(reason.as_bytes()) {
        return Some(reason.clone());
    }
    let mut bytes = reason.as_bytes().to_vec();
    if !patterns.replace_all(&mut bytes, |s| found.hit(s, Place::Head)) {
        return Some(reason.clone());
    }
    hyper::ext::ReasonPhrase::try_from(bytes).ok()
}

/// The streaming search of one body.
struct Scanner {
    patterns: Arc<Patterns>,
    found: Arc<Reflections>,
    /// Bytes held back: they could begin a form the next frame completes.
    tail: Vec<u8>,
}

impl Scanner {
    /// Takes the next frame's data; returns what may be passed on now (possibly nothing).
    fn push(&mut self, data: Bytes) -> Bytes {
        let buf = if self.tail.is_empty() {
            data
        } else {
            let mut joined = BytesMut::with_capacity(self.tail.len() + data.len());
            joined.extend_from_slice(&self.tail);
            joined.extend_from_slice(&data);
            self.tail.clear();
            joined.freeze()
        };
        let p = &self.patterns;
        let found = p.search.find_all(&buf);
        let hold = p.hold_from(&buf, &found);
        self.tail.extend_from_slice(&buf[hold..]);
        let ready = found.iter().take_while(|m| m.end() <= hold).count();
        if ready == 0 {
            // The usual case: nothing to replace, no copy.
            return buf.slice(..hold);
        }
        let mut out = BytesMut::from(&buf[..hold]);
        for m in &found[..ready] {
            out[m.range()].copy_from_slice(&p.replacements[m.pattern().as_usize()]);
            self.found
                .hit(p.secret_of[m.pattern().as_usize()], Place::Body);
        }
        out.freeze()
    }

    /// The body ended: what was held back, every form in it replaced.
    fn finish(&mut self) -> Bytes {
        let mut rest = std::mem::take(&mut self.tail);
        let found = &self.found;
        self.patterns
            .replace_all(&mut rest, |s| found.hit(s, Place::Body));
        Bytes::from(rest)
    }
}

/// A response body passed on with every reflected secret replaced (passed through untouched
/// when the connection injected nothing).
pub(crate) struct ReflectBody<B> {
    inner: B,
    scanner: Option<Scanner>,
    /// A frame to pass on after the held-back bytes (the trailers), or the end.
    next: Option<Option<Frame<Bytes>>>,
}

impl<B> ReflectBody<B> {
    pub(crate) fn new(inner: B, scan: Option<(Arc<Patterns>, Arc<Reflections>)>) -> Self {
        ReflectBody {
            inner,
            scanner: scan.map(|(patterns, found)| Scanner {
                patterns,
                found,
                tail: Vec::new(),
            }),
            next: None,
        }
    }
}

impl<B> Body for ReflectBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(next) = this.next.take() {
            // Stays at the end once there.
            if next.is_none() {
                this.next = Some(None);
            }
            return Poll::Ready(next.map(Ok));
        }
        let Some(scanner) = this.scanner.as_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let rest = scanner.finish();
                    if rest.is_empty() {
                        this.next = Some(None);
                        return Poll::Ready(None);
                    }
                    this.next = Some(None);
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let out = scanner.push(data);
                    if out.is_empty() {
                        // All held back: wait for more.
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Err(frame) => frame,
            };
            // Trailers end the body: the held-back bytes go first.
            let frame = match frame.into_trailers() {
                Ok(mut trailers) => {
                    scan_headers(
                        &scanner.patterns,
                        &mut trailers,
                        &scanner.found,
                        Place::Trailers,
                    );
                    Frame::trailers(trailers)
                }
                Err(other) => other,
            };
            let rest = scanner.finish();
            if rest.is_empty() {
                return Poll::Ready(Some(Ok(frame)));
            }
            this.next = Some(Some(frame));
            return Poll::Ready(Some(Ok(Frame::data(rest))));
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.next {
            Some(next) => next.is_none(),
            None => {
                self.inner.is_end_stream()
                    && self.scanner.as_ref().is_none_or(|s| s.tail.is_empty())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Replacement keeps lengths: what is left is what the upstream has left plus what is
        // held back.
        let held = self.scanner.as_ref().map_or(0, |s| s.tail.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    const SECRET: &str = "sk-real-SECRET/4f9a+1c";
    const PLACEHOLDER: &str = "sk-moat-placeholder-api";

    fn patterns() -> Arc<Patterns> {
        Arc::new(
            Patterns::new(&[Injected {
                name: "api",
                value: SECRET.as_bytes(),
                placeholder: PLACEHOLDER.as_bytes(),
            }])
            .unwrap(),
        )
    }

    fn tally(p: &Patterns) -> (Arc<Reflections>, Arc<Mutex<Vec<String>>>) {
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let a = Arc::clone(&alerts);
        let found = Reflections::new(
            p,
            Box::new(move |name, place| {
                a.lock().unwrap().push(format!("{name} {}", place.as_str()))
            }),
        );
        (Arc::new(found), alerts)
    }

    /// Feeds `frames` through a scanner; returns what came out, joined.
    fn stream(frames: &[&[u8]]) -> (Vec<u8>, Vec<(String, u64)>) {
        let p = patterns();
        let (found, _) = tally(&p);
        let mut s = Scanner {
            patterns: p,
            found: Arc::clone(&found),
            tail: Vec::new(),
        };
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(f)));
            assert!(s.tail.len() < s.patterns.longest, "bounded");
        }
        out.extend_from_slice(&s.finish());
        (out, found.counts())
    }

    fn scanned(text: &[u8]) -> Vec<u8> {
        let (out, _) = stream(&[text]);
        assert_eq!(out.len(), text.len(), "lengths are kept");
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn raw_secret_is_replaced_by_the_placeholder_cut_to_its_length() {
        let out = scanned(format!("token={SECRET}&x=1").as_bytes());
        assert_eq!(out, b"token=sk-moat-placeholder-ap&x=1");
    }

    #[test]
    fn a_shorter_placeholder_is_padded() {
        let p = Patterns::new(&[Injected {
            name: "t",
            value: b"0123456789abcdef",
            placeholder: b"ph-t",
        }])
        .unwrap();
        let mut b = b"[0123456789abcdef]".to_vec();
        assert!(p.replace_all(&mut b, |_| {}));
        assert_eq!(b, b"[ph-t************]");
    }

    #[test]
    fn base64_at_every_alignment_and_in_both_alphabets_is_replaced() {
        for prefix in ["", "u:", "us:", "use:"] {
            for engine in [&STANDARD, &base64::engine::general_purpose::URL_SAFE] {
                let encoded = engine.encode(format!("{prefix}{SECRET}"));
                let out = scanned(encoded.as_bytes());
                assert_ne!(out, encoded.as_bytes(), "{prefix:?}");
                // Decoding what the agent gets never yields the secret.
                let decoded = engine.decode(&out).unwrap_or_default();
                assert!(!contains(&decoded, SECRET.as_bytes()), "{prefix:?}");
                assert!(!contains(&decoded, &SECRET.as_bytes()[2..20]), "{prefix:?}");
            }
        }
    }

    #[test]
    fn a_base64_hit_decodes_to_the_placeholder() {
        let out = scanned(STANDARD.encode(SECRET).as_bytes());
        let decoded = STANDARD.decode(&out).unwrap();
        assert!(decoded.starts_with(b"sk-moat-placeholder-"), "{decoded:?}");
    }

    #[test]
    fn percent_encoded_forms_are_replaced() {
        let all_upper: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let all_lower: String = SECRET.bytes().map(|b| format!("%{b:02x}")).collect();
        let reserved = SECRET.replace('/', "%2F").replace('+', "%2B");
        let reserved_lower = SECRET.replace('/', "%2f").replace('+', "%2b");
        let keep_slash = SECRET.replace('+', "%2B");
        for form in [all_upper, all_lower, reserved, reserved_lower, keep_slash] {
            let out = scanned(format!("GET /cb?t={form} HTTP/1.1").as_bytes());
            assert!(
                !contains(&out, form.as_bytes()),
                "{}",
                String::from_utf8_lossy(&out)
            );
            // Decoded, it is the placeholder.
            let decoded = percent_decode(&out);
            assert!(
                decoded.starts_with(b"GET /cb?t=sk-moat-placeholder-ap"),
                "{}",
                String::from_utf8_lossy(&decoded)
            );
        }
    }

    fn percent_decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            if s[i] == b'%' {
                let h = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(h, 16).unwrap());
                i += 3;
            } else {
                out.push(s[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn json_escaped_forms_are_replaced() {
        let slash = SECRET.replace('/', "\\/");
        let every: String = SECRET.bytes().map(|b| format!("\\u{b:04x}")).collect();
        let every_upper: String = SECRET.bytes().map(|b| format!("\\u{b:04X}")).collect();
        let serde = serde_json::to_string(SECRET)
            .unwrap()
            .trim_matches('"')
            .to_owned();
        for form in [slash, every, every_upper, serde] {
            let text = format!("{{\"headers\":{{\"Authorization\":\"Bearer {form}\"}}}}");
            let out = scanned(text.as_bytes());
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let auth = v["headers"]["Authorization"].as_str().unwrap();
            assert!(auth.starts_with("Bearer sk-moat-placeholder-"), "{auth}");
            assert!(!auth.contains(SECRET), "{auth}");
        }
    }

    #[test]
    fn html_safe_json_escapes_are_replaced_and_the_json_stays_valid() {
        let secret = "a<b>&'c\"d\\e\tf";
        let p = Patterns::new(&[Injected {
            name: "t",
            value: secret.as_bytes(),
            placeholder: b"ph\"<\\x",
        }])
        .unwrap();
        let go = "a\\u003cb\\u003e\\u0026\\u0027c\\\"d\\\\e\\tf";
        let mut text = format!("{{\"k\":\"{go}\"}}").into_bytes();
        assert!(p.replace_all(&mut text, |_| {}));
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert!(v["k"].as_str().unwrap().starts_with("ph\"<\\x"), "{v}");
    }

    #[test]
    fn a_secret_split_across_frames_is_replaced() {
        let text = format!("data: {SECRET}\n\n");
        for cut in 1..text.len() {
            let (a, b) = text.as_bytes().split_at(cut);
            let (out, counts) = stream(&[a, b]);
            assert_eq!(out, b"data: sk-moat-placeholder-ap\n\n", "cut at {cut}");
            assert_eq!(counts, vec![("api".to_owned(), 1)]);
        }
    }

    #[test]
    fn one_byte_frames_keep_the_held_back_bytes_bounded() {
        let text = format!("noise {} {SECRET} end", STANDARD.encode(SECRET));
        let frames: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let (out, counts) = stream(&frames);
        assert!(!contains(&out, SECRET.as_bytes()));
        assert_eq!(counts, vec![("api".to_owned(), 2)]);
    }

    #[test]
    fn text_that_cannot_begin_a_form_is_passed_on_at_once() {
        let p = patterns();
        let (found, _) = tally(&p);
        let mut s = Scanner {
            patterns: p,
            found,
            tail: Vec::new(),
        };
        assert_eq!(
            &s.push(Bytes::from_static(b"data: 1\n\n"))[..],
            b"data: 1\n\n"
        );
        // A frame ending in what could begin the secret holds that much back.
        assert_eq!(&s.push(Bytes::from_static(b"data: sk-re"))[..], b"data: ");
        assert_eq!(&s.push(Bytes::from_static(b"ad\n\n"))[..], b"sk-read\n\n");
    }

    #[test]
    fn header_names_and_values_are_replaced_and_the_first_hit_alerts_once() {
        let p = Patterns::new(&[
            Injected {
                name: "api",
                value: SECRET.as_bytes(),
                placeholder: PLACEHOLDER.as_bytes(),
            },
            Injected {
                name: "lower",
                value: b"sk-real-secret",
                placeholder: b"sk-moat-placeholder-lower",
            },
        ])
        .unwrap();
        let (found, alerts) = tally(&p);
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            format!("https://x.test/?k={SECRET}").parse().unwrap(),
        );
        h.insert("set-cookie", format!("s={SECRET}").parse().unwrap());
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert(
            HeaderName::from_bytes(b"x-sk-real-secret").unwrap(),
            "1".parse().unwrap(),
        );
        scan_headers(&p, &mut h, &found, Place::Head);
        let text = format!("{h:?}");
        assert!(
            !text.contains(SECRET) && !text.contains("sk-real-secret"),
            "{text}"
        );
        assert_eq!(h["set-cookie"], "s=sk-moat-placeholder-ap");
        assert_eq!(h["x-sk-moat-placeh"], "1");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(
            found.counts(),
            vec![("api".to_owned(), 2), ("lower".to_owned(), 1)]
        );
        assert_eq!(
            *alerts.lock().unwrap(),
            vec!["api headers".to_owned(), "lower headers".to_owned()]
        );
    }

    #[test]
    fn the_automaton_fallback_finds_what_teddy_finds() {
        let p = patterns();
        let text = format!(
            "a {SECRET} b {} c %73%6B{}",
            STANDARD.encode(SECRET),
            SECRET.replace('/', "\\/")
        );
        let fallback = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&p.forms)
            .unwrap();
        let want: Vec<_> = fallback.find_iter(text.as_bytes()).collect();
        let automaton = Search::Automaton(fallback);
        assert_eq!(p.search.find_all(text.as_bytes()), want);
        assert_eq!(automaton.find_all(text.as_bytes()), want);
        assert_eq!(want.len(), 3);
    }

    #[test]
    fn nothing_else_is_touched() {
        let text = b"sk-real-SECRET/4f9a+1 sk-moat sk-real-SECRET/4f9a+1d %73%6b plain";
        assert_eq!(scanned(text), text);
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// What the scan adds to one small response, in process (the bench's CPU ticks are 10 ms
    /// wide): `cargo test --release -p moat-egress --lib per_response -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, run by hand"]
    fn per_response() {
        let p = Arc::new(
            Patterns::new(&[Injected {
                name: "bench",
                value: b"bench-secret-value-0123456789abcdef",
                placeholder: b"sk-moat-placeholder-bench",
            }])
            .unwrap(),
        );
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("server", "nginx/1.22.1"),
            ("date", "Sun, 06 Dec 2026 11:40:03 GMT"),
            ("content-type", "text/plain"),
            ("content-length", "3"),
            ("connection", "keep-alive"),
        ] {
            headers.insert(n, v.parse().unwrap());
        }
        let rounds = 200_000u32;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let found = Arc::new(Reflections::new(&p, Box::new(|_, _| {})));
            let mut h = headers.clone();
            scan_headers(&p, &mut h, &found, Place::Head);
            let mut s = Scanner {
                patterns: Arc::clone(&p),
                found,
                tail: Vec::new(),
            };
            std::hint::black_box(s.push(Bytes::from_static(b"ok\n")));
            std::hint::black_box(s.finish());
        }
        let with = t.elapsed() / rounds;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(headers.clone());
        }
        let clone = t.elapsed() / rounds;
        eprintln!("per response: {with:?} (of which the header map's clone {clone:?})");
    }
}
