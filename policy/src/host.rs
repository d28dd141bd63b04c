//! Hostname normalisation and host patterns.
//!
//! Every name the policy sees (rule patterns, flow hostnames, TLS SNI, HTTP Host) goes through
//! [`normalize`], so that case, a trailing dot and Unicode versus punycode spellings of one name
//! can never make two spellings of it disagree.

use std::fmt;

/// Why a name could not be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty, too long, bad characters, empty labels, or an invalid IDN.
    #[error("{0:?} is not a valid hostname")]
    Invalid(String),
    /// A wildcard anywhere but a whole leading `*.` label.
    #[error("{0:?} is not a valid host pattern: only a leading \"*.\" label may be a wildcard")]
    BadWildcard(String),
}

/// Normalises a hostname: IDN to ASCII (punycode, UTS 46), lowercase, one trailing dot removed.
/// Refuses IP literals' brackets, empty labels, and anything outside letters, digits, `-`, `.`.
pub fn normalize(name: &str) -> Result<String, HostError> {
    let invalid = || HostError::Invalid(name.to_owned());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(invalid());
    }
    let ascii = idna::domain_to_ascii_strict(trimmed).map_err(|_| invalid())?;
    let ok = !ascii.is_empty()
        && ascii.len() <= 253
        && ascii.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !ok {
        return Err(invalid());
    }
    Ok(ascii)
}

/// One host pattern of a rule: an exact name, or `*.suffix` matching any name strictly below
/// `suffix` (one or more labels; never `suffix` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches exactly this normalised name.
    Exact(String),
    /// Matches names ending in `.` + this normalised suffix.
    Suffix(String),
}

impl HostPattern {
    /// Parses and normalises a pattern as written in a profile.
    pub fn parse(pattern: &str) -> Result<Self, HostError> {
        if let Some(rest) = pattern.strip_prefix("*.") {
            if rest.contains('*') {
                return Err(HostError::BadWildcard(pattern.to_owned()));
            }
            let suffix = normalize(rest)?;
            // "*.com" style patterns are allowed but a bare TLD-wide wildcard is almost always a
            // mistake; we still require at least one dot-free label, which normalize ensures.
            return Ok(HostPattern::Suffix(suffix));
        }
        if pattern.contains('*') {
            return Err(HostError::BadWildcard(pattern.to_owned()));
        }
        Ok(HostPattern::Exact(normalize(pattern)?))
    }

    /// Does this pattern match `host`, which must already be normalised?
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_trailing_dot_normalise_to_one_name() {
        for spelling in ["Example.COM", "example.com.", "EXAMPLE.com.", "example.com"] {
            assert_eq!(normalize(spelling).unwrap(), "example.com", "{spelling}");
        }
    }

    #[test]
    fn unicode_and_punycode_normalise_to_one_name() {
        assert_eq!(
            normalize("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            normalize("XN--BCHER-KVA.example").unwrap(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            ".",
            "a..b",
            "exa mple.com",
            "a_b.com",
            "[::1]",
            "-a.com",
            "a-.com",
            "a/b",
            "..",
            "example.com..",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exact_pattern_matches_only_its_name() {
        let p = HostPattern::parse("GitHub.com").unwrap();
        assert!(p.matches("github.com"));
        assert!(!p.matches("api.github.com"));
        assert!(!p.matches("github.com.evil.test"));
        assert!(!p.matches("evilgithub.com"));
    }

    #[test]
    fn suffix_pattern_matches_names_strictly_below() {
        let p = HostPattern::parse("*.github.com").unwrap();
        assert!(p.matches("api.github.com"));
        assert!(p.matches("a.b.github.com"));
        assert!(!p.matches("github.com"));
        assert!(!p.matches("evilgithub.com"));
        assert!(!p.matches(".github.com"));
    }

    #[test]
    fn misplaced_wildcards_are_refused() {
        for bad in ["*github.com", "api.*.com", "*.*.com", "*", "a*.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
