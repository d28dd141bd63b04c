//! `moat-broker`: the trusted access broker service, the workspace host's tunnel connector, and
//! the admin commands. Thin: every command is a call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moat_broker::audit::Audit;
use moat_broker::config::{Config, ConfigError, WorkspaceName};
use moat_broker::enrolment;
use moat_broker::pki::Pki;
use moat_broker::session::{Target, Unrevoke};
use moat_broker::ssh_ca::{HOST_CA_FILE, SshCa, USER_CA_FILE};
use moat_broker::state::Broker;
use moat_broker_client::client::admin_request;
use moat_broker_client::enrolment::{Tunnel, WORKSPACE_SSH_USER};
use moat_broker_client::tunnel::connector::{Connector, ConnectorConfig};
use tokio_util::sync::CancellationToken;

/// moat's trusted access broker.
#[derive(Debug, Parser)]
#[command(name = "moat-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Enrol a workspace: write its tunnel identity, the broker's CAs and a new SSH host key
    /// with its host certificate into a directory, for `moat run --tunnel DIR` on the
    /// workspace's host.
    Enrol {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The directory to write (tunnel.toml, workspace.crt/.key, broker-ca.pem,
        /// ssh-user-ca.pub, ssh_host_ed25519_key, its .pub and -cert.pub).
        #[arg(long)]
        out: PathBuf,
        /// The tunnel listener's address as workspace hosts reach it (default: the first of
        /// `server_names` with the port of `tunnel_listen`).
        #[arg(long)]
        tunnel_address: Option<String>,
        /// The workspace.
        workspace: String,
    },
    /// Print the SSH user CA's public key (for the workspace sshd's TrustedUserCAKeys), or the
    /// host CA's (for people's known_hosts: `@cert-authority <workspaces> <key>`).
    SshCa {
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The host CA, which signs the workspaces' host keys.
        #[arg(long)]
        host: bool,
    },
    /// The workspace host's side: keep the tunnel to the broker up and connect its streams to the
    /// workspace's vsock socket.
    Connect {
        /// The broker's tunnel listener, host:port.
        #[arg(long)]
        broker: String,
        /// The broker's TLS name (default: the host part of --broker).
        #[arg(long)]
        server_name: Option<String>,
        /// The workspace's certificate (PEM), from `enrol`.
        #[arg(long)]
        cert: PathBuf,
        /// Its key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// The broker's CA (PEM), from `enrol`.
        #[arg(long)]
        broker_ca: PathBuf,
        /// The workspace's vsock Unix socket.
        #[arg(long)]
        uds: PathBuf,
        /// Guest ports the broker may open.
        #[arg(long = "port", default_value = "22")]
        ports: Vec<u32>,
        /// A Unix socket where this host's egress proxy asks for corporate services.
        #[arg(long)]
        egress_uds: Option<PathBuf>,
    },
    /// Revoke a session, a person or a workspace (live sessions drop at once).
    Revoke {
        /// The admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// A session id.
        #[arg(long, group = "what")]
        session: Option<String>,
        /// A person (their OIDC subject).
        #[arg(long, group = "what")]
        person: Option<String>,
        /// A workspace.
        #[arg(long, group = "what")]
        workspace: Option<String>,
    },
    /// Allow a revoked person or workspace again. A workspace's certificates issued before its
    /// revocation stay revoked: enrol it again.
    Unrevoke {
        /// The admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// A person (their OIDC subject).
        #[arg(long, group = "what")]
        person: Option<String>,
        /// A workspace.
        #[arg(long, group = "what")]
        workspace: Option<String>,
    },
    /// List live sessions.
    Sessions {
        /// The admin socket.
        #[arg(long)]
        admin: PathBuf,
    },
}

