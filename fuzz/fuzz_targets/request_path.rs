//! The request-path normaliser (a secret's `paths` prefixes are matched against its output)
//! never panics, and what it returns is final: normalising it again changes nothing, it holds
//! no dot segment, no path parameter, no escape a second decoding could turn into a separator,
//! a dot or another escape, and only printable ASCII. So the upstream cannot read it as a path
//! outside the prefix it matched.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(norm) = moat_policy::normalize_path(path) else {
        return;
    };
    assert!(norm.starts_with('/'), "{norm:?}");
    assert_eq!(
        moat_policy::normalize_path(&norm).as_deref(),
        Ok(norm.as_str()),
        "not idempotent"
    );
    assert!(norm.bytes().all(|b| (0x21..0x7f).contains(&b)), "{norm:?}");
    assert!(!norm.contains(';') && !norm.contains('\\'), "{norm:?}");
    assert!(
        norm[1..].split('/').all(|s| s != "." && s != ".."),
        "dot segment left in {norm:?}"
    );
    let lower = norm.to_ascii_lowercase();
    for bad in ["%25", "%2f", "%5c", "%2e", "%3b"] {
        assert!(!lower.contains(bad), "{bad} left in {norm:?}");
    }
});
