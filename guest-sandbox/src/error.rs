//! The one error type of the crate. Each variant names the confinement step that failed; the
//! caller must refuse to start the agent on any of them.

use std::io;
use std::path::PathBuf;

/// A confinement step that failed. The agent must not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The configuration asks for something that cannot be confined safely.
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfig(&'static str),
    /// A path listed in the configuration could not be opened for a Landlock rule.
    #[error("cannot open sandbox path {path}")]
    Path {
        /// The path as configured.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Making or entering a nested user namespace failed.
    #[error("cannot use a nested user namespace: {0}")]
    UserNamespace(&'static str, #[source] io::Error),
    /// Entering the agent's namespaces or making the mounts read-only failed.
    #[error("cannot isolate the agent: {0}")]
    Namespaces(&'static str, #[source] io::Error),
    /// Reading or setting a resource limit failed.
    #[error("cannot set resource limit {0}")]
    Rlimit(&'static str, #[source] io::Error),
    /// Changing the user or group ids failed, or they did not stick.
    #[error("cannot drop to the unprivileged user: {0}")]
    Identity(&'static str, #[source] io::Error),
    /// Dropping capabilities failed, or some remained afterwards.
    #[error("cannot drop capabilities: {0}")]
    Capabilities(&'static str, #[source] io::Error),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    /// The kernel has no Landlock, or an ABI older than the configuration accepts.
    #[error("Landlock ABI {found} is older than the required ABI {required}")]
    LandlockUnavailable {
        /// The kernel's ABI (0: Landlock absent or disabled).
        found: u32,
        /// The minimum from the configuration.
        required: u32,
    },
    /// Building or enforcing the Landlock ruleset failed.
    #[error("cannot enforce the Landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
    /// Duplicating the prepared Landlock ruleset descriptor failed.
    #[error("cannot duplicate the Landlock ruleset")]
    LandlockDup(#[source] io::Error),
    /// Landlock reported that the ruleset was not enforced at all.
    #[error("the Landlock ruleset was not enforced")]
    LandlockNotEnforced,
    /// Compiling the seccomp filter failed (a bug in the rule table).
    #[error("cannot compile the seccomp filter")]
    SeccompCompile(#[source] seccompiler::BackendError),
    /// Installing the seccomp filter failed.
    #[error("cannot install the seccomp filter")]
    SeccompInstall(#[source] seccompiler::Error),
}
