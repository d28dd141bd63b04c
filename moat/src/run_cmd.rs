//! `moat run`: a workspace with an agent shell, on the best backend this host supports.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::Args;

use moat_egress::Proxy;
use moat_egress::guest_audit::{self, GUEST_AUDIT_VSOCK_PORT};
use moat_host_probe::KvmFlavour;

use moat_broker_client::enrolment::WorkspaceEnrolment;
use moat_broker_client::tunnel::connector::{Connector, ConnectorConfig};
use moat_guest_init::control::VmWorkspace;
use moat_guest_init::service::ServiceSpec;
use moat_guest_init::session::SshService;
use std::os::unix::fs::OpenOptionsExt;

use crate::proxy_cmd::ProxyOpts;
use crate::vm_backend::{self, VmImages};
use crate::workspace_root::{self, Exposure};
use moat_guest_init::RootFs;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Backend: auto, vm or namespace. auto runs a VM where /dev/kvm has hardware
    /// virtualization and the VM's images are found, unless an option only the namespace
    /// backend takes is given (--rootfs, --host-root, --home, --workdir, --device).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// The agent's home directory (default: a fresh one, removed at exit).
    #[arg(long)]
    home: Option<PathBuf>,
    /// namespace backend: the workspace's root, a directory holding a root file system, bound
    /// read-only (default: the Debian root image the VM boots, built by `cargo xtask images
    /// rootfs`).
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// The workspace's root from an OCI image: an image layout directory, or an archive of
    /// one (`cargo xtask images oci` writes the project's root image as one). Unpacked with
    /// every digest checked and kept by digest; the vm backend boots it as a read-only disk.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["rootfs", "host_root"])]
    image: Option<PathBuf>,
    /// namespace backend: the host's own root as the workspace's, read-only, instead of an
    /// image. It shows the agent every host file the workspace's uid may read outside /tmp,
    /// /run, /home and /root: run as an ordinary user, every file you can read, through your
    /// groups too.
    #[arg(long)]
    host_root: bool,
    /// Extra CA certificates (PEM) the workspace trusts, added to its system trust store
    /// (the egress proxy's workspace CA is always added).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// vm backend: the agent's home disk (an ext4 image, kept; default: a fresh one, removed
    /// at exit).
    #[arg(long)]
    home_disk: Option<PathBuf>,
    /// vm backend: guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u64,
    /// vm backend: vCPUs (the guest kernel is built without SMP for now: more than one is
    /// not used).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// vm backend: pass this host PCI device (a GPU bound to vfio-pci) through to the VM;
    /// repeatable (every member of its IOMMU group). Check the host with `moat doctor`.
    #[arg(long = "gpu", value_name = "PCI_ADDRESS")]
    gpu: Vec<String>,
    /// vm backend: show the guest kernel's boot messages, and guest-init's steps with their
    /// times, on the console.
    #[arg(long)]
    boot_log: bool,
    /// Reach this workspace through the trusted access broker: the enrolment directory
    /// `moat-broker enrol` wrote (its tunnel identity, the broker's CAs, its SSH host key).
    /// People then sign in with `moat login` and connect with `ssh` through `moat ssh`.
    #[arg(long, value_name = "DIR")]
    tunnel: Option<PathBuf>,
    /// A variable of the agent's environment (repeatable): a container's own environment
    /// under `containerd-shim-moat-v2`. Never a secret: the agent reads it.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// namespace backend: the agent's working directory inside the workspace (absolute;
    /// default: its home).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// A workspace service, started before the agent and stopped after it, as a uid of its
    /// own, out of the agent's reach (docs/inference.md): NAME[:PORT]=COMMAND, the command
    /// split on spaces, PORT the loopback port it listens on. Repeatable.
    #[arg(long = "service", value_name = "NAME[:PORT]=COMMAND")]
    service: Vec<String>,
    /// Workspace services from a TOML file: `[[service]]` tables with name, command (a list),
    /// and optionally port, models (a directory bound read-only in its view only), devices,
    /// restart.
    #[arg(long, value_name = "FILE")]
    services: Option<PathBuf>,
    /// namespace backend: a host device node for the workspace's one service, in its /dev
    /// only, never in the agent's. Repeatable.
    #[arg(long = "device", value_name = "PATH")]
    device: Vec<PathBuf>,
    /// vm backend: make a template instead of running a command: boot, and once guest-init
    /// stands by (before anything of a workspace exists in the VM), snapshot the VM into DIR
    /// and stop. `--from-snapshot DIR` starts workspaces from it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["from_snapshot", "command", "home_disk"])]
    snapshot_to: Option<PathBuf>,
    /// vm backend: start from a template (`--snapshot-to`) instead of booting. Each start is a
    /// new workspace: the guest's RNG is reseeded from the host before anything runs, and it
    /// gets this run's own CA, placeholders and audit log, as a booted one does.
    #[arg(long, value_name = "DIR")]
    from_snapshot: Option<PathBuf>,
    /// vm backend: claim a machine from the warm pool on this socket (`moat pool`) instead of
    /// booting: restored from its template, RNG reseeded and made ready up to the workspace; this run
    /// attaches its own proxy, CA, placeholders and audit log, and the command (or, on a
    /// terminal, an interactive shell: the terminal is handed to the machine's console); the
    /// root image is the pool's.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["from_snapshot", "snapshot_to", "home_disk", "image", "gpu"])]
    pool: Option<PathBuf>,
    /// vm backend: moat-vmm's control socket for this workspace at PATH (owner-only), where
    /// an operator pauses, resumes and snapshots the running VM (vmm/README.md). A snapshot
    /// resets the VM's vsock connections: flows in progress fail, and the workspace goes on.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["snapshot_to", "pool"])]
    api_sock: Option<PathBuf>,
    #[command(flatten)]
    proxy: ProxyOpts,
    /// Command to run in the workspace instead of an interactive shell.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `NAME=VALUE`, with a name a shell could set.
fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a variable name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Arguments of the hidden `__guest-init` command: the namespace backend's PID 1.
#[derive(Debug, Args)]
pub(crate) struct GuestInitArgs {
    #[arg(long)]
    flow_socket: PathBuf,
    #[arg(long)]
    audit_socket: Option<PathBuf>,
    #[arg(long)]
    run_dir: PathBuf,
    /// The workspace's root (an image directory); without it, `--host-root`.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    #[arg(long)]
    host_root: bool,
    /// Run by root: the host id leased for this workspace.
    #[arg(long)]
    host_id: Option<u32>,
    #[arg(long)]
    home: PathBuf,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, default_value = "workspace")]
    hostname: String,
    /// The SSH session service (JSON, 0600: it holds the host key).
    #[arg(long)]
    ssh: Option<PathBuf>,
    #[arg(long)]
    ssh_log: Option<PathBuf>,
    /// The highest flow header version the egress proxy reads (absent: 1).
    #[arg(long, default_value_t = moat_flow_header::VERSION_1)]
    flow_header_version: u8,
    /// A variable of the agent's environment: a secret's placeholder (never its value).
    #[arg(long = "agent-env", value_name = "NAME=VALUE")]
    agent_env: Vec<String>,
    /// The agent's working directory inside the workspace (default: its home).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// The workspace's services (JSON, written by `moat run`).
    #[arg(long)]
    services: Option<PathBuf>,
    /// Run by root: a service's host id, in the order of the services.
    #[arg(long = "service-host-id")]
    service_host_id: Vec<u32>,
    /// A name the netstack answers with a service: HOST:PORT=SERVICE_PORT (the signed
    /// policy's `[[local_routes]]`).
    #[arg(long = "local-route", value_name = "HOST:PORT=SERVICE_PORT")]
    local_route: Vec<String>,
    #[arg(last = true)]
    command: Vec<String>,
}

/// Arguments of the hidden `__exec` command.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The `moat run` process of the workspace (its PID 1 is found under it).
    #[arg(long)]
    workspace_pid: u32,
    /// A variable of the command's environment (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The working directory inside the workspace (default: the agent's home).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    #[arg(last = true)]
    command: Vec<String>,
}

/// The `[[service]]` tables of a `--services` file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesFile {
    #[serde(default)]
    service: Vec<ServiceSpec>,
}

/// The workspace's services: `--services FILE`'s, then each `--service`'s; `--device` goes
/// to the one service there is.
fn workspace_services(args: &RunArgs) -> Result<Vec<ServiceSpec>> {
    let mut specs = match &args.services {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str::<ServicesFile>(&text)
                .with_context(|| format!("--services {}: not a services file", path.display()))?
                .service
        }
        None => Vec::new(),
    };
    for flag in &args.service {
        specs.push(ServiceSpec::parse_flag(flag)?);
    }
    if !args.device.is_empty() {
        match specs.as_mut_slice() {
            [one] => one.devices.extend(args.device.iter().cloned()),
            _ => bail!(
                "--device gives a device to the workspace's one service: with {} services, name                  each one's devices in a --services file",
                specs.len()
            ),
        }
    }
    ServiceSpec::check_all(&specs)?;
    Ok(specs)
}

/// The signed policy's local routes for this workspace's services: each to the loopback
/// port of the service it names. A route to a service this workspace does not run (or one
/// without a port) is left to the egress proxy, which decides that name as any other, and
/// said so.
fn local_routes(
    policy: &moat_policy::Policy,
    services: &[ServiceSpec],
) -> Vec<moat_guest_init::LocalRoute> {
    let mut routes = Vec::new();
    for route in &policy.local_routes {
        let port = services
            .iter()
            .find(|s| s.name == route.service.as_str())
            .and_then(|s| s.port);
        match port {
            Some(port) => {
                eprintln!(
                    "moat: {}:{} is answered in the workspace by service {:?} (the policy's \
                     local route)",
                    route.host,
                    route.port,
                    route.service.as_str()
                );
                routes.push(moat_guest_init::LocalRoute {
                    host: route.host.clone(),
                    port: route.port,
                    target: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                });
            }
            None => eprintln!(
                "moat: the policy routes {} to service {:?}, which this workspace does not run \
                 with a port (--service {}:PORT=...): flows to it go to the egress proxy",
                route.host,
                route.service.as_str(),
                route.service.as_str()
            ),
        }
    }
    routes
}

