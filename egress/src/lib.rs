//! moat-egress: the host egress proxy. Every flow leaving a workspace is decided here.
//!
//! Hop in the data path: a guest flow stream arrives on the Unix socket `<uds>_<port>`
//! (Firecracker's host-side vsock convention, so the VMM and the namespace backend both land
//! here), and leaves as a TCP connection to an upstream the signed policy allows.
//!
//! ```text
//!  <uds>_<port> accept      listen (this file)
//!    -> flow header         flow.rs: size- and time-bounded read (moat-flow-header)
//!    -> policy decision     moat-policy: deny by default, first matching rule
//!    -> program             flow.rs: a rule with `programs` refuses a flow whose claimed
//!                           program (flow header v2) it does not name, or none
//!    -> protocol sniff      sniff/: TLS SNI or HTTP Host must equal the flow's hostname
//!                           (plain HTTP: every request head, sniff/requests.rs, not only
//!                           the first)
//!    for a rule whose action is `corporate` (never resolved or connected here):
//!    -> broker connector    corporate.rs: `CONNECT <service>:<port>` on the host side's
//!                           egress socket, `OK` -> splice.rs as below; `ERR` -> refused
//!    -> host-side resolve   resolve.rs: the guest's address is never trusted for a name
//!    -> address classes     moat-policy::addr: non-public refused unless a rule's cidrs allow
//!    -> connect + splice    splice.rs: backpressure, half-close, idle/total timeouts
//!    or, for a rule whose action is `intercept`:
//!    -> intercept/          upstream TLS (verified, or pooled: intercept/pool.rs) -> agent
//!                           TLS with a leaf of the workspace CA (intercept/ca.rs) -> HTTP per
//!                           request: framing (intercept/framing.rs), authority re-check,
//!                           placeholder check, credential injection (intercept/inject.rs) ->
//!                           forward (intercept/http.rs) -> every response scanned for
//!                           the secrets injected on its connection (intercept/reflect.rs)
//!  secrets.rs: secret values, read on the host at start and reload, never logged; the
//!              workspace's drawn placeholders (`placeholder = "auto"`)
//!  refusal.rs: a refused flow's answer: a TLS alert or an HTTP 403, not a bare reset
//!  audit.rs: OCSF 4001 record per flow event, 4002 per intercepted request; fail closed
//!            (no new flow while a record cannot be written), refusals rate-bounded per
//!            workspace with counted summary records
//!  guest_audit.rs: process events from guest-init (`<uds>_1026`) as OCSF records
//!  metrics.rs + admin.rs: Prometheus on admin socket
//!  policy_store.rs: verified hot reload; live flows the new policy denies are cut at once
//! ```
//!
//! One flow from the agent's side, DNS lookup to close, is in ARCHITECTURE.md ("Sequence of
//! one egress flow").
//!
//! Invariants: no flow reaches an upstream without an `Allow` from the policy in force and
//! passing every check above; a corporate flow reaches only the broker's connector, asking for a
//! service by name; every flow ends with exactly one terminal audit record; nothing a
//! guest sends can crash the proxy (no panics on guest input, every read bounded).

#![forbid(unsafe_code)]

mod admin;
pub mod audit;
pub mod corporate;
mod flow;
pub mod guest_audit;
pub mod intercept;
pub mod metrics;
pub mod outcome;
pub mod policy_store;
pub mod refusal;
pub mod resolve;
pub mod secrets;
pub mod sniff;
pub mod splice;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::Watcher;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use rustls::pki_types::CertificateDer;

use crate::audit::{Audit, RecordRate};
use crate::intercept::ca::{CaError, WorkspaceCa};
use crate::intercept::pool::UpstreamPool;
use crate::metrics::Metrics;
use crate::policy_store::{LoadError, PolicySource, PolicyStore};
use crate::resolve::Resolver;
use crate::secrets::{PlaceholderBook, SecretError, Secrets};

