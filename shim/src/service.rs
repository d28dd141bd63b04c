//! The shim v2 task service: containerd's calls on one pod's containers.
//!
//! One shim process serves one pod (containerd groups a pod's containers by their sandbox id)
//! or one container outside any pod (`ctr run`). One pod is one workspace:
//!
//! - the pod's sandbox (pause) container gets a placeholder process that holds the pod's
//!   lifetime (this binary, `pod-hold`); its image is never run;
//! - the pod's application container is the workspace's agent: `moat run` on the container's
//!   root file system, with its args, environment and working directory, the pod's profile and
//!   the node's keys, audit to the pod's own file; a second application container is refused;
//! - a pod that names one of the node's warm pools (`moat.dev/pool`) is instead a VM claimed
//!   from that pool (`moat run --backend vm --pool SOCKET`), whose root is the pool template's
//!   image: the container's root file system is not even mounted;
//! - an exec (`ctr task exec`, the CRI's ExecSync) is `moat __exec`: the command joins the
//!   running workspace, confined like its agent; a pooled pod's VM has no namespaces to join,
//!   so an exec into it is refused.
//!
//! Exits come from the library's reaper (the shim is the subreaper of everything it starts)
//! and are published to containerd as runc's shim publishes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim as shim;
use containerd_shim::api;
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{Code, Status as RpcStatus};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};
use log::{info, warn};

use crate::io::StdioPaths;
use crate::node::NodeConfig;
use crate::pod::{self, Kind, Process, Spec};

/// The argument that makes this binary the pod sandbox's placeholder process.
pub const POD_HOLD: &str = "pod-hold";

/// Where a process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Stopped,
}

/// A container's init process or an exec.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    state: State,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    stdio: StdioPaths,
    /// What runs: the container's process, or the exec's.
    process: Process,
}

impl Proc {
    fn new(process: Process, stdio: StdioPaths) -> Proc {
        Proc {
            pid: 0,
            state: State::Created,
            exit_status: 0,
            exited_at: None,
            stdio,
            process,
        }
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    kind: Kind,
    /// Named in audit records: `<namespace>/<pod>`.
    workspace: String,
    profile: pod::ProfileChoice,
    /// Its own root file system, or a VM claimed from one of the node's pools.
    placement: pod::Placement,
    /// Whether the shim mounted the root file system at `<bundle>/rootfs`.
    mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

#[derive(Debug, Default)]
struct Pods {
    containers: HashMap<String, Container>,
}

impl Pods {
    /// The container `id`, or NOT_FOUND.
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers.get(id).ok_or_else(|| not_found(id))
    }

    /// The container `id` to change, or NOT_FOUND.
    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers.get_mut(id).ok_or_else(|| not_found(id))
    }

    /// The process a request names: the container's own (`exec_id` empty) or one of its execs.
    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<&Proc> {
        let container = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(&container.init);
        }
        container
            .execs
            .get(exec_id)
            .ok_or_else(|| not_found(exec_id))
    }
}

/// The shim: what containerd starts, and the task service it serves.
#[derive(Clone)]
pub struct Service {
    namespace: String,
    exit: Arc<ExitSignal>,
    state: Arc<(Mutex<Pods>, Condvar)>,
    publisher: Option<Arc<RemotePublisher>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn error(code: Code, message: impl Into<String>) -> shim::protos::ttrpc::Error {
    let mut status = RpcStatus::new();
    status.code = code.into();
    status.message = message.into();
    shim::protos::ttrpc::Error::RpcStatus(status)
}

fn now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    ts
}

impl shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut shim::Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
            state: Arc::new((Mutex::new(Pods::default()), Condvar::new())),
            publisher: None,
        }
    }

    fn start_shim(&mut self, opts: shim::StartOpts) -> Result<String, shim::Error> {
        // A pod's containers share one shim (the pod's workspace lives in it): grouped by
        // the sandbox id, as runc's shim groups them.
        let grouping = Spec::read(Path::new("."))
            .ok()
            .and_then(|spec| spec.sandbox_id().map(str::to_owned))
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        // The shim is gone (killed, crashed): its workspaces died with it (each `moat run`
        // dies with its parent's death signal chain). What is left is the root mount.
        if let Ok(cwd) = std::env::current_dir() {
            let _ = nix::mount::umount2(&cwd.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        }
        let mut response = DeleteResponse::new();
        response.exit_status = 128 + 9;
        response.exited_at = Some(now()).into();
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut service = self.clone();
        service.publisher = Some(Arc::new(publisher));
        service.watch_exits();
        service
    }
}