/// `__guest-init --local-route HOST:PORT=SERVICE_PORT`.
fn parse_local_route(text: &str) -> Result<moat_guest_init::LocalRoute> {
    let parsed = text.split_once('=').and_then(|(name, to)| {
        let (host, port) = name.rsplit_once(':')?;
        Some(moat_guest_init::LocalRoute {
            host: host.to_owned(),
            port: port.parse().ok()?,
            target: std::net::SocketAddr::from(([127, 0, 0, 1], to.parse::<u16>().ok()?)),
        })
    });
    parsed.with_context(|| format!("--local-route {text:?} is not HOST:PORT=SERVICE_PORT"))
}

/// Which backend runs the workspace.
enum Backend {
    Vm(VmImages, PathBuf),
    Namespace(RootFs),
}

/// The first option given that only the namespace backend takes, if any: `auto` then chooses
/// the namespace backend, whatever KVM could do (a pod with its container's root, say).
fn namespace_only_option(args: &RunArgs) -> Option<&'static str> {
    [
        ("--rootfs", args.rootfs.is_some()),
        ("--host-root", args.host_root),
        ("--home", args.home.is_some()),
        ("--workdir", args.workdir.is_some()),
        ("--device", !args.device.is_empty()),
    ]
    .into_iter()
    .find_map(|(name, given)| given.then_some(name))
}

/// The backend, and why; a namespace backend's root is chosen afterwards ([`namespace_root`]).
/// `namespace_only` is an option given that only the namespace backend takes.
fn choose_backend(requested: &str, namespace_only: Option<&str>) -> Result<(Backend, String)> {
    let kvm = moat_host_probe::kvm_usable();
    // Which KVM module provides /dev/kvm: kvm_intel/kvm_amd use hardware virtualization;
    // kvm_pvm is nested PVM, where a Linux guest's user space cannot run.
    let flavour = moat_host_probe::kvm_flavour();
    let pvm = flavour == KvmFlavour::NestedPvm;
    let vm_parts = || -> Result<(VmImages, PathBuf), String> {
        Ok((vm_backend::find_images()?, vm_backend::find_vmm()?))
    };
    Ok(match requested {
        "vm" => {
            let (images, vmm) = vm_parts().map_err(|why| anyhow::anyhow!("--backend vm: {why}"))?;
            if !kvm {
                bail!("--backend vm: /dev/kvm is not available to this user");
            }
            let why = if pvm {
                "requested with --backend vm; /dev/kvm is nested PVM here, where the guest \
                 kernel boots but its user space cannot run"
            } else {
                "requested with --backend vm"
            };
            (Backend::Vm(images, vmm), why.to_owned())
        }
        "namespace" => (
            Backend::Namespace(RootFs::Host),
            "requested with --backend namespace".to_owned(),
        ),
        "auto" if kvm && flavour.is_hardware() => {
            let vm = match namespace_only {
                Some(option) => Err(format!("{option} is the namespace backend's")),
                None => vm_parts(),
            };
            match vm {
                Ok((images, vmm)) => (
                    Backend::Vm(images, vmm),
                    "/dev/kvm has hardware virtualization".to_owned(),
                ),
                Err(why) => (
                    Backend::Namespace(RootFs::Host),
                    format!("/dev/kvm has hardware virtualization, but {why}"),
                ),
            }
        }
        "auto" if kvm && pvm => (
            Backend::Namespace(RootFs::Host),
            "/dev/kvm is nested PVM, where a Linux guest's user space cannot run".to_owned(),
        ),
        "auto" if kvm => (
            Backend::Namespace(RootFs::Host),
            "/dev/kvm is neither kvm_intel, kvm_amd nor kvm_pvm".to_owned(),
        ),
        "auto" => (
            Backend::Namespace(RootFs::Host),
            "/dev/kvm is not available to this user".to_owned(),
        ),
        other => bail!("unknown backend {other:?} (auto, vm or namespace)"),
    })
}

