//! Secret values, read on the host at proxy start and on every reload, from the sources the
//! profile declares (environment, file, command). Never from or into the guest.
//!
//! Invariants: a value is never logged, never written to an audit record and never shown by
//! `Debug`; errors name the secret and its source, never the value; a value that could not be
//! sent in an HTTP header (empty, control characters) is refused at load time.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_policy::{SecretSource, SecretSpec};

/// A secret's value. `Debug` and `Display` print nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    /// The value, for the one place that injects it into a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// Why a secret's value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set or not UTF-8.
    #[error("secret {name:?}: environment variable {var} is not set")]
    Env {
        /// The secret.
        name: String,
        /// The variable.
        var: String,
    },
    /// The file could not be read.
    #[error("secret {name:?}: cannot read {}", .path.display())]
    File {
        /// The secret.
        name: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command could not be started.
    #[error("secret {name:?}: cannot run {program}")]
    CommandStart {
        /// The secret.
        name: String,
        /// argv\[0\].
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command failed.
    #[error("secret {name:?}: {program} exited with {status}")]
    CommandFailed {
        /// The secret.
        name: String,
        /// argv\[0\].
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// No random placeholder could be drawn (the system's random source failed).
    #[error("secret {name:?}: no random placeholder could be drawn")]
    Random {
        /// The secret.
        name: String,
    },
    /// The value is empty, not UTF-8, or holds characters a header cannot carry.
    #[error("secret {name:?}: the value from {from} is empty or not a valid header value")]
    BadValue {
        /// The secret.
        name: String,
        /// Where it came from (never the value).
        from: String,
    },
}

/// The prefix of a drawn placeholder: recognisable in logs and by secret scanners as moat's.
pub const AUTO_PLACEHOLDER_PREFIX: &str = "sk-moat-";

/// The placeholders drawn for one workspace's `placeholder = "auto"` secrets, by secret name.
/// The proxy keeps one for its whole life, so a placeholder stays the same across policy
/// reloads (the agent was given it once, at start) and differs between workspaces.
#[derive(Default)]
pub struct PlaceholderBook {
    drawn: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for PlaceholderBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlaceholderBook(..)")
    }
}

impl PlaceholderBook {
    /// The placeholder drawn for secret `name`, drawn now if it has none yet: the prefix and
    /// 128 bits from the CSPRNG rustls uses, in hex.
    pub fn placeholder(&self, name: &str) -> Result<String, SecretError> {
        let mut drawn = match self.drawn.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(p) = drawn.get(name) {
            return Ok(p.clone());
        }
        let mut bytes = [0u8; 16];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| SecretError::Random { name: name.into() })?;
        let mut p = String::with_capacity(AUTO_PLACEHOLDER_PREFIX.len() + 32);
        p.push_str(AUTO_PLACEHOLDER_PREFIX);
        for b in bytes {
            p.push_str(&format!("{b:02x}"));
        }
        drawn.insert(name.to_owned(), p.clone());
        Ok(p)
    }
}

/// The secrets of one policy, with their values. Cheap to share.
#[derive(Debug, Default)]
pub struct Secrets {
    entries: Vec<(SecretSpec, SecretValue)>,
}

impl Secrets {
    /// Reads every declared secret. Any failure refuses the whole set, so a policy is never
    /// enforced with some of its secrets missing.
    pub fn load(specs: &[SecretSpec]) -> Result<Arc<Secrets>, SecretError> {
        Self::load_with(specs, &PlaceholderBook::default())
    }

    /// [`Secrets::load`], with each `placeholder = "auto"` secret given its placeholder from
    /// `book` (the workspace's, drawn on first use).
    pub fn load_with(
        specs: &[SecretSpec],
        book: &PlaceholderBook,
    ) -> Result<Arc<Secrets>, SecretError> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let value = read(spec)?;
            let mut spec = spec.clone();
            if spec.auto_placeholder {
                spec.placeholder = book.placeholder(&spec.name)?;
            }
            entries.push((spec, value));
        }
        Ok(Arc::new(Secrets { entries }))
    }

    /// The agent's environment the secrets ask for: each `env` variable with its secret's
    /// placeholder (never a value).
    pub fn agent_env(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter_map(|(s, _)| Some((s.env.clone()?, s.placeholder.clone())))
            .collect()
    }

    /// Every secret, in profile order.
    pub fn iter(&self) -> impl Iterator<Item = (&SecretSpec, &SecretValue)> {
        self.entries.iter().map(|(s, v)| (s, v))
    }

    /// Is there no secret at all?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first secret whose placeholder occurs in `bytes`.
    pub fn placeholder_in(&self, bytes: &[u8]) -> Option<&SecretSpec> {
        self.entries
            .iter()
            .map(|(s, _)| s)
            .find(|s| contains(bytes, s.placeholder.as_bytes()))
    }
}

/// Does `haystack` contain `needle`? (SIMD substring search: request bodies are scanned
/// with it at line rate.)
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

fn trim_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// How long a secret command may run: a hung vault client must not hang a reload.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from a secret command's output.
const MAX_COMMAND_OUTPUT: u64 = 64 * 1024;