/// The vsock port guest flows use: a guest connection to it arrives on `<uds>_1025`.
pub const EGRESS_VSOCK_PORT: u32 = 1025;

/// The highest flow header version this proxy reads: a workspace is told it at start, and its
/// guest-init writes no later version (from 2, headers name the program that opened a flow).
pub const FLOW_HEADER_VERSION: u8 = moat_flow_header::MAX_VERSION;

/// Bounds on every flow.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the whole flow header to arrive.
    pub header_timeout: Duration,
    /// Time allowed for the ClientHello or request head to arrive (and, intercepted, for the
    /// agent's TLS handshake). Generous: the agent's side is a connection its own kernel
    /// accepted at once, and a TLS client may load a whole trust store before it says hello
    /// (under load, git clones in a VM inside our emulated L1 were reset with their flow
    /// refused when this was 10 s; the slow hello is the likely cause, not proven).
    pub sniff_timeout: Duration,
    /// Time allowed for host-side resolution.
    pub resolve_timeout: Duration,
    /// Time allowed for each upstream connect attempt.
    pub connect_timeout: Duration,
    /// Time allowed for the host side's broker connector to answer a corporate flow (it asks
    /// the broker, which allows itself 10 s to connect to the service).
    pub corporate_timeout: Duration,
    /// A flow with no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// A flow is closed after this long, whatever it is doing.
    pub total_timeout: Duration,
    /// Concurrent flows per workspace; more are refused.
    pub max_flows: usize,
    /// Bytes buffered per direction per flow.
    pub splice_buffer: usize,
    /// Records of refused and failed flows (flows that never opened) written per second and
    /// in a burst; the rest are counted in summary records.
    pub audit_refusals: RecordRate,
    /// Whether intercepted responses are scanned for the secrets injected on their connection
    /// (intercept/reflect.rs). Always on in use; off only to measure what it costs (`cargo
    /// xtask bench`), when an upstream that echoes a secret hands it to the agent.
    pub scan_responses: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(5),
            sniff_timeout: Duration::from_secs(30),
            resolve_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            corporate_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
            total_timeout: Duration::from_secs(24 * 3600),
            max_flows: 2048,
            splice_buffer: 32 * 1024,
            audit_refusals: RecordRate::default(),
            scan_responses: true,
        }
    }
}

/// State shared by every flow of one proxy (one workspace).
#[derive(Debug)]
pub(crate) struct Shared {
    workspace: String,
    policy: PolicyStore,
    resolver: Box<dyn Resolver>,
    audit: Arc<Audit>,
    metrics: Metrics,
    limits: Limits,
    permits: Arc<Semaphore>,
    next_uid: AtomicU64,
    /// The interception CA (its key never leaves this process).
    ca: WorkspaceCa,
    /// How intercepted flows verify their upstreams.
    upstream_tls: Arc<rustls::ClientConfig>,
    /// The secrets of the policy in force, with their values.
    secrets: RwLock<Arc<Secrets>>,
    /// Idle verified upstream connections of intercepted flows, emptied on every reload.
    pool: UpstreamPool,
    /// The host side's corporate egress socket, if this workspace has one.
    corporate_uds: Option<PathBuf>,
}