pub(crate) fn run(mut args: RunArgs) -> Result<ExitCode> {
    tracing::debug!("moat run: start");
    // The egress proxy runs in this process: it holds the secret values and the workspace
    // CA's key. `__guest-init` and the VMM are exec'd, so they start dumpable again.
    moat_broker_client::keep_memory_private()?;
    // Read first: a bad enrolment directory is reported before anything starts, and the
    // workspace's name at the broker names it in the audit log too.
    let enrolment = match &args.tunnel {
        Some(dir) => {
            let enrolment = moat_broker_client::enrolment::read_dir(dir).with_context(|| {
                format!("--tunnel {}: not an enrolment directory", dir.display())
            })?;
            args.proxy
                .default_workspace(enrolment.tunnel.workspace.as_str());
            Some(enrolment)
        }
        None => None,
    };
    let (mut backend, why) = choose_backend(&args.backend, namespace_only_option(&args))?;
    tracing::debug!("backend chosen");
    let services = workspace_services(&args)?;
    match &mut backend {
        Backend::Vm(images, _) => {
            eprintln!("moat: backend vm ({why})");
            if !args.device.is_empty() {
                bail!(
                    "--device gives a host device node to a service of the namespace backend; a \
                     VM's service gets the GPU's nodes (--gpu) in a --services file's devices"
                );
            }
            if args.home.is_some() {
                bail!(
                    "--home is a directory of the namespace backend; the vm backend takes --home-disk"
                );
            }
            if args.workdir.is_some() {
                bail!("--workdir is the namespace backend's for now; the VM starts in the home");
            }
            if args.rootfs.is_some() || args.host_root {
                bail!(
                    "--rootfs and --host-root choose the namespace backend's root; the VM boots \
                     the root image `cargo xtask images` built, or the one --image names"
                );
            }
            if let Some(image) = &args.image {
                let unpacked = workspace_root::from_image(image)?;
                images.rootfs = workspace_root::image_disk(&unpacked)?;
            }
            if let Some(dir) = &args.from_snapshot {
                // The template's machine: its memory and vCPUs, whatever the defaults are.
                let t = vm_backend::Template::read(dir)?;
                args.mem = t.mem_mib;
                args.vcpus = t.vcpus;
            }
            if (args.snapshot_to.is_some()
                || args.from_snapshot.is_some()
                || args.api_sock.is_some())
                && !args.gpu.is_empty()
            {
                bail!("a VM with a passed-through GPU cannot be snapshotted or restored");
            }
            if let Some(path) = &args.api_sock {
                vm_backend::check_api_sock(path)?;
            }
        }
        Backend::Namespace(root) => {
            if args.snapshot_to.is_some() || args.from_snapshot.is_some() || args.pool.is_some() {
                bail!("--snapshot-to, --from-snapshot and --pool need the vm backend ({why})");
            }
            if args.api_sock.is_some() {
                bail!(
                    "--api-sock is moat-vmm's control socket (pause, resume, snapshot): it needs \
                     the vm backend ({why})"
                );
            }
            if !args.gpu.is_empty() {
                bail!("--gpu passes a device through to a VM: it needs the vm backend ({why})");
            }
            if !services.is_empty() && !nix::unistd::Uid::effective().is_root() {
                bail!(
                    "workspace services need moat run as root in the namespace backend: each \
                     runs as a host uid of its own (an unprivileged user can map only its own, \
                     and a service that is the agent's uid on the host is the agent's to signal \
                     and read); or use the vm backend"
                );
            }
            eprintln!("moat: backend namespace ({why})");
            eprintln!(
                "moat: the namespace backend shares the host kernel: isolation is weaker than a VM's"
            );
            *root = match &args.image {
                Some(image) => RootFs::Image(workspace_root::from_image(image)?.root),
                None => workspace_root::choose(args.rootfs.as_deref(), args.host_root, || {
                    vm_backend::find_root_dir()
                })?,
            };
            match root {
                RootFs::Image(dir) => eprintln!("moat: the workspace's root: {}", dir.display()),
                RootFs::Host => eprintln!(
                    "moat: --host-root: the workspace's root is this host's, read-only: the agent \
                     reads every host file the workspace's uid may read outside /tmp, /run, \
                     /home and /root"
                ),
            }
        }
    }

    // The log directory, only where a log goes there (the default audit log, sshd's), and
    // before the run directory exists, so that an error here leaves nothing behind.
    let logs_dir = if args.proxy.audit_given() && enrolment.is_none() {
        None
    } else {
        Some(logs_dir()?)
    };
    // mkdtemp: a fresh directory with an unpredictable name, ours alone (0700); a directory
    // someone else prepared under a guessable name would be theirs to fill with symlinks.
    let template = std::env::temp_dir().join("moat-XXXXXX");
    let run_dir = nix::unistd::mkdtemp(&template)
        .with_context(|| format!("cannot create a run directory like {}", template.display()))?;
    // The logs that outlive the workspace are named after the run directory, created at once,
    // exclusively, never through a link someone planted. Without a log directory (--audit
    // given, no sshd), nothing is ever written under `logs_base`.
    eprintln!("moat: run directory: {}", run_dir.display());
    let logs_base = logs_dir
        .as_deref()
        .unwrap_or(&run_dir)
        .join(run_dir.file_name().unwrap_or_default());
    let mut logs = Vec::new();
    let audit = default_audit(&logs_base);
    if args.proxy.audit_path(&audit) == audit {
        logs.push(audit);
    }
    if enrolment.is_some() {
        logs.push(sshd_log(&logs_base));
    }
    let result = logs
        .iter()
        .try_for_each(|log| create_private(log))
        .and_then(|()| {
            run_in(
                &args,
                enrolment,
                backend,
                &services,
                &RunPaths {
                    run_dir: &run_dir,
                    logs_base: &logs_base,
                },
            )
        });
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

/// Where a workspace's files live on the host.
struct RunPaths<'a> {
    /// Sockets and the workspace's own files; removed at exit.
    run_dir: &'a std::path::Path,
    /// The logs that outlive the workspace: `<logs_base>.audit.jsonl`, `<logs_base>.sshd.log`.
    logs_base: &'a std::path::Path,
}

/// The directory of the logs that outlive workspaces: root's in /var/log/moat, anyone else's
/// in `$XDG_STATE_HOME/moat` (`~/.local/state/moat`). On disk, not in the temporary directory
/// (often memory, and emptied at boot: a flood of audit records would fill memory, and the
/// record of what an agent did would not survive a reboot). Created 0700.
fn logs_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/log/moat")
    } else {
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .context(
                "neither XDG_STATE_HOME nor HOME is set, so there is no directory for the logs \
                 that outlive the workspace: set one, or give --audit PATH",
            )?;
        state.join("moat")
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    Ok(dir)
}

