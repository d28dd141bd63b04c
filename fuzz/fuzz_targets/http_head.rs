//! The HTTP request-head reader never panics, and a host it returns is already normalised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_egress::sniff;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(sniff::Sniffed::Http(host, _))) = sniff::sniff(data) {
        assert_eq!(moat_policy::normalize(&host).as_deref(), Ok(host.as_str()));
    }
});
