//! The profile parser never panics on any text, and every rule it accepts is usable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(policy) = moat_policy::profile::parse(text) {
        for rule in &policy.rules {
            assert!(!rule.ports.is_empty());
            assert!(!rule.hosts.is_empty() || !rule.cidrs.is_empty());
        }
    }
});