/// Warns when the audit log is on a file system in memory (tmpfs).
fn warn_if_in_memory(audit: &std::path::Path) {
    let dir = audit.parent().unwrap_or(std::path::Path::new("."));
    if let Ok(fs) = nix::sys::statfs::statfs(dir)
        && fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
    {
        eprintln!(
            "moat: warning: the audit log {} is on tmpfs (memory): it does not survive a \
             reboot, and what it holds takes memory",
            audit.display()
        );
    }
}

/// The audit log unless `--audit` names another, in the log directory (created exclusively by
/// [`run`] right after the run directory, under the run directory's unique name).
fn default_audit(logs_base: &std::path::Path) -> PathBuf {
    logs_base.with_extension("audit.jsonl")
}

/// sshd's log (namespace backend with `--tunnel`), beside the audit log.
fn sshd_log(logs_base: &std::path::Path) -> PathBuf {
    logs_base.with_extension("sshd.log")
}

/// Creates `path` empty and 0600, refusing an existing file or a link in its place.
fn create_private(path: &std::path::Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
        .with_context(|| format!("cannot create {}", path.display()))
}

fn run_in(
    args: &RunArgs,
    enrolment: Option<WorkspaceEnrolment>,
    backend: Backend,
    services: &[ServiceSpec],
    paths: &RunPaths<'_>,
) -> Result<ExitCode> {
    use std::os::unix::fs::PermissionsExt;
    let run_dir = paths.run_dir;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))?;
    let home = match &args.home {
        Some(h) => h.clone(),
        None => {
            let h = run_dir.join("home");
            std::fs::create_dir_all(&h)?;
            h
        }
    };
    // A pool's machine is claimed first: its sockets are where its moat-vmm already looks.
    let mut claimed = match (&backend, &args.pool) {
        (Backend::Vm(..), Some(socket)) => {
            let c = crate::pool::claim(socket)?;
            eprintln!(
                "moat: claimed a {} MiB, {} vCPU machine from the pool on {}",
                c.mem_mib,
                c.vcpus,
                socket.display()
            );
            tracing::debug!("claimed");
            vm_backend::take_over(&c)?;
            Some(Box::new(c))
        }
        _ => None,
    };
    // The vm backend's sockets get a directory of their own: moat-vmm's jail sees only it.
    let uds = match &backend {
        Backend::Vm(..) if claimed.is_some() => {
            claimed.as_ref().map(|c| c.uds.clone()).unwrap_or_default()
        }
        Backend::Vm(..) => {
            let dir = run_dir.join("sock");
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.join("vsock")
        }
        Backend::Namespace(_) => run_dir.join("vsock"),
    };
    let default_audit = default_audit(paths.logs_base);
    let (mut config, resolver, audit) = args.proxy.build(uds.clone(), &default_audit)?;
    let audit_path = args.proxy.audit_path(&default_audit);
    if audit_path.as_os_str() != "-" {
        warn_if_in_memory(&audit_path);
    }
    // Run by root, the namespace backend's workspace is a host id of its own, leased here for
    // as long as this process runs; a fresh home is given to it.
    let lease = match &backend {
        Backend::Namespace(_) if nix::unistd::Uid::effective().is_root() => {
            let lease = moat_guest_init::ids::lease(
                std::path::Path::new(moat_guest_init::ids::STATE_DIR),
                &home,
                args.home.is_some(),
            )?;
            if args.home.is_none() {
                std::os::unix::fs::chown(&home, Some(lease.id()), Some(lease.id()))
                    .and_then(|()| {
                        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
                    })
                    .with_context(|| format!("cannot give {} to the workspace", home.display()))?;
            }
            eprintln!(
                "moat: run as root: the workspace's root is host uid and gid {}, its own, not 0",
                lease.id()
            );
            Some(lease)
        }
        _ => None,
    };
    // And one for each service: never the agent's, on the host too.
    let service_leases = match &lease {
        Some(_) => services
            .iter()
            .map(|_| {
                moat_guest_init::ids::lease(
                    std::path::Path::new(moat_guest_init::ids::STATE_DIR),
                    run_dir,
                    false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    // Read once: the routes and checks below and the proxy's enforcement see one policy.
    let loaded = config.source.load_attested()?;
    let policy = &loaded.0;
    // Chosen by the signed policy in force at start (a reload does not change them).
    let routes = local_routes(policy, services);
    if let Backend::Namespace(root) = &backend {
        // Nothing the agent must not read may be in its view: refused before anything starts.
        let mut private: Vec<(String, PathBuf, bool)> = policy
            .secrets
            .iter()
            .filter_map(|s| match &s.source {
                moat_policy::SecretSource::File(path) => Some((
                    format!("the secret {:?}'s source", s.name),
                    path.clone(),
                    false,
                )),
                _ => None,
            })
            .collect();
        if let Some(dir) = &args.tunnel {
            private.push(("the enrolment directory".into(), dir.clone(), false));
        }
        // Its group becomes the workspace's (PID 1 reaches the sockets through it).
        private.push(("the run directory".into(), run_dir.to_owned(), true));
        if audit_path.as_os_str() != "-" {
            private.push(("the audit log".into(), audit_path.clone(), false));
        }
        // A service's models are its alone: shown only in its view.
        for spec in services {
            if let Some(models) = &spec.models {
                private.push((
                    format!("service {:?}'s models", spec.name),
                    models.clone(),
                    false,
                ));
            }
        }
        // Whoever reads it can sign checkpoints of a rewritten log.
        private.push(("the audit key".into(), args.proxy.audit_key_path()?, false));
        Exposure::new(root, &home, lease.as_ref().map(|l| l.id())).refuse_visible(&private)?;
    }
    // Reached through the broker, corporate flows leave through the tunnel's host side.
    let corporate_uds = run_dir.join("corporate.sock");
    if args.tunnel.is_some() {
        config.corporate_uds = Some(corporate_uds.clone());
    }
    let rt = args.proxy.runtime()?;
    tracing::debug!("policy loaded");
    let proxy = rt.block_on(async { Proxy::start_loaded(config, resolver, audit, loaded) })?;
    tracing::debug!("proxy started");
    // Process events from guest-init go to the same audit log, as OCSF Process Activity,
    // through the same writer: one chain per file.
    let process_audit = proxy.audit_handle();
    let audit_socket = moat_egress::port_path(&uds, GUEST_AUDIT_VSOCK_PORT);
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Bound here, before the workspace starts: both backends hand it to the workspace's ids.
    let audit_listener = {
        let _guard = rt.enter();
        guest_audit::bind(&audit_socket)
            .with_context(|| format!("cannot listen on {}", audit_socket.display()))?
    };
    rt.spawn(guest_audit::serve(
        audit_listener,
        process_audit,
        shutdown.clone(),
    ));
    eprintln!(
        "moat: egress proxy up (policy {:?}), audit: {}",
        proxy.policy_name(),
        args.proxy.audit_path(&default_audit).display()
    );

    // The workspace trusts the proxy's interception CA (certificate only; the key stays in
    // this process), plus any --ca the user gave.
    let ca_bundle = run_dir.join("workspace-ca.pem");
    let mut pem = proxy.ca_pem().to_owned();
    if let Some(extra) = &args.ca {
        let text = std::fs::read_to_string(extra)
            .with_context(|| format!("cannot read {}", extra.display()))?;
        pem.push('\n');
        pem.push_str(&text);
    }
    std::fs::write(&ca_bundle, pem)
        .with_context(|| format!("cannot write {}", ca_bundle.display()))?;

    // Reached through the broker: the tunnel kept up from here, sessions answered inside.
    let tunnel = match enrolment {
        Some(enrolment) => Some(start_tunnel(
            enrolment,
            &rt,
            &uds,
            &corporate_uds,
            &shutdown,
        )?),
        None => None,
    };
    let hostname = tunnel
        .as_ref()
        .map_or_else(|| "workspace".to_owned(), |t| t.hostname.clone());

    let code = match backend {
        Backend::Vm(images, vmm) => {
            let (rows, cols) = vm_backend::terminal_size();
            vm_backend::run(
                &rt,
                vm_backend::VmRun {
                    images,
                    vmm,
                    run_dir,
                    uds: &uds,
                    home_disk: args.home_disk.clone(),
                    mem_mib: args.mem,
                    vcpus: args.vcpus,
                    boot_log: args.boot_log,
                    gpus: args.gpu.clone(),
                    api_sock: args.api_sock.clone(),
                    mode: match (&args.snapshot_to, &args.from_snapshot, claimed.take()) {
                        (_, _, Some(c)) => vm_backend::VmMode::Claim(c),
                        (Some(dir), _, None) => vm_backend::VmMode::Template(dir.clone()),
                        (None, Some(dir), None) => vm_backend::VmMode::Restore(dir.clone()),
                        (None, None, None) => vm_backend::VmMode::Boot,
                    },
                    workspace: VmWorkspace {
                        hostname,
                        command: args.command.clone(),
                        // The terminal the agent's shell will drive, and the language it speaks;
                        // the secrets' placeholders, in the variables they name.
                        env: ["TERM", "LANG", "COLORTERM"]
                            .iter()
                            .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
                            .chain(agent_env(&proxy, args))
                            .collect(),
                        ca_pem: std::fs::read_to_string(&ca_bundle)?,
                        interactive: std::io::IsTerminal::is_terminal(&std::io::stdin()),
                        rows,
                        cols,
                        ssh: tunnel.map(|t| t.service),
                        flow_header_version: moat_egress::FLOW_HEADER_VERSION,
                        services: services.to_vec(),
                        local_routes: routes
                            .iter()
                            .map(|r| moat_guest_init::control::VmLocalRoute {
                                host: r.host.clone(),
                                port: r.port,
                                service_port: r.target.port(),
                            })
                            .collect(),
                        generation: if args.from_snapshot.is_some() || args.pool.is_some() {
                            vm_backend::new_generation()
                        } else {
                            0
                        },
                        trace_steps: args.boot_log,
                        // Stamped when the line is sent.
                        realtime_ns: 0,
                    },
                },
            )?
        }
        Backend::Namespace(root) => run_namespace(
            args,
            &rt,
            &proxy,
            &audit_socket,
            &NamespaceRun {
                paths,
                root: &root,
                host_id: lease.as_ref().map(|l| l.id()),
                home: &home,
                services,
                service_host_ids: service_leases.iter().map(|l| l.id()).collect(),
                local_routes: &routes,
            },
            &ca_bundle,
            &hostname,
            tunnel.as_ref(),
        )?,
    };
    proxy.shutdown();
    shutdown.cancel();
    drop(rt);
    // The run's signed end record: every flow and process event is in by now.
    if !proxy.audit().finish() {
        eprintln!("moat: the audit log's end record could not be written");
    }
    let m = proxy.metrics();
    let accepted = m.accepted.load(std::sync::atomic::Ordering::Relaxed);
    let opened = m.opened.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "moat: workspace exited with status {code}; {opened} of {accepted} flows allowed \
         (audit: {})",
        args.proxy.audit_path(&default_audit).display()
    );
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The agent's variables beyond the basics: the secrets' placeholders in the variables they
/// name, then `--env`'s, except where one names a placeholder's variable (the placeholder
/// stays: a secret rule may require it).
fn agent_env(proxy: &Proxy, args: &RunArgs) -> Vec<(String, String)> {
    let mut env = proxy.agent_env();
    let own = args
        .env
        .iter()
        .filter(|(name, _)| !env.iter().any(|(n, _)| n == name))
        .cloned()
        .collect::<Vec<_>>();
    env.extend(own);
    env
}

/// A workspace reached through the broker.
struct Tunnel {
    /// The workspace's name at the broker, also its hostname.
    hostname: String,
    /// What its sshd needs.
    service: SshService,
}

/// Keeps the enrolled workspace's tunnel to the broker up (on `rt`, until `shutdown`),
/// connecting the broker's streams to the workspace's port 22 through `uds` and taking the
/// egress proxy's corporate flows on `corporate_uds`.
fn start_tunnel(
    enrolment: WorkspaceEnrolment,
    rt: &tokio::runtime::Runtime,
    uds: &std::path::Path,
    corporate_uds: &std::path::Path,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Tunnel> {
    let connector = Connector::new(ConnectorConfig {
        broker: enrolment.tunnel.broker.clone(),
        server_name: enrolment.tunnel.server_name.clone(),
        cert_pem: enrolment.cert_pem.clone(),
        key_pem: enrolment.key_pem.clone(),
        broker_ca_pem: enrolment.broker_ca_pem.clone(),
        uds: uds.to_owned(),
        ports: vec![moat_guest_init::session::SSH_PORT],
        egress_uds: Some(corporate_uds.to_owned()),
    })
    .context("--tunnel: the enrolment's identity")?;
    let stop = shutdown.clone();
    rt.spawn(async move { connector.run(stop).await });
    let workspace = enrolment.tunnel.workspace.as_str().to_owned();
    eprintln!(
        "moat: reachable through the broker at {} as {workspace}: \
         ssh -o ProxyCommand='moat ssh %n' {}@{workspace}",
        enrolment.tunnel.broker,
        moat_broker_client::enrolment::WORKSPACE_SSH_USER,
    );
    eprintln!("moat: its host key: {}", enrolment.ssh_host_key_pub);
    Ok(Tunnel {
        hostname: workspace,
        service: SshService {
            user: moat_broker_client::enrolment::WORKSPACE_SSH_USER.to_owned(),
            // Only certificates the broker issued for this workspace.
            principal: moat_broker_client::protocol::workspace_principal(
                moat_broker_client::enrolment::WORKSPACE_SSH_USER,
                &enrolment.tunnel.workspace,
            ),
            host_key: enrolment.ssh_host_key,
            host_certificate: enrolment.ssh_host_certificate,
            user_ca: enrolment.ssh_user_ca,
        },
    })
}

/// Where the namespace backend's workspace lives on the host.
struct NamespaceRun<'a> {
    paths: &'a RunPaths<'a>,
    root: &'a RootFs,
    /// Run by root: the host id leased for the workspace.
    host_id: Option<u32>,
    home: &'a std::path::Path,
    services: &'a [ServiceSpec],
    /// Run by root: each service's own host id.
    service_host_ids: Vec<u32>,
    /// The policy's local routes to those services.
    local_routes: &'a [moat_guest_init::LocalRoute],
}

/// The namespace backend: `moat __guest-init` in fresh namespaces; returns the agent's exit code.
#[allow(clippy::too_many_arguments)]
fn run_namespace(
    args: &RunArgs,
    rt: &tokio::runtime::Runtime,
    proxy: &Proxy,
    audit_socket: &std::path::Path,
    ns: &NamespaceRun<'_>,
    ca_bundle: &std::path::Path,
    hostname: &str,
    tunnel: Option<&Tunnel>,
) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find the moat binary")?;
    let run_dir = ns.paths.run_dir;
    let mut guest_init = Command::new(exe);
    // PID 1 gets no environment of ours: a secret read from an environment variable (a
    // `[[secrets]]` source) stays in this process, not in the workspace's processes (the agent
    // gets a fresh environment from PID 1). What the agent's terminal needs is passed on.
    guest_init.env_clear();
    for key in [
        "TERM",
        "LANG",
        "COLORTERM",
        "PATH",
        "MOAT_LOG",
        "RUST_BACKTRACE",
    ] {
        if let Some(value) = std::env::var_os(key) {
            guest_init.env(key, value);
        }
    }
    guest_init
        .arg("__guest-init")
        .arg("--hostname")
        .arg(hostname);
    match ns.root {
        RootFs::Image(dir) => guest_init.arg("--root").arg(dir),
        RootFs::Host => guest_init.arg("--host-root"),
    };
    if let Some(id) = ns.host_id {
        guest_init.arg("--host-id").arg(id.to_string());
    }
    if let Some(tunnel) = tunnel {
        // The host key goes through a file only this user can read, not the command line.
        let service = run_dir.join("ssh-service.json");
        let json = serde_json::to_vec(&tunnel.service)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&service)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &json))
            .with_context(|| format!("cannot write {}", service.display()))?;
        // Beside the audit log, outliving the workspace like it.
        let log = sshd_log(ns.paths.logs_base);
        eprintln!("moat: sshd's log: {}", log.display());
        guest_init
            .arg("--ssh")
            .arg(&service)
            .arg("--ssh-log")
            .arg(log);
    }
    if !ns.services.is_empty() {
        let path = run_dir.join("services.json");
        std::fs::write(&path, serde_json::to_vec(ns.services)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        guest_init.arg("--services").arg(&path);
        for id in &ns.service_host_ids {
            guest_init.arg("--service-host-id").arg(id.to_string());
        }
    }
    for route in ns.local_routes {
        guest_init.arg("--local-route").arg(format!(
            "{}:{}={}",
            route.host,
            route.port,
            route.target.port()
        ));
    }
    // The secrets' placeholders (drawn for this workspace, or fixed), in the variables they
    // name: not secret, so the command line may carry them.
    for (name, value) in agent_env(proxy, args) {
        guest_init.arg("--agent-env").arg(format!("{name}={value}"));
    }
    if let Some(dir) = &args.workdir {
        guest_init.arg("--workdir").arg(dir);
    }
    let mut child = guest_init
        .arg("--flow-socket")
        .arg(proxy.listen_path())
        .arg("--flow-header-version")
        .arg(moat_egress::FLOW_HEADER_VERSION.to_string())
        .arg("--audit-socket")
        .arg(audit_socket)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--home")
        .arg(ns.home)
        .arg("--ca")
        .arg(ca_bundle)
        .arg("--")
        .args(&args.command)
        .spawn()
        .context("cannot start the workspace")?;
    let child_pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Ctrl-C belongs to the agent's shell; SIGTERM tears the workspace down.
    rt.spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {
                    // Orderly first: SIGTERM travels to the agent; whatever is left after the
                    // grace period is killed with the namespace.
                    let _ = nix::sys::signal::kill(child_pid, nix::sys::signal::Signal::SIGTERM);
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        let _ = nix::sys::signal::kill(child_pid, nix::sys::signal::Signal::SIGKILL);
                    });
                }
            }
        }
    });
    let status = child.wait()?;
    Ok(moat_guest_init::exit_code(status))
}