impl Service {
    fn lock(&self) -> MutexGuard<'_, Pods> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(publisher) = &self.publisher
            && let Err(e) = publisher.publish(Context::default(), topic, &self.namespace, event)
        {
            warn!("cannot publish {topic}: {e}");
        }
    }

    /// Takes every exit the reaper sees, marks the process it ends and tells containerd.
    fn watch_exits(&self) {
        let subscription = match shim::monitor::monitor_subscribe(Topic::Pid) {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot watch exits: {e}");
                return;
            }
        };
        let service = self.clone();
        std::thread::spawn(move || {
            while let Ok(event) = subscription.rx.recv() {
                let Subject::Pid(pid) = event.subject else {
                    continue;
                };
                service.exited(u32::try_from(pid).unwrap_or(0), event.exit_code);
            }
        });
    }

    fn exited(&self, pid: u32, code: i32) {
        let mut pods = self.lock();
        let mut events = Vec::new();
        for (id, container) in &mut pods.containers {
            let procs = std::iter::once((id.clone(), &mut container.init))
                .chain(container.execs.iter_mut().map(|(e, p)| (e.clone(), p)));
            for (exec_id, proc) in procs {
                if proc.pid == pid && proc.state == State::Running {
                    proc.state = State::Stopped;
                    proc.exit_status = u32::try_from(code).unwrap_or(255);
                    let at = now();
                    proc.exited_at = Some(at.clone());
                    events.push(TaskExit {
                        container_id: id.clone(),
                        id: exec_id,
                        pid,
                        exit_status: proc.exit_status,
                        exited_at: Some(at).into(),
                        ..Default::default()
                    });
                }
            }
        }
        drop(pods);
        self.state.1.notify_all();
        for event in events {
            info!(
                "{} ({}) exited with status {}",
                event.container_id, event.id, event.exit_status
            );
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event));
        }
    }

    fn node() -> TtrpcResult<NodeConfig> {
        let path = NodeConfig::path();
        NodeConfig::load(&path).map_err(|e| error(Code::FAILED_PRECONDITION, pod::error_chain(&e)))
    }

    /// Starts `moat run` for an application container (the workspace and its agent).
    fn spawn_workspace(container: &Container, node: &NodeConfig) -> std::io::Result<u32> {
        let streams = container.init.stdio.open()?;
        create_private_dir(&node.audit_dir)?;
        let child = workspace_command(container, node)
            .stdin(streams.stdin)
            .stdout(streams.stdout)
            .stderr(streams.stderr)
            .spawn()?;
        // Never waited for here: the reaper collects it and tells `exited`.
        Ok(child.id())
    }

    /// Starts `moat __exec` for an exec in the workspace `moat run` (`workspace_pid`) runs.
    fn spawn_exec(workspace_pid: u32, exec: &Proc, node: &NodeConfig) -> std::io::Result<u32> {
        let streams = exec.stdio.open()?;
        let mut cmd = Command::new(node.moat_binary());
        cmd.env_clear().env("MOAT_LOG", "warn").args([
            "__exec",
            "--workspace-pid",
            &workspace_pid.to_string(),
        ]);
        for kv in exec.process.env_args() {
            cmd.arg("--env").arg(kv);
        }
        if let Some(dir) = exec.process.workdir() {
            cmd.arg("--workdir").arg(dir);
        }
        cmd.arg("--").args(&exec.process.args);
        let child = cmd
            .stdin(streams.stdin)
            .stdout(streams.stdout)
            .stderr(streams.stderr)
            .spawn()?;
        Ok(child.id())
    }

    /// The sandbox's placeholder: this binary, waiting for a signal.
    fn spawn_hold() -> std::io::Result<u32> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg(POD_HOLD)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(child.id())
    }
}

