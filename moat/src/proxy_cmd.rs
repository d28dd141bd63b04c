//! `moat proxy` and `moat run`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use moat_egress::audit::Audit;
use moat_egress::policy_store::PolicySource;
use moat_egress::resolve::{Resolver, StaticResolver, SystemResolver};
use moat_egress::{Config, EGRESS_VSOCK_PORT, Limits, Proxy};

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// Base path of the workspace's vsock Unix socket; flows arrive on <uds>_<port>.
    #[arg(long)]
    uds: PathBuf,
    /// The vsock port served.
    #[arg(long, default_value_t = EGRESS_VSOCK_PORT)]
    port: u32,
    /// Admin socket serving /metrics and /healthz.
    #[arg(long)]
    admin: Option<PathBuf>,
    /// Do not watch the policy files (SIGHUP still reloads).
    #[arg(long)]
    no_watch: bool,
    /// Write the workspace CA certificate (PEM; never the key) here once the proxy is up, for
    /// the workspace's trust store.
    #[arg(long, value_name = "PEM")]
    ca_out: Option<PathBuf>,
    /// Where the broker's host side takes corporate flows (`moat-broker connect --egress-uds`):
    /// rules with `action = "corporate"` go there.
    #[arg(long, value_name = "PATH")]
    corporate_uds: Option<PathBuf>,
    /// Do not scan intercepted responses for the secrets injected on their connection: an
    /// upstream echoing a secret then hands it to the agent. Only for measuring the scan's
    /// cost (`cargo xtask bench`); never in use.
    #[arg(long, hide = true)]
    no_response_scan: bool,
    #[command(flatten)]
    opts: ProxyOpts,
}

/// Policy, resolution and audit options shared by `moat proxy` and `moat run`.
#[derive(Debug, Args)]
pub(crate) struct ProxyOpts {
    /// Policy profile (default: the DEVELOPMENT profile). Its signature is <profile>.minisig.
    #[arg(long, visible_alias = "policy")]
    profile: Option<PathBuf>,
    /// Trusted public key for the profile (default: the DEVELOPMENT key).
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Audit log (OCSF JSON Lines); "-" for stdout.
    #[arg(long)]
    audit: Option<String>,
    /// The audit key that signs the log's checkpoints (Ed25519, made on first use; default:
    /// this host's, `audit.key` in moat's state directory; `moat audit pubkey` prints it).
    #[arg(long, value_name = "PATH")]
    audit_key: Option<PathBuf>,
    /// Also send every audit record to this OTLP/HTTP endpoint (protobuf, `/v1/logs`), e.g.
    /// a local OpenTelemetry collector's `http://127.0.0.1:4318`: batched, retried, never in a
    /// flow's way; what cannot be sent stays in the local log (docs/audit.md).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Resolve names from this static map instead of the system resolver (repeatable,
    /// host=address). For development and tests.
    #[arg(long = "resolve", value_name = "HOST=ADDR")]
    resolve: Vec<String>,
    /// The workspace's name in audit records (default: with `moat run --tunnel`, its name at
    /// the broker; otherwise "workspace").
    #[arg(long)]
    workspace: Option<String>,
    /// Maximum concurrent flows.
    #[arg(long, default_value_t = Limits::default().max_flows)]
    max_flows: usize,
    /// Idle timeout in seconds.
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs())]
    idle_timeout: u64,
    /// Proxy worker threads. One serves a workspace's flows with the fewest context switches
    /// (measured: less CPU per request and per connection than two on a 2-core machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Extra CA certificates (PEM) trusted for intercepted flows' upstreams, on top of the
    /// webpki roots (a corporate TLS-inspection CA).
    #[arg(long, value_name = "PEM")]
    upstream_ca: Option<PathBuf>,
}

/// The certificates of a PEM bundle.
fn read_pem_certs(path: &Path) -> Result<Vec<moat_egress::intercept::Certificate>> {
    moat_egress::intercept::read_pem_certs(path)
        .with_context(|| format!("cannot read CA certificates from {}", path.display()))
}

