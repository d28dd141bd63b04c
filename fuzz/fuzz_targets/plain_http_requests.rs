//! The checker of every request head of a plain-HTTP flow never panics; what it passes on does
//! not depend on how the bytes were split into reads; it is always a prefix of what the agent
//! sent (heads whole, in order); and, followed afresh, it passes whole: no refused head, and
//! no byte of one, ever leaves.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat_egress::sniff::requests::{Refusal, RequestChecker};

/// What the checker of a flow to `a.example:80` passes on, fed `reads` in turn, and whether
/// it refused.
fn check<'a>(reads: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, Result<(), Refusal>) {
    let mut checker = RequestChecker::new(Some("a.example"), 80, Arc::default());
    let mut out = Vec::new();
    for read in reads {
        if let Err(refusal) = checker.push(read, &mut out) {
            return (out, Err(refusal));
        }
    }
    (out, Ok(()))
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size of the split run.
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = check([bytes]);
    let pieces = check(bytes.chunks(usize::from(split).max(1)));
    assert_eq!(whole, pieces);
    assert!(bytes.starts_with(&whole.0));
    let again = check([whole.0.as_slice()]);
    assert_eq!(again.0, whole.0);
    assert!(again.1.is_ok(), "{:?}", again.1);
});