impl Shared {
    /// The secrets in force now.
    pub(crate) fn secrets(&self) -> Arc<Secrets> {
        match self.secrets.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set_secrets(&self, secrets: Arc<Secrets>) {
        match self.secrets.write() {
            Ok(mut s) => *s = secrets,
            Err(poisoned) => *poisoned.into_inner() = secrets,
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The initial policy did not load: the proxy never runs without a verified policy.
    #[error("initial policy refused")]
    Policy(#[source] LoadError),
    /// A socket could not be bound.
    #[error("cannot listen on {}", .path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The policy files could not be watched.
    #[error("cannot watch policy files")]
    Watch(#[source] notify::Error),
    /// A secret the policy declares could not be read.
    #[error("initial policy's secrets refused")]
    Secrets(#[source] SecretError),
    /// The interception CA could not be generated.
    #[error("cannot create the workspace CA")]
    Ca(#[source] CaError),
    /// An extra upstream trust anchor was refused.
    #[error("extra upstream CA certificate refused")]
    UpstreamRoots(#[source] rustls::Error),
}

/// Configuration of one proxy instance (one workspace).
#[derive(Debug)]
pub struct Config {
    /// The workspace's name, in audit records.
    pub workspace: String,
    /// The vsock Unix-socket base path `<uds>`; the proxy listens on `<uds>_<port>`.
    pub uds: PathBuf,
    /// The vsock port served.
    pub port: u32,
    /// Admin socket for metrics, if any.
    pub admin: Option<PathBuf>,
    /// Where the policy comes from.
    pub source: PolicySource,
    /// Watch the policy files and reload on change (SIGHUP always reloads).
    pub watch: bool,
    /// Bounds.
    pub limits: Limits,
    /// Trust anchors intercepted flows accept for upstreams, on top of the webpki roots
    /// (a corporate TLS-inspection CA; a test PKI).
    pub upstream_roots: Vec<CertificateDer<'static>>,
    /// The host side's corporate egress socket (`moat-broker connect --egress-uds PATH`), where
    /// flows whose rule's action is `corporate` go. None: such flows are refused
    /// (`corporate_unavailable`).
    pub corporate_uds: Option<PathBuf>,
}

/// The listening path for `port` under base `uds`: `<uds>_<port>`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    source: PolicySource,
    shutdown: CancellationToken,
    listen_path: PathBuf,
    /// Held for a whole reload (SIGHUP and the file watcher may ask at once), so the serial
    /// check and the swap see the same policy in force.
    reloading: std::sync::Mutex<()>,
    /// This workspace's drawn placeholders: the same across reloads, unlike any other's.
    placeholders: PlaceholderBook,
}

impl Proxy {
    /// Verifies the initial policy, binds the listener and starts serving in the background
    /// (on the current tokio runtime).
    pub fn start(
        config: Config,
        resolver: Box<dyn Resolver>,
        audit: impl Into<Arc<Audit>>,
    ) -> Result<Arc<Proxy>, StartError> {
        let loaded = config.source.load_attested().map_err(StartError::Policy)?;
        Self::start_loaded(config, resolver, audit, loaded)
    }

    /// [`Proxy::start`] on a policy the caller has read and verified already, with
    /// `config.source`'s [`PolicySource::load_attested`]: what the caller decided from it
    /// (the workspace's local routes, the paths it must not expose) and what the proxy
    /// enforces are one policy, read once, even if the file changes in between.
    pub fn start_loaded(
        config: Config,
        resolver: Box<dyn Resolver>,
        audit: impl Into<Arc<Audit>>,
        (policy, attested): (moat_policy::Policy, serde_json::Value),
    ) -> Result<Arc<Proxy>, StartError> {
        let audit = audit.into();
        let placeholders = PlaceholderBook::default();
        let secrets =
            Secrets::load_with(&policy.secrets, &placeholders).map_err(StartError::Secrets)?;
        let scope = intercept::ca::intercept_scope(&policy);
        let ca = WorkspaceCa::generate(&config.workspace, &scope).map_err(StartError::Ca)?;
        let upstream_tls = intercept::upstream_tls_config(&config.upstream_roots)
            .map_err(StartError::UpstreamRoots)?;
        let listen_path = port_path(&config.uds, config.port);
        let _ = std::fs::remove_file(&listen_path);
        let listener = UnixListener::bind(&listen_path).map_err(|source| StartError::Listen {
            path: listen_path.clone(),
            source,
        })?;
        // Bound before anything is served, so a caller finds it there once `start` returns.
        let admin = match &config.admin {
            Some(path) => {
                Some(
                    moat_private_socket::bind(path).map_err(|source| StartError::Listen {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        audit.set_refusal_rate(config.limits.audit_refusals);
        // The run's start record names the policy in force (a failure is retried by the first
        // record: the run then starts naming none, and says so).
        let _ = audit.log().begin(attested);
        let shared = Arc::new(Shared {
            workspace: config.workspace,
            policy: PolicyStore::new(policy),
            resolver,
            audit,
            metrics: Metrics::default(),
            permits: Arc::new(Semaphore::new(config.limits.max_flows)),
            limits: config.limits,
            next_uid: AtomicU64::new(1),
            ca,
            upstream_tls,
            secrets: RwLock::new(secrets),
            pool: UpstreamPool::default(),
            corporate_uds: config.corporate_uds,
        });
        let shutdown = CancellationToken::new();
        let proxy = Arc::new(Proxy {
            shared: Arc::clone(&shared),
            source: config.source,
            shutdown: shutdown.clone(),
            listen_path,
            reloading: std::sync::Mutex::new(()),
            placeholders,
        });
        tokio::spawn(accept_loop(Arc::clone(&shared), listener, shutdown.clone()));
        tokio::spawn(sweep_pool(Arc::clone(&shared), shutdown.clone()));
        tokio::spawn(summarise_suppressed(Arc::clone(&shared), shutdown.clone()));
        if let Some(listener) = admin {
            tokio::spawn(admin::serve(
                Arc::clone(&shared),
                listener,
                shutdown.clone(),
            ));
        }
        if config.watch {
            proxy.spawn_watcher()?;
        }
        proxy.spawn_sighup();
        Ok(proxy)
    }

    /// The environment the agent is to be started with: each secret's `env` variable and its
    /// placeholder (drawn for this workspace for `placeholder = "auto"`). Never a value.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        self.shared.secrets().agent_env()
    }

    /// Where flows are accepted (`<uds>_<port>`).
    pub fn listen_path(&self) -> &Path {
        &self.listen_path
    }

    /// The metrics, for tests and embedding.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Live flows right now.
    pub fn live_flows(&self) -> usize {
        self.shared.policy.live()
    }

    /// The workspace CA certificate (PEM), for guest-init to add to the workspace's trust
    /// store. Never the key.
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    /// The workspace CA certificate (DER).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.shared.ca.cert_der()
    }

    /// Idle upstream connections pooled for intercepted flows right now.
    pub fn pooled_upstreams(&self) -> usize {
        self.shared.pool.idle()
    }

    /// The name of the policy in force.
    pub fn policy_name(&self) -> String {
        self.shared.policy.current().name.clone()
    }

    /// Re-reads and verifies the policy and reads its secrets. On success swaps both in and
    /// cuts live flows the policy denies (returning how many); on failure keeps the policy and
    /// secrets in force and says why.
    pub fn reload(&self) -> Result<usize, LoadError> {
        let _reloading = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let loaded = self.source.load_attested().and_then(|(policy, attested)| {
            // A validly signed profile older than the one in force (a replayed earlier
            // version) is refused: signers raise the serial at every version.
            let in_force = self.shared.policy.current().serial;
            if policy.serial < in_force {
                return Err(LoadError::Rollback {
                    serial: policy.serial,
                    in_force,
                });
            }
            // The CA's name constraints were fixed at start: a host outside them could not be
            // intercepted (no leaf is minted there, and clients would refuse one).
            let outside = policy
                .rules
                .iter()
                .filter(|r| r.action == moat_policy::Action::Intercept)
                .flat_map(|r| &r.hosts)
                .find(|h| !self.shared.ca.covers(h));
            if let Some(host) = outside {
                return Err(LoadError::OutsideCaScope {
                    host: host.to_string(),
                });
            }
            let secrets = Secrets::load_with(&policy.secrets, &self.placeholders)
                .map_err(LoadError::Secrets)?;
            Ok((policy, secrets, attested))
        });
        match loaded {
            Ok((policy, secrets, attested)) => {
                self.shared.set_secrets(secrets);
                // The log says from which record on this policy is in force.
                let _ = self.shared.audit.log().begin(attested);
                let name = policy.name.clone();
                let cut = self.shared.policy.replace(policy);
                // After the swap: a flow that still saw the old generation is not pooled.
                self.shared.pool.clear();
                self.shared
                    .metrics
                    .reloads_applied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(policy = %name, flows_cut = cut, "policy reloaded");
                Ok(cut)
            }
            Err(e) => {
                self.shared
                    .metrics
                    .reloads_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    error = %error_chain(&e),
                    "policy reload refused; keeping the policy in force"
                );
                Err(e)
            }
        }
    }

    /// Stops accepting flows (live flows run on to their end) and writes the summary of the
    /// audit records the rate limit held back.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_file(&self.listen_path);
        self.shared.audit.flush_suppressed();
    }

    /// The audit sink, for its state and counters.
    pub fn audit(&self) -> &Audit {
        &self.shared.audit
    }

    /// The audit sink, to share with the other writers of the same log (guest-init's process
    /// events): one writer per file keeps one chain.
    pub fn audit_handle(&self) -> Arc<Audit> {
        Arc::clone(&self.shared.audit)
    }

    fn spawn_sighup(self: &Arc<Self>) {
        let proxy = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!("cannot listen for SIGHUP; reload on file change only");
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => {}
                    () = shutdown.cancelled() => return,
                }
                let Some(proxy) = proxy.upgrade() else { return };
                // Off the async workers: a secret's command may take seconds.
                let _ = tokio::task::spawn_blocking(move || proxy.reload()).await;
            }
        });
    }

    /// Watches the profile's and signature's directories (editors and `mv` replace files, so
    /// watching the files themselves would miss changes) and reloads on any change to either.
    fn spawn_watcher(self: &Arc<Self>) -> Result<(), StartError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watched = [self.source.profile.clone(), self.source.signature.clone()];
        let names: Vec<_> = watched
            .iter()
            .filter_map(|p| p.file_name().map(ToOwned::to_owned))
            .collect();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res
                && changes_content(event.kind)
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)))
            {
                let _ = tx.try_send(());
            }
        })
        .map_err(StartError::Watch)?;
        for path in &watched {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(StartError::Watch)?;
        }
        let proxy = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    r = rx.recv() => if r.is_none() { return },
                    () = shutdown.cancelled() => return,
                }
                // Let a burst of writes (profile, then signature) settle before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                let Some(proxy) = proxy.upgrade() else { return };
                // Off the async workers: a secret's command may take seconds.
                let _ = tokio::task::spawn_blocking(move || proxy.reload()).await;
            }
        });
        Ok(())
    }
}

/// Whether a watched file's event can mean new content: not an open or a read (every
/// reload opens the profile, and so does any other reader: reloading on those would reload
/// forever, an audit record each time).
fn changes_content(kind: notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: UnixListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(flow::handle(Arc::clone(&shared), stream));
            }
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Closes idle upstream connections past their idle time, until shutdown.
async fn sweep_pool(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(intercept::pool::IDLE_TIMEOUT / 2);
    loop {
        tokio::select! {
            _ = every.tick() => shared.pool.sweep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Every second, writes the summary of the audit records the rate limit held back (nothing
/// when none were), until shutdown, and once more then.
async fn summarise_suppressed(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(SUMMARY_INTERVAL);
    loop {
        tokio::select! {
            _ = every.tick() => {
                shared.audit.flush_suppressed();
                shared.audit.log().tick();
            }
            () = shutdown.cancelled() => {
                shared.audit.flush_suppressed();
                return;
            }
        }
    }
}

/// How often held-back audit records are summarised.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

pub use moat_log::error_chain;
