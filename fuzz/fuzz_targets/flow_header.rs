//! The flow header decoder never panics, never claims more bytes than it was given, and
//! whatever it accepts (version 1, or version 2 with its program) re-encodes to exactly the
//! bytes it consumed; an accepted program is within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_flow_header::{FlowHeader, MAX_HEADER_LEN, MAX_PROGRAM_PATH_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, consumed))) = FlowHeader::decode(data) {
        assert!(consumed <= data.len() && consumed <= MAX_HEADER_LEN);
        assert_eq!(header.encode(), &data[..consumed]);
        assert_eq!(header.version(), data[3]);
        if let Some(program) = &header.program {
            let path = program.path().as_str();
            assert!(path.starts_with('/') && path.len() <= MAX_PROGRAM_PATH_LEN);
            assert!(!path.chars().any(char::is_control));
        }
    }
});
