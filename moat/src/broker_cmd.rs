//! `moat login` and `moat ssh`: a person's side of the trusted access broker (moat-broker).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use moat_broker_client::client::{BrokerClient, SessionFile, stdio_relay};

/// Sign in to a workspace through the broker (OIDC in the browser); keeps a short session.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The broker's URL (https).
    #[arg(long, env = "MOAT_BROKER")]
    broker: String,
    /// The broker's CA (PEM), when its certificate is not from the Web PKI.
    #[arg(long, env = "MOAT_BROKER_CA")]
    broker_ca: Option<PathBuf>,
    /// Where to keep the session [default: $XDG_RUNTIME_DIR/moat/sessions/<workspace>.json].
    #[arg(long)]
    session: Option<PathBuf>,
    /// Also have the broker certify this OpenSSH public key (`id_ed25519.pub`); the certificate
    /// is written beside it (`id_ed25519-cert.pub`), where ssh finds it, and ends with the session.
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// Sign in on another device (OAuth device flow): for a terminal without a browser.
    #[arg(long)]
    device: bool,
    /// The workspace.
    workspace: String,
}

/// Connect standard input and output to a workspace's sshd through the broker; for OpenSSH:
/// `ssh -o ProxyCommand='moat ssh %n' agent@<workspace>`.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// The session file written by `moat login`.
    #[arg(long)]
    session: Option<PathBuf>,
    /// The workspace.
    workspace: String,
}

fn session_path(explicit: Option<PathBuf>, workspace: &str) -> PathBuf {
    explicit.unwrap_or_else(|| SessionFile::default_path(workspace))
}

/// `moat login`.
pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let ca = args
        .broker_ca
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let path = session_path(args.session, &args.workspace);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = BrokerClient::new(&args.broker, ca)?;
        let session = if args.device {
            let sign_in = client.begin_device_login(&args.workspace).await?;
            eprintln!(
                "To sign in to {}, open this URL on any device and enter the code {}:\n\n  {}\n",
                args.workspace,
                sign_in.user_code,
                sign_in
                    .verification_uri_complete
                    .as_deref()
                    .unwrap_or(&sign_in.verification_uri)
            );
            client
                .finish_device_login(&args.workspace, &sign_in)
                .await?
        } else {
            let sign_in = client.begin_login(&args.workspace).await?;
            eprintln!(
                "Open this URL in your browser to sign in to {}:\n\n  {}\n",
                args.workspace, sign_in.authorize_url
            );
            client.finish_login(&args.workspace, sign_in).await?
        };
        session.save(&path)?;
        eprintln!(
            "signed in to {} (session {}, {} s left); session kept in {}",
            session.workspace,
            session.session_id,
            session
                .expires_at
                .saturating_sub(moat_broker_client::unix_now()),
            path.display()
        );
        if let Some(key) = &args.ssh_key {
            let public = std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?;
            let cert = client.certificate(&session, &public).await?;
            let cert_path = certificate_path(key);
            std::fs::write(&cert_path, format!("{cert}\n"))
                .with_context(|| format!("writing {}", cert_path.display()))?;
            eprintln!("SSH certificate: {}", cert_path.display());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `id_ed25519.pub` -> `id_ed25519-cert.pub` (OpenSSH's convention).
fn certificate_path(public_key: &Path) -> PathBuf {
    let name = public_key
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pub").unwrap_or(&name);
    public_key.with_file_name(format!("{stem}-cert.pub"))
}

/// `moat ssh`.
pub fn ssh(args: SshArgs) -> anyhow::Result<ExitCode> {
    let path = session_path(args.session, &args.workspace);
    let session = SessionFile::load(&path, &args.workspace)?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let client = BrokerClient::for_session(&session)?;
        let stream = client.connect(&session).await?;
        stdio_relay(stream).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Tokio reads stdin on a blocking thread that a normal runtime drop would wait for; when
    // the workspace side ends (revoked, broker gone), exit without waiting for ssh's next byte.
    rt.shutdown_background();
    result
}
