//! Per-program narrowing of a rule: `programs = [...]` names the executables whose flows the
//! rule allows, by path and optionally by SHA-256.
//!
//! ```toml
//! [[rules]]
//! name = "github"
//! hosts = ["api.github.com"]
//! ports = [443]
//! action = "passthrough"
//! programs = ["/usr/bin/curl", "/usr/lib/git-core/git@sha256:<64 hex digits>"]
//! ```
//!
//! What a flow brings is the guest's claim ([`ProgramClaim`], from the flow header): the path
//! of the executable that owns the agent's socket, as the workspace's kernel names it
//! (symlinks resolved: `/usr/bin/python3.11`, not `/usr/bin/python3`), and the SHA-256 of that
//! file. A rule with `programs` allows a flow only if the claim matches one of them: the same
//! path, and where a digest is named, the same digest. A flow without a claim (a guest that
//! could not tell, or an older guest) is refused by such a rule. A rule without `programs`
//! does not look at the claim. The claim only ever narrows: the rule is chosen by the
//! destination alone, exactly as without it.

use std::fmt;

/// Bytes of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;
/// Longest program path (what the flow header carries).
pub const MAX_PROGRAM_PATH_LEN: usize = 255;

/// One entry of a rule's `programs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramPattern {
    /// The executable's absolute path, as the workspace's kernel names it.
    pub path: String,
    /// The SHA-256 its file must have, if named.
    pub sha256: Option<[u8; SHA256_LEN]>,
}

/// The program a flow claims to come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramClaim<'a> {
    /// The executable's path.
    pub path: &'a str,
    /// Its file's SHA-256, if the guest hashed it.
    pub sha256: Option<&'a [u8; SHA256_LEN]>,
}

/// Why a `programs` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// Not an absolute path of at most 255 bytes without control characters.
    #[error("{0:?} is not an absolute program path (at most 255 bytes, no control characters)")]
    BadPath(String),
    /// A digest that is not 64 hex digits.
    #[error("{0:?}: the digest after @sha256: must be 64 hex digits")]
    BadDigest(String),
}

const DIGEST_MARK: &str = "@sha256:";

impl ProgramPattern {
    /// Parses `PATH` or `PATH@sha256:HEX`.
    pub fn parse(text: &str) -> Result<Self, ProgramError> {
        let (path, digest) = match text.rsplit_once(DIGEST_MARK) {
            Some((path, hex)) => (
                path,
                Some(parse_hex(hex).ok_or_else(|| ProgramError::BadDigest(text.to_owned()))?),
            ),
            None => (text, None),
        };
        if path.is_empty()
            || path.len() > MAX_PROGRAM_PATH_LEN
            || !path.starts_with('/')
            || path.chars().any(char::is_control)
        {
            return Err(ProgramError::BadPath(path.to_owned()));
        }
        Ok(ProgramPattern {
            path: path.to_owned(),
            sha256: digest,
        })
    }

    /// Does `claim` match: the same path and, where a digest is named, the same digest?
    pub fn matches(&self, claim: &ProgramClaim<'_>) -> bool {
        self.path == claim.path
            && self
                .sha256
                .as_ref()
                .is_none_or(|want| claim.sha256 == Some(want))
    }
}

impl fmt::Display for ProgramPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(d) = &self.sha256 {
            f.write_str(DIGEST_MARK)?;
            for b in d {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for ProgramClaim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path)?;
        if let Some(d) = self.sha256 {
            f.write_str(DIGEST_MARK)?;
            for b in d {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// 64 hex digits (either case) as 32 bytes.
pub fn parse_hex(hex: &str) -> Option<[u8; SHA256_LEN]> {
    if hex.len() != SHA256_LEN * 2 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; SHA256_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HEX: &str = "ab00000000000000000000000000000000000000000000000000000000000001";

    fn digest() -> [u8; 32] {
        let mut d = [0u8; 32];
        d[0] = 0xab;
        d[31] = 1;
        d
    }

    #[test]
    fn a_path_matches_that_path_whatever_its_digest() {
        let p = ProgramPattern::parse("/usr/bin/curl").unwrap();
        let d = digest();
        for sha256 in [None, Some(&d)] {
            assert!(p.matches(&ProgramClaim {
                path: "/usr/bin/curl",
                sha256
            }));
        }
        assert!(!p.matches(&ProgramClaim {
            path: "/usr/bin/curl2",
            sha256: None
        }));
        assert!(!p.matches(&ProgramClaim {
            path: "/usr/bin/curl/",
            sha256: None
        }));
    }

    #[test]
    fn a_digest_must_be_claimed_and_equal() {
        let p =
            ProgramPattern::parse(&format!("/usr/bin/git@sha256:{}", HEX.to_uppercase())).unwrap();
        let d = digest();
        let mut other = d;
        other[5] = 1;
        assert!(p.matches(&ProgramClaim {
            path: "/usr/bin/git",
            sha256: Some(&d)
        }));
        assert!(!p.matches(&ProgramClaim {
            path: "/usr/bin/git",
            sha256: Some(&other)
        }));
        assert!(!p.matches(&ProgramClaim {
            path: "/usr/bin/git",
            sha256: None
        }));
        assert_eq!(p.to_string(), format!("/usr/bin/git@sha256:{HEX}"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let long = format!("/{}", "a".repeat(255));
        for bad in ["", "curl", "bin/curl", "/a\nb", long.as_str()] {
            assert!(
                matches!(ProgramPattern::parse(bad), Err(ProgramError::BadPath(_))),
                "{bad:?}"
            );
        }
        for bad in [
            "/usr/bin/git@sha256:",
            "/usr/bin/git@sha256:abc",
            &format!("/usr/bin/git@sha256:{}", "g".repeat(64)),
            &format!("/usr/bin/git@sha256:{HEX}0"),
        ] {
            assert!(
                matches!(ProgramPattern::parse(bad), Err(ProgramError::BadDigest(_))),
                "{bad:?}"
            );
        }
    }
}
