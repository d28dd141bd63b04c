//! The profile parser never panics on any text, and every rule it accepts is usable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(policy) = moat_policy::profile::parse(text) {
        for rule in &policy.rules {
            assert!(!rule.ports.is_empty());
            assert!(!rule.hosts.is_empty() || !rule.cidrs.is_empty());
            // A service exactly on corporate rules, which name hosts and no cidrs.
            let corporate = rule.action == moat_policy::Action::Corporate;
            assert_eq!(rule.service.is_some(), corporate);
            assert!(!corporate || (!rule.hosts.is_empty() && rule.cidrs.is_empty()));
        }
    }
});