/// Runs `program args` with no input, its output bounded in size and its run in time.
fn run_bounded(program: &str, args: &[String]) -> std::io::Result<(ExitStatus, Vec<u8>)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout {
            let _ = s.take(MAX_COMMAND_OUTPUT).read_to_end(&mut out);
        }
        out
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {COMMAND_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = reader.join().unwrap_or_default();
    Ok((status, out))
}

fn read(spec: &SecretSpec) -> Result<SecretValue, SecretError> {
    let name = spec.name.clone();
    let (raw, from) = match &spec.source {
        SecretSource::Env(var) => {
            let v = std::env::var(var).map_err(|_| SecretError::Env {
                name: name.clone(),
                var: var.clone(),
            })?;
            (v, format!("environment variable {var}"))
        }
        SecretSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|source| SecretError::File {
                name: name.clone(),
                path: path.clone(),
                source,
            })?;
            let from = format!("file {}", path.display());
            let text = String::from_utf8(bytes).map_err(|_| SecretError::BadValue {
                name: name.clone(),
                from: from.clone(),
            })?;
            (trim_newline(text), from)
        }
        SecretSource::Command(argv) => {
            let program = argv.first().cloned().unwrap_or_default();
            let (status, stdout) =
                run_bounded(&program, &argv[1..]).map_err(|source| SecretError::CommandStart {
                    name: name.clone(),
                    program: program.clone(),
                    source,
                })?;
            if !status.success() {
                return Err(SecretError::CommandFailed {
                    name,
                    program,
                    status,
                });
            }
            let from = format!("command {program}");
            let text = String::from_utf8(stdout).map_err(|_| SecretError::BadValue {
                name: name.clone(),
                from: from.clone(),
            })?;
            (trim_newline(text), from)
        }
    };
    let valid = !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    if !valid {
        return Err(SecretError::BadValue { name, from });
    }
    Ok(SecretValue(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: SecretSource) -> SecretSpec {
        SecretSpec {
            name: "t".into(),
            source,
            placeholder: "moat-placeholder-t".into(),
            auto_placeholder: false,
            env: None,
            require: false,
            hosts: vec![moat_policy::HostPattern::parse("a.test").unwrap()],
            ports: vec![443],
            paths: vec![],
            presentation: moat_policy::Presentation::XApiKey,
        }
    }

    #[test]
    fn auto_placeholders_are_random_per_book_and_stable_within_one() {
        let mut auto = spec(SecretSource::Env("PATH".into()));
        auto.placeholder = String::new();
        auto.auto_placeholder = true;
        auto.env = Some("T_TOKEN".into());
        let book = PlaceholderBook::default();
        let first = Secrets::load_with(std::slice::from_ref(&auto), &book).unwrap();
        let again = Secrets::load_with(std::slice::from_ref(&auto), &book).unwrap();
        let other = Secrets::load_with(&[auto], &PlaceholderBook::default()).unwrap();
        let env = first.agent_env();
        assert_eq!(env.len(), 1);
        let (var, p) = &env[0];
        assert_eq!(var, "T_TOKEN");
        assert!(p.starts_with(AUTO_PLACEHOLDER_PREFIX), "{p}");
        assert_eq!(p.len(), AUTO_PLACEHOLDER_PREFIX.len() + 32);
        assert_eq!(again.agent_env(), env, "a reload keeps the placeholder");
        assert_ne!(other.agent_env(), env, "another workspace draws another");
        assert_eq!(first.placeholder_in(p.as_bytes()).unwrap().name, "t");
    }

    #[test]
    fn file_source_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "sk-real-1\n").unwrap();
        let s = Secrets::load(&[spec(SecretSource::File(path))]).unwrap();
        assert_eq!(s.iter().next().unwrap().1.expose(), "sk-real-1");
    }

    #[test]
    fn command_source_is_its_standard_output() {
        let argv = vec!["printf".into(), "sk-from-vault\n".into()];
        let s = Secrets::load(&[spec(SecretSource::Command(argv))]).unwrap();
        assert_eq!(s.iter().next().unwrap().1.expose(), "sk-from-vault");
    }

    #[test]
    fn env_source_reads_the_proxy_environment() {
        let s = Secrets::load(&[spec(SecretSource::Env("PATH".into()))]).unwrap();
        assert_eq!(
            s.iter().next().unwrap().1.expose(),
            std::env::var("PATH").unwrap()
        );
    }

    #[test]
    fn failing_command_is_an_error_naming_the_secret() {
        let argv = vec!["false".into()];
        let err = Secrets::load(&[spec(SecretSource::Command(argv))]).unwrap_err();
        assert!(err.to_string().contains("secret \"t\""), "{err}");
    }

    #[test]
    fn value_with_a_line_break_inside_is_refused_without_showing_it() {
        let argv = vec!["printf".into(), "sk-a\r\nX-Evil: 1".into()];
        let err = Secrets::load(&[spec(SecretSource::Command(argv))]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("not a valid header value"), "{text}");
        assert!(!text.contains("sk-a"), "{text}");
    }

    #[test]
    fn debug_never_shows_the_value() {
        let v = SecretValue("sk-real-2".into());
        assert!(!format!("{v:?}").contains("sk-real-2"));
    }
}
