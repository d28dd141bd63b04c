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

/// The OTLP/HTTP logs receiver of the export tests (`audit/otlp/receiver.py`, decoding with
/// the official `opentelemetry-proto` definitions), on a free loopback port: every log record
/// it took, one JSON object each ([`OtlpReceiver::received`]). Killed when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    child: std::process::Child,
    port: u16,
    out: PathBuf,
}

impl OtlpReceiver {
    /// Starts the receiver writing into `dir`; `args` as receiver.py takes them (`--delay S`,
    /// `--fail N`).
    pub fn start(dir: &Path, args: &[&str]) -> OtlpReceiver {
        use std::io::BufRead as _;
        let out = dir.join("otlp-received.jsonl");
        let mut child = std::process::Command::new(otlp_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/receiver.py"))
            .arg(&out)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        OtlpReceiver {
            child,
            port: line.trim().parse().unwrap(),
            out,
        }
    }

    /// The endpoint to export to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The log records received so far (whole lines: the receiver may be writing one).
    pub fn received(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python interpreter with the OTLP receiver's definitions installed (`cargo xtask test`
/// sets MOAT_OTLP_PYTHON; else the repository's .venv-otlp).
pub fn otlp_python() -> PathBuf {
    let p = std::env::var_os("MOAT_OTLP_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-otlp/bin/python"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "the OTLP receiver is not installed: run `cargo xtask test` or set MOAT_OTLP_PYTHON"
    );
    p
}
