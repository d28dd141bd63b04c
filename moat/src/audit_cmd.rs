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
    /// Bundle audit logs as evidence (a tar file): the logs, the signed policy profile, its
    /// signature and key, the audit public key, each log's verification, and a manifest of
    /// every file's SHA-256 signed with the audit key.
    Bundle {
        /// The bundle to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// An audit log to include (repeatable).
        #[arg(long = "log", value_name = "FILE", required = true)]
        logs: Vec<PathBuf>,
        /// The policy profile in force (its signature is <profile>.minisig).
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// The profile's trusted minisign public key.
        #[arg(long, value_name = "FILE")]
        policy_pubkey: Option<PathBuf>,
        /// The audit key that signs the manifest (default: this host's).
        #[arg(long, value_name = "PATH")]
        audit_key: Option<PathBuf>,
    },
}

/// The bundle's format, in its manifest.
const BUNDLE_FORMAT: &str = "moat-audit-bundle/1";

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
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            if is_tar(&bytes) {
                return verify_bundle(&bytes, key.as_ref());
            }
            let text = String::from_utf8_lossy(&bytes);
            let report = moat_audit::verify(&text, key.as_ref());
            println!("{}: {report}", file.display());
            Ok(verdict(&report))
        }
        AuditCommand::Bundle {
            out,
            logs,
            profile,
            policy_pubkey,
            audit_key,
        } => bundle(
            &out,
            &logs,
            profile.as_deref(),
            policy_pubkey.as_deref(),
            audit_key.as_deref(),
        ),
    }
}

/// A POSIX tar file (the `ustar` magic of its first header).
fn is_tar(bytes: &[u8]) -> bool {
    bytes.get(257..262) == Some(b"ustar")
}

fn sha256_hex(bytes: &[u8]) -> String {
    moat_audit::chain::hex(&moat_audit::chain::sha256(bytes))
}

