//! Request paths normalised once, before a secret's `paths` prefix is matched against them.
//!
//! A prefix match on the raw target can be walked around: the proxy and the upstream must
//! agree on which path a request names, and upstreams disagree with each other. So the path is
//! brought to one form that every reasonable upstream reads the same way, and anything whose
//! reading depends on the upstream is refused rather than guessed:
//!
//! - percent-encoded unreserved characters (RFC 3986 2.3: letters, digits, `-._~`) are decoded,
//!   once; other escapes are kept, with upper-case hex digits (RFC 3986 6.2.2.1);
//! - dot segments are removed (RFC 3986 5.2.4), after that decoding, so `%2e%2e` counts as `..`;
//! - refused: `;` (path parameters: Tomcat and Spring read `/v1/..;/admin` as `/admin`), `%25`
//!   (a second decoding by the upstream would make `%252e` a dot), `%2f` and `%5c` (an encoded
//!   separator some upstreams split on), `\`, `%3b`, any byte outside printable ASCII, raw or
//!   encoded (overlong UTF-8 such as `%c0%ae` is a dot to some decoders; `%00` truncates in
//!   others), but for an encoded space, a malformed escape, and a path that does not start with
//!   `/`.
//!
//! The result is what the proxy forwards when a prefix decided (`egress`), so the upstream is
//! sent exactly the path that was matched.

/// Why a path cannot be normalised (the request is refused where a prefix depends on it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/` (origin form).
    #[error("the path does not start with /")]
    NotAbsolute,
    /// A byte outside printable ASCII, raw or percent-encoded (an encoded space aside).
    #[error("the path holds a control character or a byte outside ASCII")]
    NonAscii,
    /// `%` not followed by two hex digits.
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    /// `%25`: an upstream decoding twice would read the next escape as a character.
    #[error(
        "the path holds an encoded percent sign (%25), which a second decoding would turn into another character"
    )]
    EncodedPercent,
    /// `%2f`, `%5c` or `\`: a separator some upstreams split on and others do not.
    #[error("the path holds an encoded or backslash separator")]
    AmbiguousSeparator,
    /// `;` or `%3b`: path parameters, which some upstreams drop before resolving dot segments.
    #[error("the path holds a path parameter (;)")]
    PathParameter,
}

/// RFC 3986 2.3 unreserved characters: decoding them never changes what a path means.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The normalised form of `path` (origin form, no query), or why there is none.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. One decoding of unreserved characters; everything ambiguous refused.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = hi << 4 | lo;
                match c {
                    b'%' => return Err(PathError::EncodedPercent),
                    b'/' | b'\\' => return Err(PathError::AmbiguousSeparator),
                    b';' => return Err(PathError::PathParameter),
                    // An encoded space is ordinary; control characters and bytes above ASCII
                    // (overlong UTF-8, NUL truncation) are not.
                    _ if !(0x20..0x7f).contains(&c) => return Err(PathError::NonAscii),
                    _ if unreserved(c) => decoded.push(char::from(c)),
                    _ => {
                        decoded.push('%');
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::AmbiguousSeparator),
            b';' => return Err(PathError::PathParameter),
            _ if !(0x21..0x7f).contains(&b) => return Err(PathError::NonAscii),
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // 2. Dot segments (RFC 3986 5.2.4), on whole segments of the decoded path. A trailing `.`
    //    or `..` leaves the directory it names, with its slash.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        if n == last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_paths_are_kept() {
        for p in ["/", "/v1/", "/v1/chat/completions", "/a//b", "/v1/a-b_c~d"] {
            assert_eq!(normalize_path(p).unwrap(), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        for (p, want) in [
            ("/v1/../admin", "/admin"),
            ("/v1/./x", "/v1/x"),
            ("/../../etc", "/etc"),
            ("/v1/a/..", "/v1/"),
            ("/v1/.", "/v1/"),
            ("/v1/..", "/"),
            ("/v1/a/b/../../c", "/v1/c"),
            ("/v1/...", "/v1/..."),
            ("/v1/..x", "/v1/..x"),
        ] {
            assert_eq!(normalize_path(p).unwrap(), want, "{p}");
        }
    }

    #[test]
    fn encoded_unreserved_characters_are_decoded_once_before_dot_segments() {
        for (p, want) in [
            ("/v1/%2e%2e/admin", "/admin"),
            ("/v1/%2E./admin", "/admin"),
            ("/v1/.%2e", "/"),
            ("/%76%31/x", "/v1/x"),
            ("/v1/%7e", "/v1/~"),
        ] {
            assert_eq!(normalize_path(p).unwrap(), want, "{p}");
        }
    }

    #[test]
    fn other_escapes_are_kept_with_upper_case_hex() {
        assert_eq!(normalize_path("/v1/a%2cb%3f").unwrap(), "/v1/a%2Cb%3F");
    }

    #[test]
    fn path_parameters_are_refused() {
        for p in ["/v1/..;/admin", "/v1;x/y", "/v1/%3b/x", "/v1/x;"] {
            assert_eq!(normalize_path(p), Err(PathError::PathParameter), "{p}");
        }
    }

    #[test]
    fn double_encoding_is_refused() {
        for p in ["/v1/%252e%252e/admin", "/v1/%25", "/v1/%252F"] {
            assert_eq!(normalize_path(p), Err(PathError::EncodedPercent), "{p}");
        }
    }

    #[test]
    fn encoded_and_backslash_separators_are_refused() {
        for p in ["/v1/..%2Fadmin", "/v1/%2f", "/v1/%5C..", "/v1\\..\\admin"] {
            assert_eq!(normalize_path(p), Err(PathError::AmbiguousSeparator), "{p}");
        }
    }

    #[test]
    fn bytes_outside_printable_ascii_are_refused_raw_or_encoded() {
        for p in [
            "/v1/\u{e9}",
            "/v1/\u{2024}\u{2024}/admin",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%00",
            "/v1/a b",
            "/v1/\t",
            "/v1/%7f",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::NonAscii), "{p:?}");
        }
    }

    #[test]
    fn malformed_escapes_and_relative_paths_are_refused() {
        for p in ["/v1/%", "/v1/%2", "/v1/%zz", "/v1/%+1"] {
            assert_eq!(normalize_path(p), Err(PathError::BadEscape), "{p}");
        }
        assert_eq!(normalize_path("v1/x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in ["/v1/%2e%2e/admin", "/a/./b/../c%20d", "/%7e/x/.."] {
            let once = normalize_path(p).unwrap();
            assert_eq!(normalize_path(&once).unwrap(), once, "{p}");
        }
    }
}
