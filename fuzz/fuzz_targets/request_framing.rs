//! The HTTP/1.1 framing follower of intercepted flows never panics, and what it records does
//! not depend on how the bytes were split into reads (TLS records, TCP segments).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat_egress::intercept::framing::{Framing, Heads};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size of the split run.
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = Arc::new(Heads::default());
    Framing::new(Arc::clone(&whole)).feed(bytes);
    let pieces = Arc::new(Heads::default());
    let mut f = Framing::new(Arc::clone(&pieces));
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        f.feed(chunk);
    }
    assert_eq!(whole.drain(), pieces.drain());
});