impl ProxyOpts {
    /// The async runtime the proxy runs on.
    pub(crate) fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads.max(1))
            .thread_name("moat-proxy")
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    }

    /// The workspace's name in audit records.
    pub(crate) fn workspace(&self) -> &str {
        self.workspace.as_deref().unwrap_or("workspace")
    }

    /// Names the workspace `name` in audit records unless `--workspace` did.
    pub(crate) fn default_workspace(&mut self, name: &str) {
        self.workspace.get_or_insert_with(|| name.to_owned());
    }

    /// Where audit records go: the flag, or `default`.
    /// Whether `--audit` names the audit log (else the caller's default is used).
    pub(crate) fn audit_given(&self) -> bool {
        self.audit.is_some()
    }

    /// The audit key's file.
    pub(crate) fn audit_key_path(&self) -> Result<PathBuf> {
        crate::audit_cmd::key_path(self.audit_key.as_deref())
    }

    pub(crate) fn audit_path(&self, default: &Path) -> PathBuf {
        self.audit
            .as_ref()
            .map_or_else(|| default.to_owned(), PathBuf::from)
    }

    /// The proxy configuration for a workspace served on `uds`.
    pub(crate) fn build(
        &self,
        uds: PathBuf,
        default_audit: &Path,
    ) -> Result<(Config, Box<dyn Resolver>, Audit)> {
        let dev = crate::dev_dir();
        let using_dev = self.profile.is_none();
        let profile = self
            .profile
            .clone()
            .unwrap_or_else(|| dev.join("profile.toml"));
        let pubkey = self.pubkey.clone().unwrap_or_else(|| dev.join("dev.pub"));
        if using_dev {
            tracing::warn!("using the DEVELOPMENT policy profile and key; never in production");
        }
        let source = PolicySource::new(&profile, &pubkey)?;
        let resolver: Box<dyn Resolver> = if self.resolve.is_empty() {
            Box::new(SystemResolver)
        } else {
            let mut map = StaticResolver::new();
            for spec in &self.resolve {
                map.insert_spec(spec).map_err(anyhow::Error::msg)?;
            }
            Box::new(map)
        };
        let audit_path = self.audit_path(default_audit);
        let key = crate::audit_cmd::load_key(self.audit_key.as_deref())?;
        let audit = if audit_path.as_os_str() == "-" {
            Audit::to_writer(Box::new(std::io::stdout()), self.workspace())
        } else {
            Audit::to_file(&audit_path, self.workspace())
                .with_context(|| format!("cannot open audit log {}", audit_path.display()))?
        }
        .signed_by(key);
        let mut audit = audit;
        if let Some(endpoint) = &self.otlp_endpoint {
            let exporter = moat_audit::export::Exporter::start(
                endpoint,
                "moat-egress",
                moat_audit::export::ExportLimits::default(),
            )?;
            audit.log_mut().set_export(Box::new(exporter));
        }
        let limits = Limits {
            max_flows: self.max_flows,
            idle_timeout: Duration::from_secs(self.idle_timeout),
            ..Limits::default()
        };
        let config = Config {
            workspace: self.workspace().to_owned(),
            uds,
            port: EGRESS_VSOCK_PORT,
            admin: None,
            source,
            watch: true,
            limits,
            upstream_roots: match &self.upstream_ca {
                Some(path) => read_pem_certs(path)?,
                None => Vec::new(),
            },
            // Set by the caller: `moat run --tunnel`, `moat proxy --corporate-uds`.
            corporate_uds: None,
        };
        Ok((config, resolver, audit))
    }
}

fn build(args: &ProxyArgs) -> Result<(Config, Box<dyn Resolver>, Audit)> {
    let (mut config, resolver, audit) = args.opts.build(args.uds.clone(), Path::new("-"))?;
    config.port = args.port;
    config.admin = args.admin.clone();
    config.corporate_uds = args.corporate_uds.clone();
    config.watch = !args.no_watch;
    config.limits.scan_responses = !args.no_response_scan;
    if args.no_response_scan {
        tracing::warn!("responses are not scanned for reflected secrets (--no-response-scan)");
    }
    Ok((config, resolver, audit))
}

pub(crate) fn run_proxy(args: ProxyArgs) -> Result<ExitCode> {
    // The proxy holds the secret values and the workspace CA's key.
    moat_broker_client::keep_memory_private()?;
    let rt = args.opts.runtime()?;
    let (config, resolver, audit) = build(&args)?;
    rt.block_on(async move {
        let proxy = Proxy::start(config, resolver, audit)?;
        if let Some(path) = &args.ca_out {
            std::fs::write(path, proxy.ca_pem())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        tracing::info!(
            listen = %proxy.listen_path().display(),
            policy = %proxy.policy_name(),
            "egress proxy ready (SIGHUP or a file change reloads the policy)"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        proxy.shutdown();
        Ok(ExitCode::SUCCESS)
    })
}