/// The `moat run` of an application container: on the container's root file system with the
/// node's backend, or a VM claimed from the pod's pool; then the pod's profile, audit file and
/// identity, the node's keys, CAs and sink, the container's environment and args.
fn workspace_command(container: &Container, node: &NodeConfig) -> Command {
    let audit = node.audit_dir.join(format!(
        "{}.audit.jsonl",
        pod::file_name(&container.workspace)
    ));
    let mut cmd = Command::new(node.moat_binary());
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MOAT_LOG", "warn");
    match &container.placement {
        pod::Placement::Rootfs => cmd
            .args(["run", "--backend", &node.backend, "--rootfs"])
            .arg(container.bundle.join("rootfs")),
        pod::Placement::Pool { socket, .. } => {
            cmd.args(["run", "--backend", "vm", "--pool"]).arg(socket)
        }
    };
    cmd.arg("--profile")
        .arg(&container.profile.profile)
        .arg("--pubkey")
        .arg(&container.profile.pubkey)
        .arg("--audit")
        .arg(&audit)
        .arg("--workspace")
        .arg(&container.workspace);
    if let Ok(tmp) = std::env::var("TMPDIR") {
        cmd.env("TMPDIR", tmp);
    }
    for r in &node.resolve {
        cmd.arg("--resolve").arg(r);
    }
    if let Some(ca) = &node.ca {
        cmd.arg("--ca").arg(ca);
    }
    if let Some(ca) = &node.upstream_ca {
        cmd.arg("--upstream-ca").arg(ca);
    }
    if let Some(endpoint) = &node.otlp_endpoint {
        cmd.arg("--otlp-endpoint").arg(endpoint);
    }
    if let Some(key) = &node.audit_key {
        cmd.arg("--audit-key").arg(key);
    }
    let process = &container.init.process;
    for kv in process.env_args() {
        cmd.arg("--env").arg(kv);
    }
    // A pooled VM starts in the agent's home: a pod asking for another working directory was
    // refused at create (`pod::placement`).
    if container.placement == pod::Placement::Rootfs
        && let Some(dir) = process.workdir()
    {
        cmd.arg("--workdir").arg(dir);
    }
    cmd.arg("--").args(&process.args);
    cmd
}

/// A directory only root reads (the audit logs).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn status_of(state: State) -> api::Status {
    match state {
        State::Created => api::Status::CREATED,
        State::Running => api::Status::RUNNING,
        State::Stopped => api::Status::STOPPED,
    }
}

/// Whether an exec may join `container`'s workspace: not a pooled pod's, since `moat __exec`
/// joins a namespace workspace's namespaces, and a VM has none on the host to join (what it
/// would find under `moat run` is the proxy's or the VMM's jail, never the workspace).
fn exec_allowed(container: &Container) -> TtrpcResult<()> {
    match &container.placement {
        pod::Placement::Rootfs => Ok(()),
        pod::Placement::Pool { name, .. } => Err(error(
            Code::UNIMPLEMENTED,
            format!(
                "pod {} runs in a VM from the pool {name:?}: moat cannot exec into a VM \
                 workspace (kubectl exec, ctr task exec); run what you need as the pod's \
                 command",
                container.workspace
            ),
        )),
    }
}

fn not_found(id: &str) -> shim::protos::ttrpc::Error {
    error(Code::NOT_FOUND, format!("no container {id} in this shim"))
}

