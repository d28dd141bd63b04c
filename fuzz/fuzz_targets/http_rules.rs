//! HTTP rules' path patterns (`policy/src/http_rules.rs`) never panic, and never match outside
//! what they say: the input is a pattern, a newline and a raw request path. The path is
//! normalised first, as the proxy does; then a pattern without globs matches only itself, a
//! `<prefix>/**` pattern only `<prefix>` and what lies below it, a `*` never an empty segment,
//! and every match has a segment count the pattern allows.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((pattern, raw)) = text.split_once('\n') else {
        return;
    };
    let Ok(p) = moat_policy::PathPattern::parse(pattern) else {
        return;
    };
    assert_eq!(p.to_string(), pattern);
    let Ok(path) = moat_policy::normalize_path(raw) else {
        return;
    };
    if !p.matches(&path) {
        return;
    }
    let pat: Vec<&str> = pattern[1..].split('/').collect();
    let segs: Vec<&str> = path[1..].split('/').collect();
    if !pat.contains(&"**") {
        assert_eq!(pat.len(), segs.len(), "{pattern:?} matched {path:?}");
        for (p, s) in pat.iter().zip(&segs) {
            match *p {
                "*" => assert!(!s.is_empty(), "{pattern:?} matched {path:?}"),
                p => assert_eq!(p, *s, "{pattern:?} matched {path:?}"),
            }
        }
    } else {
        assert!(segs.len() + 1 >= pat.len(), "{pattern:?} matched {path:?}");
    }
    if let Some(prefix) = pattern.strip_suffix("/**")
        && !prefix.contains('*')
    {
        assert!(
            path == prefix || path.starts_with(&format!("{prefix}/")) || prefix.is_empty(),
            "{pattern:?} matched {path:?}"
        );
    }
});