pub(crate) fn guest_init(args: GuestInitArgs) -> Result<ExitCode> {
    // Dies with `moat run`, so no workspace outlives its proxy.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let ssh = match &args.ssh {
        Some(path) => {
            let json =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let _ = std::fs::remove_file(path);
            Some(moat_guest_init::SshSetup {
                service: serde_json::from_slice(&json)
                    .with_context(|| format!("invalid {}", path.display()))?,
                // The workspace's vsock-convention socket, as for a VM.
                listen: args.run_dir.join("vsock"),
                log: args.ssh_log.clone(),
            })
        }
        None => None,
    };
    let root = match (args.root, args.host_root) {
        (Some(dir), false) => RootFs::Image(dir),
        (None, true) => RootFs::Host,
        _ => bail!("__guest-init takes one of --root DIR and --host-root"),
    };
    let env = args
        .agent_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--agent-env {kv:?} is not NAME=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let services = match &args.services {
        Some(path) => {
            let json =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&json).with_context(|| format!("invalid {}", path.display()))?
        }
        None => Vec::new(),
    };
    let local_routes = args
        .local_route
        .iter()
        .map(|r| parse_local_route(r))
        .collect::<Result<Vec<_>>>()?;
    let config = moat_guest_init::WorkspaceConfig {
        local_routes,
        services,
        service_host_ids: args.service_host_id,
        flow_socket: args.flow_socket,
        audit_socket: args.audit_socket,
        run_dir: args.run_dir,
        root,
        host_id: args.host_id,
        hostname: args.hostname,
        ssh,
        flow_header_version: args.flow_header_version,
        extra_ca: args.ca,
        agent: moat_guest_init::AgentSpec {
            command: args.command,
            home: args.home,
            env,
            workdir: args.workdir,
        },
    };
    let code = moat_guest_init::run_namespace(&config)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// `moat __exec`: `args.command` in the running namespace workspace under
/// `args.workspace_pid`, confined like its agent; exits with the command's status.
pub(crate) fn exec(args: ExecArgs) -> Result<ExitCode> {
    // An exec may come as soon as the container is started, before the workspace is up.
    let init = moat_guest_init::enter::wait_for_init(
        args.workspace_pid,
        std::time::Duration::from_secs(60),
    )?;
    let spec = moat_guest_init::AgentSpec {
        command: args.command,
        home: moat_guest_init::enter::AGENT_HOME.into(),
        env: args.env,
        workdir: args.workdir,
    };
    let code = moat_guest_init::enter::exec_in(init, &spec)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
