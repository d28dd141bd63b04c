//! Placeholders in request bodies. A body is streamed, never buffered whole, so a placeholder
//! can arrive split across reads, chunks or frames: the scanner keeps the last few bytes of
//! each frame (one less than the longest placeholder) and searches them together with the
//! next frame. A frame that completes a placeholder not bound to the request is never
//! forwarded: the body fails instead, which aborts the upstream request before it is whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::secrets::{Secrets, contains};

/// The error a body fails with when it carries a misplaced placeholder.
#[derive(Debug, thiserror::Error)]
#[error("request body carries the placeholder of secret {0:?}, which is not bound to it")]
pub(crate) struct PlaceholderInBody(pub(crate) String);

/// Reports a placeholder found after the handler stopped looking (the secret's name).
pub(crate) type Late = Box<dyn FnOnce(&str) + Send>;

/// What the scanner found, shared with the request handler. Until the handler has the
/// upstream's answer it looks here itself and refuses the request; from then on
/// ([`Finding::look_or_report_later`]) a placeholder found is reported through the handler's
/// [`Late`] callback, so a body refused after the upstream answered is audited too.
#[derive(Default)]
pub(crate) struct Finding {
    state: Mutex<(Option<String>, Option<Late>)>,
}

impl Finding {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<String>, Option<Late>)> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The secret whose placeholder was found so far, if any.
    pub(crate) fn name(&self) -> Option<String> {
        self.lock().0.clone()
    }

    /// The secret whose placeholder was found so far; if none, `late` is called with the
    /// name of the first one found from now on. One step, so nothing is found in between.
    pub(crate) fn look_or_report_later(&self, late: Late) -> Option<String> {
        let mut state = self.lock();
        match &state.0 {
            Some(name) => Some(name.clone()),
            None => {
                state.1 = Some(late);
                None
            }
        }
    }

    fn found(&self, name: &str) {
        let late = {
            let mut state = self.lock();
            if state.0.is_some() {
                return;
            }
            state.0 = Some(name.to_owned());
            state.1.take()
        };
        // Outside the lock: the report writes an audit record.
        if let Some(late) = late {
            late(name);
        }
    }
}

/// Where a refusal is reported back to the request handler.
pub(crate) type Found = Arc<Finding>;

/// A request body that refuses to carry placeholders not bound to its request.
pub(crate) struct ScanBody<B> {
    inner: B,
    /// Placeholders that must not pass, with their secrets' names.
    refused: Vec<(Vec<u8>, String)>,
    keep: usize,
    tail: Vec<u8>,
    found: Found,
    /// Body bytes passed on so far.
    sent: Arc<AtomicU64>,
}

impl<B> ScanBody<B> {
    /// Wraps `inner`, refusing every placeholder of `secrets` whose secret `bound` rejects.
    pub(crate) fn new(
        inner: B,
        secrets: &Secrets,
        bound: impl Fn(&moat_policy::SecretSpec) -> bool,
        found: Found,
        sent: Arc<AtomicU64>,
    ) -> Self {
        let refused: Vec<(Vec<u8>, String)> = secrets
            .iter()
            .filter(|(spec, _)| !bound(spec))
            .map(|(spec, _)| (spec.placeholder.as_bytes().to_vec(), spec.name.clone()))
            .collect();
        let keep = refused
            .iter()
            .map(|(p, _)| p.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        ScanBody {
            inner,
            refused,
            keep,
            tail: Vec::new(),
            found,
            sent,
        }
    }

    /// Scans the next `data` of the body. Only what can hold a placeholder split at the frame
    /// boundary is copied: the kept tail (at most `keep` bytes) and as much of `data`; the
    /// frame itself is searched in place.
    fn check(&mut self, data: &[u8]) -> Result<(), PlaceholderInBody> {
        if self.refused.is_empty() {
            return Ok(());
        }
        let head = &data[..data.len().min(self.keep)];
        self.tail.extend_from_slice(head);
        let found = self
            .refused
            .iter()
            .find(|(p, _)| contains(&self.tail, p) || contains(data, p));
        if let Some((_, name)) = found {
            self.found.found(name);
            return Err(PlaceholderInBody(name.clone()));
        }
        // Keep the last `keep` bytes of the body so far.
        if data.len() >= self.keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - self.keep..]);
        } else {
            let excess = self.tail.len().saturating_sub(self.keep);
            self.tail.drain(..excess);
        }
        Ok(())
    }
}

impl<B> Body for ScanBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.check(data)?;
                    this.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                } else if let Some(trailers) = frame.trailers_ref() {
                    for (name, value) in trailers {
                        this.tail.clear();
                        this.check(name.as_str().as_bytes())?;
                        this.tail.clear();
                        this.check(value.as_bytes())?;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    fn scanner(bound: bool) -> ScanBody<Empty<Bytes>> {
        let text = r#"
version = 1
name = "t"
[[secrets]]
name = "api"
source = { command = ["printf", "sk-real"] }
placeholder = "sk-moat-placeholder-api"
hosts = ["api.test"]
presentation = "x_api_key"
"#;
        let secrets = Secrets::load(&moat_policy::profile::parse(text).unwrap().secrets).unwrap();
        ScanBody::new(
            Empty::new(),
            &secrets,
            |_| bound,
            Found::default(),
            Arc::default(),
        )
    }

    #[test]
    fn placeholder_split_across_frames_is_found() {
        let mut s = scanner(false);
        assert!(s.check(b"{\"key\": \"sk-moat-pla").is_ok());
        assert!(s.check(b"c").is_ok());
        assert!(s.check(b"eholder-api\"}").is_err());
        assert_eq!(s.found.name().as_deref(), Some("api"));
    }

    #[test]
    fn placeholder_found_after_the_handler_looked_is_reported_once() {
        let mut s = scanner(false);
        let reported = Arc::new(Mutex::new(Vec::new()));
        let r = Arc::clone(&reported);
        let late: Late = Box::new(move |name| r.lock().unwrap().push(name.to_owned()));
        assert_eq!(s.found.look_or_report_later(late), None);
        assert!(s.check(b"sk-moat-placeholder-api").is_err());
        assert!(s.check(b"sk-moat-placeholder-api").is_err());
        assert_eq!(*reported.lock().unwrap(), vec!["api".to_owned()]);
    }

    #[test]
    fn body_without_placeholder_passes() {
        let mut s = scanner(false);
        assert!(s.check(b"sk-moat-placeholder-ap").is_ok());
        assert!(s.check(b"I").is_ok());
    }

    #[test]
    fn placeholder_inside_a_large_frame_is_found() {
        let mut s = scanner(false);
        let mut frame = vec![b'x'; 64 * 1024];
        frame[40_000..40_023].copy_from_slice(b"sk-moat-placeholder-api");
        assert!(s.check(b"prefix").is_ok());
        assert!(s.check(&frame).is_err());
    }

    #[test]
    fn placeholder_split_after_many_one_byte_frames_is_found() {
        let mut s = scanner(false);
        for b in b"noise sk-moat-placeholder-a" {
            assert!(s.check(&[*b]).is_ok());
        }
        assert!(s.tail.len() <= s.keep);
        assert!(s.check(b"pi").is_err());
    }

    #[test]
    fn bound_placeholder_is_not_refused() {
        let mut s = scanner(true);
        assert!(s.check(b"sk-moat-placeholder-api").is_ok());
    }
}
