//! The flow header decoder never panics, never claims more bytes than it was given, and
//! whatever it accepts re-encodes to exactly the bytes it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_flow_header::{FlowHeader, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, consumed))) = FlowHeader::decode(data) {
        assert!(consumed <= data.len() && consumed <= MAX_HEADER_LEN);
        assert_eq!(header.encode(), &data[..consumed]);
    }
});
