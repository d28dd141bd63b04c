//! For the producers' test suites (feature `test-utils`): the published OCSF validator run over
//! an audit log, and the chain verifier's verdict on it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Runs the published OCSF schema over the audit log at `path` (`audit/ocsf/validate.py`,
/// with the validator `cargo xtask test` installs: MOAT_OCSF_PYTHON, else the repository's
/// .venv-ocsf) and fails the test with its output unless every record is valid; returns its
/// report ("N valid, 0 invalid").
pub fn validate_ocsf(path: &Path) -> String {
    let out = std::process::Command::new(ocsf_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/ocsf/validate.py"))
        .arg(path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "OCSF validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The Python interpreter with the OCSF validator installed (see audit/ocsf/README.md).
pub fn ocsf_python() -> PathBuf {
    if let Ok(p) = std::env::var("MOAT_OCSF_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-ocsf/bin/python");
    assert!(
        venv.exists(),
        "the OCSF validator is not installed: run `cargo xtask test` (it installs it into \
         .venv-ocsf) or set MOAT_OCSF_PYTHON"
    );
    venv
}
