//! `moat`: the command-line entry point. Thin: every command is a call into a library crate.
// The doc comments of clap's argument structs are the `--help` text people read: placeholders
// like <profile> and [v6]:port are meant literally there, not as HTML or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod audit_cmd;
mod broker_cmd;
mod connect;
mod doctor;
mod policy_cmd;
mod policy_test;
mod pool;
mod proxy_cmd;
mod run_cmd;
mod vm_backend;
mod workspace_root;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Secure workspaces for AI agents.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, sign, verify and query egress policy profiles.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Run the host egress proxy for one workspace.
    Proxy(proxy_cmd::ProxyArgs),
    /// Verify audit logs, bundle them as evidence, print this host's audit key.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Open one flow through the proxy, like `nc` (stdin/stdout, or a local TCP listener).
    Connect(connect::ConnectArgs),
    /// Check this host for workspace VMs and GPU passthrough, and say what to fix.
    Doctor(doctor::DoctorArgs),
    /// Run a workspace with an agent shell on the best backend this host supports.
    Run(Box<run_cmd::RunArgs>),
    /// Keep VM workspaces restored from a template ready to claim (`moat run --pool`).
    Pool(pool::PoolArgs),
    /// Sign in to a workspace through the trusted access broker (OIDC in the browser).
    Login(broker_cmd::LoginArgs),
    /// Connect stdin/stdout to a workspace's sshd through the broker (an OpenSSH ProxyCommand).
    Ssh(broker_cmd::SshArgs),
    /// The namespace backend's PID 1 (started by `moat run`, not by hand).
    #[command(name = "__guest-init", hide = true)]
    GuestInit(run_cmd::GuestInitArgs),
    /// A command in a running namespace workspace, confined like its agent (started by
    /// containerd-shim-moat-v2 for an exec, not by hand).
    #[command(name = "__exec", hide = true)]
    Exec(run_cmd::ExecArgs),
}

/// The development profile and key shipped in the repository (DEVELOPMENT ONLY).
pub(crate) fn dev_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy/dev")
}

fn main() -> ExitCode {
    moat_log::init("MOAT_LOG", "info");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Proxy(args) => proxy_cmd::run_proxy(args),
        Command::Audit(cmd) => audit_cmd::run(cmd),
        Command::Connect(args) => connect::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Pool(args) => pool::run(args),
        Command::GuestInit(args) => run_cmd::guest_init(args),
        Command::Exec(args) => run_cmd::exec(args),
        Command::Login(args) => broker_cmd::login(args),
        Command::Ssh(args) => broker_cmd::ssh(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One chain printer for the binary: "error: outer: cause: root cause".
            eprintln!("error: {}", moat_egress::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
