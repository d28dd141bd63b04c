//! The ClientHello/SNI reader never panics, and a name it returns is already normalised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_egress::sniff::tls;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(hello)) = tls::parse(data)
        && let Some(name) = hello.server_name
    {
        assert_eq!(moat_policy::normalize(&name).as_deref(), Ok(name.as_str()));
    }
});