fn main() -> ExitCode {
    moat_log::init("MOAT_LOG", "info");
    let cli = Cli::parse();
    // The broker holds its CAs' keys, sessions and refresh tokens.
    if let Err(e) = moat_broker_client::keep_memory_private() {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", moat_broker_client::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve(Config::load(&config)?).await,
        Command::Enrol {
            config,
            out,
            tunnel_address,
            workspace,
        } => {
            let config = Config::load(&config)?;
            let name = WorkspaceName::try_from(workspace.as_str()).map_err(ConfigError::from)?;
            let Some(entry) = config.workspaces.iter().find(|w| w.name == name) else {
                anyhow::bail!("{name} is not a workspace of this broker's configuration");
            };
            if entry.ssh_user != WORKSPACE_SSH_USER {
                eprintln!(
                    "warning: {name}'s ssh_user is {:?}; a moat workspace's account is {:?}",
                    entry.ssh_user, WORKSPACE_SSH_USER
                );
            }
            let server_name = config
                .server_names
                .first()
                .cloned()
                .context("the configuration has no server_names")?;
            let broker = tunnel_address
                .unwrap_or_else(|| format!("{server_name}:{}", config.tunnel_listen.port()));
            let pki = Pki::load_or_create(&config.state_dir, &config.server_names)?;
            std::fs::create_dir_all(&config.state_dir)?;
            let user_ca = SshCa::load_or_create(&config.state_dir.join(USER_CA_FILE))?;
            let host_ca = SshCa::load_or_create(&config.state_dir.join(HOST_CA_FILE))?;
            let identity = pki.enrol(&name)?;
            let tunnel = Tunnel {
                workspace: name.clone(),
                broker,
                server_name,
            };
            let known_host = enrolment::write_dir(
                &out,
                &tunnel,
                &identity,
                &user_ca.public_key_line(),
                &host_ca,
            )?;
            println!(
                "enrolled {name} (tunnel certificate {}): {}",
                identity.serial,
                out.display()
            );
            println!("on its host:  moat run --tunnel {}", out.display());
            println!("for people's known_hosts (its host key is certified by the broker):");
            println!("{known_host}");
            Ok(())
        }
        Command::SshCa { config, host } => {
            let config = Config::load(&config)?;
            std::fs::create_dir_all(&config.state_dir)?;
            let file = if host { HOST_CA_FILE } else { USER_CA_FILE };
            let ca = SshCa::load_or_create(&config.state_dir.join(file))?;
            println!("{}", ca.public_key_line());
            Ok(())
        }
        Command::Connect {
            broker,
            server_name,
            cert,
            key,
            broker_ca,
            uds,
            ports,
            egress_uds,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let server_name = server_name.unwrap_or_else(|| {
                broker
                    .rsplit_once(':')
                    .map_or(broker.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            });
            let connector = Connector::new(ConnectorConfig {
                broker,
                server_name,
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
                broker_ca_pem: read(&broker_ca)?,
                uds,
                ports,
                egress_uds,
            })?;
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            });
            connector.run(shutdown).await;
            Ok(())
        }
        Command::Revoke {
            admin,
            session,
            person,
            workspace,
        } => {
            let target = match (session, person, workspace) {
                (Some(s), None, None) => Target::Session(s),
                (None, Some(p), None) => Target::Person(p),
                (None, None, Some(w)) => Target::Workspace(
                    WorkspaceName::try_from(w.as_str()).map_err(ConfigError::from)?,
                ),
                _ => anyhow::bail!("name exactly one of --session, --person, --workspace"),
            };
            let answer = admin_request(
                &admin,
                http::Method::POST,
                "/v1/revoke",
                Some(serde_json::to_value(&target)?),
            )
            .await?;
            println!("{answer}");
            Ok(())
        }
        Command::Unrevoke {
            admin,
            person,
            workspace,
        } => {
            let target = match (person, workspace) {
                (Some(p), None) => Unrevoke::Person(p),
                (None, Some(w)) => Unrevoke::Workspace(
                    WorkspaceName::try_from(w.as_str()).map_err(ConfigError::from)?,
                ),
                _ => anyhow::bail!("name exactly one of --person, --workspace"),
            };
            let answer = admin_request(
                &admin,
                http::Method::POST,
                "/v1/unrevoke",
                Some(serde_json::to_value(&target)?),
            )
            .await?;
            println!("{answer}");
            Ok(())
        }
        Command::Sessions { admin } => {
            let answer = admin_request(&admin, http::Method::GET, "/v1/sessions", None).await?;
            println!("{answer}");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // The audit key signs the log's checkpoints: made on first start beside the broker's other
    // keys (`moat audit pubkey --key <state_dir>/audit.key` prints its public half).
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
    }
    let key = moat_audit::AuditKey::load_or_create(&config.state_dir.join("audit.key"))?;
    let audit = match &config.audit {
        Some(path) => {
            Audit::to_file(path).with_context(|| format!("opening {}", path.display()))?
        }
        None => Audit::to_writer(Box::new(std::io::stdout())),
    }
    .signed_by(key);
    let api = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let tunnel = tokio::net::TcpListener::bind(config.tunnel_listen)
        .await
        .with_context(|| format!("binding {}", config.tunnel_listen))?;
    let admin = bind_admin(&config.admin_socket)?;
    let broker = Broker::new(config, audit).await?;
    tracing::info!(
        api = %broker.config.listen,
        tunnels = %broker.config.tunnel_listen,
        admin = %broker.config.admin_socket.display(),
        "moat-broker serving"
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    moat_broker::serve::serve(broker, api, tunnel, admin, shutdown).await?;
    Ok(())
}

/// Binds the admin socket (mode 0600 from the start: `moat_private_socket::bind`), in a
/// directory created 0700 if it is missing.
fn bind_admin(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    moat_private_socket::bind(path).with_context(|| format!("binding {}", path.display()))
}