impl shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let spec =
            Spec::read(&bundle).map_err(|e| error(Code::INVALID_ARGUMENT, pod::error_chain(&e)))?;
        if req.terminal {
            return Err(error(
                Code::UNIMPLEMENTED,
                "moat's shim gives no terminal yet (ctr run -t, kubectl run -t): run without one",
            ));
        }
        let node = Self::node()?;
        let kind = spec.kind();
        let workspace = spec.workspace_name(&self.namespace, &req.id);
        {
            let pods = self.lock();
            if kind != Kind::Sandbox
                && let Some((other, _)) = pods
                    .containers
                    .iter()
                    .find(|(_, c)| c.kind != Kind::Sandbox)
            {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "moat runs one application container per pod (one pod is one \
                         workspace): pod {workspace} already has container {other}, so \
                         container {} is refused",
                        req.id
                    ),
                ));
            }
        }
        // Where its workspace comes from, checked before anything is written: a pod naming a
        // pool the node does not keep fails at its sandbox already.
        let placement = pod::placement(&spec, &node, &workspace)
            .map_err(|e| error(Code::FAILED_PRECONDITION, pod::error_chain(&e)))?;
        // The pod's own profile, verified before anything starts: a bad one fails the pod.
        let pod_dir = node
            .state_dir
            .join(pod::file_name(spec.sandbox_id().unwrap_or(req.id.as_str())));
        let profile = pod::choose_profile(&spec, &node, &pod_dir)
            .map_err(|e| error(Code::FAILED_PRECONDITION, pod::error_chain(&e)))?;
        let mut mounted = false;
        // A pooled VM's root is its template's image: the container's is never used.
        if kind != Kind::Sandbox && placement == pod::Placement::Rootfs {
            let target = bundle.join("rootfs");
            for m in &req.rootfs {
                shim::mount::mount_rootfs(
                    Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                    Some(m.source.as_str()).filter(|s| !s.is_empty()),
                    &m.options,
                    &target,
                )
                .map_err(|e| {
                    error(
                        Code::INTERNAL,
                        format!("cannot mount the container's root file system: {e}"),
                    )
                })?;
                mounted = true;
            }
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let container = Container {
            bundle,
            kind,
            workspace,
            profile,
            placement,
            mounted,
            init: Proc::new(spec.process.clone().unwrap_or_default(), stdio),
            execs: HashMap::new(),
        };
        self.lock().containers.insert(req.id.clone(), container);
        info!("created {} ({kind:?})", req.id);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse::default())
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let node = Self::node()?;
        // Held from spawn to recording the pid: an exit the reaper sees at once waits for it.
        let mut pods = self.lock();
        let container = pods.container_mut(&req.id)?;
        let pid = if req.exec_id.is_empty() {
            if container.init.state != State::Created {
                return Err(error(Code::FAILED_PRECONDITION, "already started"));
            }
            let pid = match container.kind {
                Kind::Sandbox => Self::spawn_hold(),
                Kind::App | Kind::Standalone => Self::spawn_workspace(container, &node),
            }
            .map_err(|e| error(Code::INTERNAL, format!("cannot start {}: {e}", req.id)))?;
            container.init.pid = pid;
            container.init.state = State::Running;
            pid
        } else {
            if container.init.state != State::Running || container.kind == Kind::Sandbox {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("container {} runs no workspace to exec in", req.id),
                ));
            }
            let workspace_pid = container.init.pid;
            let exec = container
                .execs
                .get_mut(&req.exec_id)
                .ok_or_else(|| not_found(&req.exec_id))?;
            let pid = Self::spawn_exec(workspace_pid, exec, &node)
                .map_err(|e| error(Code::INTERNAL, format!("cannot start the exec: {e}")))?;
            exec.pid = pid;
            exec.state = State::Running;
            pid
        };
        drop(pods);
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pods = self.lock();
        let bundle = pods.container(&req.id)?.bundle.display().to_string();
        let proc = pods.process(&req.id, &req.exec_id)?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid: proc.pid,
            status: status_of(proc.state).into(),
            stdin: proc.stdio.stdin.clone(),
            stdout: proc.stdio.stdout.clone(),
            stderr: proc.stdio.stderr.clone(),
            terminal: false,
            exit_status: proc.exit_status,
            exited_at: proc.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pods = self.lock();
        let container = pods.container(&req.id)?;
        let processes = std::iter::once(&container.init)
            .chain(container.execs.values())
            .filter(|p| p.state == State::Running)
            .map(|p| shim::protos::types::task::ProcessInfo {
                pid: p.pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let pods = self.lock();
        let proc = pods.process(&req.id, &req.exec_id)?;
        if proc.state != State::Running {
            // runc's shim: killing a stopped process is not an error for containerd.
            return Ok(api::Empty::default());
        }
        let signal = nix::sys::signal::Signal::try_from(i32::try_from(req.signal).unwrap_or(0))
            .map_err(|_| error(Code::INVALID_ARGUMENT, format!("no signal {}", req.signal)))?;
        // `moat run` passes SIGTERM on to the agent; SIGKILL ends `moat run`, and the workspace
        // with it (each of its processes dies with its parent).
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(proc.pid).unwrap_or(0)),
            signal,
        )
        .map_err(|e| error(Code::INTERNAL, format!("cannot signal {}: {e}", proc.pid)))?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if req.terminal {
            return Err(error(
                Code::UNIMPLEMENTED,
                "moat's shim gives no terminal yet (ctr task exec -t, kubectl exec -t): exec without one",
            ));
        }
        let process: Process = serde_json::from_slice(&req.spec.value).map_err(|e| {
            error(
                Code::INVALID_ARGUMENT,
                format!("the exec's process spec: {e}"),
            )
        })?;
        let mut pods = self.lock();
        let container = pods.container_mut(&req.id)?;
        exec_allowed(container)?;
        if container.execs.contains_key(&req.exec_id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        container
            .execs
            .insert(req.exec_id.clone(), Proc::new(process, stdio));
        drop(pods);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        // No process of this shim has a terminal (refused at create and exec): nothing to size.
        let pods = self.lock();
        pods.container(&req.id)?;
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The shim holds no end of a process's stdin: containerd closing its writer is the
        // process's end of input.
        let pods = self.lock();
        pods.container(&req.id)?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut pods = self.lock();
        loop {
            let proc = pods.process(&req.id, &req.exec_id)?;
            if proc.state == State::Stopped {
                return Ok(api::WaitResponse {
                    exit_status: proc.exit_status,
                    exited_at: proc.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            pods = self.state.1.wait(pods).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut pods = self.lock();
        if !req.exec_id.is_empty() {
            let container = pods.container_mut(&req.id)?;
            let exec = container
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| not_found(&req.exec_id))?;
            return Ok(api::DeleteResponse {
                pid: exec.pid,
                exit_status: exec.exit_status,
                exited_at: exec.exited_at.into(),
                ..Default::default()
            });
        }
        let container = pods.container(&req.id)?;
        if container.init.state == State::Running {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {} is running: kill it first", req.id),
            ));
        }
        let container = pods
            .containers
            .remove(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        drop(pods);
        if container.mounted {
            let _ = nix::mount::umount2(
                &container.bundle.join("rootfs"),
                nix::mount::MntFlags::MNT_DETACH,
            );
        }
        let response = api::DeleteResponse {
            pid: container.init.pid,
            exit_status: container.init.exit_status,
            exited_at: container.init.exited_at.clone().into(),
            ..Default::default()
        };
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: container.init.pid,
                exit_status: container.init.exit_status,
                exited_at: container.init.exited_at.into(),
                ..Default::default()
            }),
        );
        Ok(response)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pods = self.lock();
        pods.container(&req.id)?;
        // No cgroup of its own yet (the workspace lives in the shim's): no figures to give.
        Ok(api::StatsResponse::default())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pods = self.lock();
        let task_pid = pods.containers.get(&req.id).map_or(0, |c| c.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after each container's delete; the shim stays while the pod has any.
        if self.lock().containers.is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node() -> NodeConfig {
        toml::from_str(
            "moat = \"/usr/bin/moat\"\nbackend = \"auto\"\ndefault_profile = \"/p\"\n\
             default_pubkey = \"/k\"\naudit_dir = \"/audit\"\n",
        )
        .unwrap()
    }

    /// The application container of pod `ns/agent`, placed as `placement`, running `python3
    /// app.py` in `/srv` with `MODE=test`.
    fn container(placement: pod::Placement) -> Container {
        let process = Process {
            args: vec!["python3".into(), "app.py".into()],
            env: vec!["MODE=test".into(), "PATH=/usr/bin".into()],
            cwd: Some("/srv".into()),
            terminal: false,
        };
        Container {
            bundle: PathBuf::from("/bundle"),
            kind: Kind::App,
            workspace: "ns/agent".into(),
            profile: pod::ProfileChoice {
                profile: "/p".into(),
                pubkey: "/k".into(),
            },
            placement,
            mounted: false,
            init: Proc::new(process, StdioPaths::default()),
            execs: HashMap::new(),
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn pooled() -> pod::Placement {
        pod::Placement::Pool {
            name: "python".into(),
            socket: "/run/moat/pools/python.sock".into(),
        }
    }

    #[test]
    fn a_pooled_pod_is_claimed_from_its_pool_on_the_vm_backend_without_the_containers_root() {
        let argv = args(&workspace_command(&container(pooled()), &node()));
        assert_eq!(
            argv[..5],
            [
                "run",
                "--backend",
                "vm",
                "--pool",
                "/run/moat/pools/python.sock"
            ]
        );
        assert!(
            !argv.iter().any(|a| a == "--rootfs" || a == "--workdir"),
            "{argv:?}"
        );
        // The claim attaches the pod's own policy, identity and audit file.
        let joined = argv.join(" ");
        assert!(
            joined.contains(
                "--profile /p --pubkey /k --audit /audit/ns_agent.audit.jsonl \
                             --workspace ns/agent"
            ) && joined.ends_with("--env MODE=test -- python3 app.py"),
            "{joined}"
        );
    }

    #[test]
    fn a_pod_without_a_pool_runs_on_its_root_with_the_nodes_backend_and_its_workdir() {
        let argv = args(&workspace_command(
            &container(pod::Placement::Rootfs),
            &node(),
        ));
        assert_eq!(
            argv[..5],
            ["run", "--backend", "auto", "--rootfs", "/bundle/rootfs"]
        );
        assert!(
            argv.join(" ").ends_with("--workdir /srv -- python3 app.py"),
            "{argv:?}"
        );
    }

    #[test]
    fn an_exec_into_a_pooled_pod_is_refused_naming_the_pod_and_its_pool() {
        let shim::protos::ttrpc::Error::RpcStatus(status) =
            exec_allowed(&container(pooled())).unwrap_err()
        else {
            panic!("not an RPC status");
        };
        assert_eq!(status.code(), Code::UNIMPLEMENTED);
        let text = status.message;
        assert!(
            text.contains("ns/agent")
                && text.contains("\"python\"")
                && text.contains("cannot exec into a VM"),
            "{text}"
        );
        assert!(exec_allowed(&container(pod::Placement::Rootfs)).is_ok());
    }
}
