//! The suite-wide secret scan. Every byte the guest side of any test receives (read through
//! the harness's streams: plaintext above the guest's TLS, raw flow bytes otherwise) and every
//! audit line any test proxy writes is captured in this process's sink; [`assert_no_leak`]
//! scans all of it for every secret value a test proxy was ever given, raw and as base64 (as
//! `Authorization: Basic` carries it). Each `TestProxy` runs the scan over the whole sink when
//! it is dropped, so the last test of a binary to finish has scanned everything the binary's
//! suite produced; tests/secret_scan.rs runs the attacks in sequence and scans explicitly.

use std::io::Write;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::SECRET_VALUE;

/// A value the rotation tests give the proxy.
pub const ROTATED_SECRET_VALUE: &str = "sk-real-ROTATED";

/// Every secret value test proxies are given.
pub const SECRET_VALUES: &[&str] = &[SECRET_VALUE, ROTATED_SECRET_VALUE];

/// What the guest side received, and what the audit logs hold, in this process so far.
static GUEST: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static AUDIT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn append(sink: &Mutex<Vec<u8>>, bytes: &[u8]) {
    match sink.lock() {
        Ok(mut s) => s.extend_from_slice(bytes),
        Err(poisoned) => poisoned.into_inner().extend_from_slice(bytes),
    }
}

/// Records bytes the guest side received.
pub fn record_guest(bytes: &[u8]) {
    append(&GUEST, bytes);
}

/// One place a secret value was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// Where: `guest` or `audit`.
    pub place: &'static str,
    /// Which secret value (by its index in the list scanned for; never the value itself).
    pub secret: usize,
    /// `raw` or `base64`.
    pub encoding: &'static str,
    /// Byte offset in that place's capture.
    pub offset: usize,
}

/// The base64 text `secret` turns into wherever it sits in a base64-encoded string: for each
/// of the three alignments, the characters that depend on the secret's bytes alone.
fn base64_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    (0..3)
        .map(|k| {
            let mut padded = vec![0u8; k];
            padded.extend_from_slice(secret);
            let enc = STANDARD_NO_PAD.encode(&padded).into_bytes();
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + secret.len())) / 6;
            enc[start..end.min(enc.len())].to_vec()
        })
        .collect()
}

/// Every occurrence in `haystack` of any of `secrets`, raw or base64-encoded.
pub fn scan(place: &'static str, haystack: &[u8], secrets: &[&str]) -> Vec<Leak> {
    let mut leaks = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let mut forms = vec![("raw", secret.as_bytes().to_vec())];
        forms.extend(
            base64_forms(secret.as_bytes())
                .into_iter()
                .map(|f| ("base64", f)),
        );
        for (encoding, needle) in forms {
            leaks.extend(
                memchr::memmem::find_iter(haystack, &needle).map(|offset| Leak {
                    place,
                    secret: i,
                    encoding,
                    offset,
                }),
            );
        }
    }
    leaks
}

/// Scans everything captured in this process so far for every secret value; panics naming
/// each leak (never the value).
pub fn assert_no_leak() {
    let guest = GUEST.lock().map(|g| g.clone()).unwrap_or_default();
    let audit = AUDIT.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(
        !audit.is_empty(),
        "the audit capture is empty: the scan would prove nothing"
    );
    let mut leaks = scan("guest", &guest, SECRET_VALUES);
    leaks.extend(scan("audit", &audit, SECRET_VALUES));
    assert!(
        leaks.is_empty(),
        "secret values found in what the suite's guests received or its audit logs \
         ({} guest bytes, {} audit bytes scanned): {leaks:?}",
        guest.len(),
        audit.len()
    );
}

/// Bytes captured so far: (guest, audit).
pub fn captured() -> (usize, usize) {
    let len = |m: &Mutex<Vec<u8>>| m.lock().map(|v| v.len()).unwrap_or(0);
    (len(&GUEST), len(&AUDIT))
}

/// An audit writer that writes each record to the proxy's file and to the sink.
pub struct TeeAudit(pub std::fs::File);

impl Write for TeeAudit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        append(&AUDIT, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The guest side of a stream: every byte read from it is captured.
#[derive(Debug)]
pub struct Tapped<S>(pub S);

impl<S> std::ops::Deref for Tapped<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S> std::ops::DerefMut for Tapped<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.get_mut().0).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            record_guest(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
