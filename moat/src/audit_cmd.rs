//! `moat audit`: the per-host audit key, verifying an audit log's chain and signatures, and
//! the evidence bundle (see docs/audit.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use moat_audit::{AuditKey, PublicKey};

/// `moat audit` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Print the public half of this host's audit key (made on first use), to give to
    /// `moat audit verify --pubkey`.
    Pubkey {
        /// The key file (default: this host's, in moat's state directory).
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Verify an audit log (or a bundle from `moat audit bundle`): every record's hash, the
    /// chain, the signed checkpoints, and that every run ended. Exit status 0: intact and
    /// complete; 1: tampered (each finding names its line); 3: intact but incomplete.
    Verify {
        /// The audit log (JSON Lines) or bundle.
        file: PathBuf,
        /// The audit public key to check signatures with (a file holding the `moat audit
        /// pubkey` line); without it, each run's own named key is used, which proves only
        /// that the log is consistent, not who wrote it.
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
    },
}

/// This host's state directory: root's /var/lib/moat, anyone else's `$XDG_STATE_HOME/moat`
/// (`~/.local/state/moat`), made 0700.
pub(crate) fn state_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/lib/moat")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .context(
                "neither XDG_STATE_HOME nor HOME is set, so there is no place for the audit \
                 key: set one, or give --audit-key PATH",
            )?
            .join("moat")
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Where this host's audit key lives: `given`, or `audit.key` in the state directory.
pub(crate) fn key_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_owned()),
        None => Ok(state_dir()?.join("audit.key")),
    }
}

/// Loads the audit key at `given` (or this host's), making it on first use.
pub(crate) fn load_key(given: Option<&Path>) -> Result<AuditKey> {
    let path = key_path(given)?;
    Ok(AuditKey::load_or_create(&path)?)
}

/// Reads a public key file (or the line itself).
fn read_pubkey(path: &Path) -> Result<PublicKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    PublicKey::parse(&text).with_context(|| format!("in {}", path.display()))
}

pub(crate) fn run(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Pubkey { key } => {
            let key = load_key(key.as_deref())?;
            println!("{}", key.public().to_line());
            eprintln!("fingerprint: {}", key.public().fingerprint());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { file, pubkey } => {
            let key = pubkey.as_deref().map(read_pubkey).transpose()?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let report = moat_audit::verify(&text, key.as_ref());
            println!("{}: {report}", file.display());
            Ok(verdict(&report))
        }
    }
}

/// 0 intact and complete, 1 tampered, 3 intact but incomplete.
fn verdict(report: &moat_audit::Report) -> ExitCode {
    if !report.intact() {
        ExitCode::from(1)
    } else if report.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}