/// Writes the evidence bundle.
fn bundle(
    out: &Path,
    logs: &[PathBuf],
    profile: Option<&Path>,
    policy_pubkey: Option<&Path>,
    audit_key: Option<&Path>,
) -> Result<ExitCode> {
    let key = load_key(audit_key)?;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    // (name in the bundle, bytes), the manifest and its signature last.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut verification = serde_json::Map::new();
    let mut report_text = String::new();
    let mut worst = ExitCode::SUCCESS;
    for (i, log) in logs.iter().enumerate() {
        let bytes = read(log)?;
        let base = log.file_name().map_or_else(
            || "audit.jsonl".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        let name = format!("logs/{i}-{base}");
        let report = moat_audit::verify(&String::from_utf8_lossy(&bytes), Some(&key.public()));
        report_text.push_str(&format!("{name}: {report}\n"));
        verification.insert(
            name.clone(),
            serde_json::json!({
                "intact": report.intact(),
                "complete": report.complete(),
                "records": report.records,
                "runs": report.runs.len(),
                "policies": report.runs.iter().flat_map(|r| r.policy.clone()).collect::<Vec<_>>(),
            }),
        );
        if verdict(&report) != ExitCode::SUCCESS {
            worst = verdict(&report);
        }
        files.push((name, bytes));
    }
    let mut policy = serde_json::Value::Null;
    if let Some(profile) = profile {
        let text = read(profile)?;
        let mut sig_path = profile.as_os_str().to_owned();
        sig_path.push(".minisig");
        let sig = read(Path::new(&sig_path))?;
        policy = serde_json::json!({
            "profile_sha256": sha256_hex(&text),
            "signature_sha256": sha256_hex(&sig),
        });
        files.push(("policy/profile.toml".into(), text));
        files.push(("policy/profile.toml.minisig".into(), sig));
    }
    if let Some(pubkey) = policy_pubkey {
        let text = read(pubkey)?;
        policy["key_sha256"] = serde_json::json!(sha256_hex(&text));
        files.push(("policy/policy.pub".into(), text));
    }
    files.push((
        "audit.pub".into(),
        format!("{}\n", key.public().to_line()).into_bytes(),
    ));
    files.push(("verification.txt".into(), report_text.into_bytes()));
    let manifest = serde_json::json!({
        "format": BUNDLE_FORMAT,
        "created": moat_audit::ocsf::now_millis(),
        "audit_key": key.public().fingerprint(),
        "policy": policy,
        "verification": verification,
        "files": files
            .iter()
            .map(|(name, bytes)| (name.clone(), serde_json::json!(sha256_hex(bytes))))
            .collect::<serde_json::Map<_, _>>(),
    });
    let manifest = serde_json::to_vec_pretty(&manifest)?;
    let signature = key.sign_manifest(&manifest);
    files.push(("manifest.json".into(), manifest));
    files.push((
        "manifest.json.sig".into(),
        format!("{signature}\n").into_bytes(),
    ));

    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let mut tar = tar::Builder::new(file);
    for (name, bytes) in &files {
        let mut header = tar::Header::new_ustar();
        header.set_size(u64::try_from(bytes.len())?);
        header.set_mode(0o600);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    tar.into_inner()
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "moat: bundle {} written ({} files, manifest signed by {})",
        out.display(),
        files.len(),
        key.public().fingerprint()
    );
    Ok(worst)
}

/// Verifies a bundle: the manifest's signature, every file against its SHA-256 in the
/// manifest (and no file the manifest does not name), every log's chain (again, not taken from
/// the bundle's word), the profile's signature with the bundled policy key, and that the
/// profile is the one the logs' runs name.
fn verify_bundle(bytes: &[u8], key: Option<&PublicKey>) -> Result<ExitCode> {
    let mut files = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().context("not a readable tar file")? {
        let mut entry = entry.context("not a readable tar file")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        files.insert(name, data);
    }
    let mut problems = Vec::new();
    let manifest_bytes = files
        .get("manifest.json")
        .context("the bundle has no manifest.json")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(manifest_bytes).context("manifest.json is not JSON")?;
    let bundled_key = files
        .get("audit.pub")
        .and_then(|b| PublicKey::parse(&String::from_utf8_lossy(b)).ok());
    let check_key = key.copied().or(bundled_key);
    let signature = files
        .get("manifest.json.sig")
        .map(|b| String::from_utf8_lossy(b).into_owned());
    match (check_key, signature) {
        (Some(k), Some(sig)) if k.verify_manifest(manifest_bytes, &sig) => {}
        (Some(_), Some(_)) => problems.push("manifest signature does not verify".to_owned()),
        _ => problems.push("manifest signature or audit key missing".to_owned()),
    }
    if let (Some(given), Some(bundled)) = (key, bundled_key)
        && *given != bundled
    {
        problems.push(format!(
            "bundle names audit key {}, not the key given",
            bundled.fingerprint()
        ));
    }
    let listed = manifest["files"].as_object().cloned().unwrap_or_default();
    for (name, data) in &files {
        if name == "manifest.json" || name == "manifest.json.sig" {
            continue;
        }
        match listed.get(name).and_then(|v| v.as_str()) {
            Some(h) if h == sha256_hex(data) => {}
            Some(_) => problems.push(format!(
                "{name}: changed (its SHA-256 is not the manifest's)"
            )),
            None => problems.push(format!("{name}: not in the manifest")),
        }
    }
    for name in listed.keys() {
        if !files.contains_key(name) {
            problems.push(format!("{name}: in the manifest but not in the bundle"));
        }
    }
    let mut worst = ExitCode::SUCCESS;
    let profile_sha = files.get("policy/profile.toml").map(|b| sha256_hex(b));
    for (name, data) in files.iter().filter(|(n, _)| n.starts_with("logs/")) {
        let report = moat_audit::verify(&String::from_utf8_lossy(data), check_key.as_ref());
        println!("{name}: {report}");
        if verdict(&report) != ExitCode::SUCCESS && worst == ExitCode::SUCCESS {
            worst = verdict(&report);
        }
        if let Some(sha) = &profile_sha {
            let named = report
                .runs
                .iter()
                .flat_map(|r| &r.policy)
                .any(|p| p["profile_sha256"].as_str() == Some(sha));
            if !named {
                problems.push(format!(
                    "{name}: no run names the bundled profile (SHA-256 {sha}) as in force"
                ));
            }
        }
    }
    if let (Some(profile), Some(sig), Some(pubkey)) = (
        files.get("policy/profile.toml"),
        files.get("policy/profile.toml.minisig"),
        files.get("policy/policy.pub"),
    ) {
        let signed = moat_policy::signing::parse_public_key(&String::from_utf8_lossy(pubkey))
            .and_then(|k| {
                moat_policy::signing::load_verified(profile, &String::from_utf8_lossy(sig), &k)
            });
        if let Err(e) = signed {
            problems.push(format!(
                "policy/profile.toml: {}",
                moat_log::error_chain(&e)
            ));
        }
    }
    for p in &problems {
        println!("bundle: {p}");
    }
    if problems.is_empty() {
        println!(
            "bundle: manifest signed by {}, every file as the manifest says{}",
            check_key.map_or_else(String::new, |k| k.fingerprint()),
            if key.is_some() {
                ""
            } else {
                " (checked against the key the bundle names: give --pubkey to check it is yours)"
            }
        );
        Ok(worst)
    } else {
        Ok(ExitCode::from(1))
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
