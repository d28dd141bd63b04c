//! `moat proxy` and `moat run`.

use std::path::PathBuf;
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
    /// Policy profile (default: the DEVELOPMENT profile). Its signature is <profile>.minisig.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Trusted public key for the profile (default: the DEVELOPMENT key).
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Audit log (OCSF JSON Lines); "-" for stdout.
    #[arg(long, default_value = "-")]
    audit: String,
    /// Admin socket serving /metrics and /healthz.
    #[arg(long)]
    admin: Option<PathBuf>,
    /// Resolve names from this static map instead of the system resolver (repeatable,
    /// host=address). For development and tests.
    #[arg(long = "resolve", value_name = "HOST=ADDR")]
    resolve: Vec<String>,
    /// The workspace's name in audit records.
    #[arg(long, default_value = "workspace")]
    workspace: String,
    /// Do not watch the policy files (SIGHUP still reloads).
    #[arg(long)]
    no_watch: bool,
    /// Maximum concurrent flows.
    #[arg(long, default_value_t = Limits::default().max_flows)]
    max_flows: usize,
    /// Idle timeout in seconds.
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs())]
    idle_timeout: u64,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Backend: auto, vm or namespace.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Command to run in the workspace instead of an interactive shell.
    #[arg(last = true)]
    command: Vec<String>,
}

fn build(args: ProxyArgs) -> Result<(Config, Box<dyn Resolver>, Audit)> {
    let dev = crate::dev_dir();
    let using_dev = args.profile.is_none();
    let profile = args.profile.unwrap_or_else(|| dev.join("profile.toml"));
    let pubkey = args.pubkey.unwrap_or_else(|| dev.join("dev.pub"));
    if using_dev {
        tracing::warn!("using the DEVELOPMENT policy profile and key; never in production");
    }
    let source = PolicySource::new(&profile, &pubkey)?;
    let resolver: Box<dyn Resolver> = if args.resolve.is_empty() {
        Box::new(SystemResolver)
    } else {
        let mut map = StaticResolver::new();
        for spec in &args.resolve {
            map.insert_spec(spec).map_err(anyhow::Error::msg)?;
        }
        Box::new(map)
    };
    let audit = if args.audit == "-" {
        Audit::to_writer(Box::new(std::io::stdout()), &args.workspace)
    } else {
        Audit::to_file(args.audit.as_ref(), &args.workspace)
            .with_context(|| format!("cannot open audit log {}", args.audit))?
    };
    let limits = Limits {
        max_flows: args.max_flows,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        ..Limits::default()
    };
    let config = Config {
        workspace: args.workspace,
        uds: args.uds,
        port: args.port,
        admin: args.admin,
        source,
        watch: !args.no_watch,
        limits,
    };
    Ok((config, resolver, audit))
}

pub(crate) fn run_proxy(args: ProxyArgs) -> Result<ExitCode> {
    let (config, resolver, audit) = build(args)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let proxy = Proxy::start(config, resolver, audit)?;
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

/// `moat run`: picks the backend and says which and why. Only the egress proxy exists so far;
/// this says so plainly instead of pretending to start a workspace.
pub(crate) fn run_workspace(args: RunArgs) -> Result<ExitCode> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // Which KVM module provides /dev/kvm: kvm_intel/kvm_amd use hardware virtualization;
    // kvm_pvm is nested PVM, where a Linux guest's user space cannot run.
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    let pvm = module("kvm_pvm");
    let (choice, why) = match args.backend.as_str() {
        "vm" => ("vm", "requested with --backend vm".to_owned()),
        "namespace" => ("namespace", "requested with --backend namespace".to_owned()),
        "auto" if kvm && !pvm && (module("kvm_intel") || module("kvm_amd")) => {
            ("vm", "/dev/kvm has hardware virtualization".to_owned())
        }
        "auto" if kvm && pvm => (
            "namespace",
            "/dev/kvm is nested PVM, where a Linux guest's user space cannot run".to_owned(),
        ),
        "auto" if kvm => (
            "namespace",
            "/dev/kvm is neither kvm_intel, kvm_amd nor kvm_pvm".to_owned(),
        ),
        "auto" => (
            "namespace",
            "/dev/kvm is not available to this user".to_owned(),
        ),
        other => anyhow::bail!("unknown backend {other:?} (auto, vm or namespace)"),
    };
    eprintln!("moat run: backend {choice} ({why})");
    eprintln!(
        "moat run: the {choice} backend is not built yet: today moat has the host egress proxy \
         (`moat proxy`), its policy tools (`moat policy`) and a client (`moat connect`). \
         See README.md \"Try the egress proxy\"."
    );
    if !args.command.is_empty() {
        eprintln!("moat run: not running {:?}", args.command.join(" "));
    }
    Ok(ExitCode::from(2))
}
