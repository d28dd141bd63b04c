//! One flow, from accept to close: header -> policy -> sniff -> resolve -> connect -> splice,
//! or, for a corporate rule, header -> policy -> sniff -> broker connector -> splice.
//! Every exit path writes exactly one terminal audit record and counts one reason.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use moat_flow_header::FlowHeader;
use moat_policy::{Action, Decision, DenyReason, Destination, Protocol, Rule, ServiceName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::audit::{Activity, Event, FlowInfo};
use crate::intercept::Upstream;
use crate::intercept::pool::PoolKey;
use crate::outcome::Reason;
use crate::policy_store::LiveFlow;
use crate::sniff::requests::{Checked, Refusal, RequestChecker};
use crate::sniff::{self, MAX_SNIFF, Sniffed};
use crate::splice::{Counters, Halves, SpliceLimits, splice};

/// A refusal or failure before the flow was opened.
struct Stop {
    reason: Reason,
    rule: Option<String>,
    action: Option<Action>,
    service: Option<ServiceName>,
    detail: Option<String>,
}

impl Stop {
    fn new(reason: Reason) -> Self {
        Stop {
            reason,
            rule: None,
            action: None,
            service: None,
            detail: None,
        }
    }
    fn rule(mut self, rule: &Rule) -> Self {
        self.rule = Some(rule.name.clone());
        self.action = Some(rule.action);
        self.service.clone_from(&rule.service);
        self
    }
    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Where an admitted flow's bytes go.
enum Peer {
    /// An upstream the proxy connected to itself (passthrough and intercept rules).
    Direct {
        /// A new TCP connection, or (intercepted flows only) a pooled verified TLS connection.
        upstream: Upstream,
        addr: SocketAddr,
        /// The name connected to: the flow's hostname, or a routed rule's host.
        host: Option<String>,
    },
    /// A corporate service, through the host side's broker connector (corporate rules): the
    /// stream is past the connector's `OK`.
    Corporate {
        stream: UnixStream,
        service: ServiceName,
    },
}

/// A flow that passed every check and is connected upstream.
struct Admitted {
    peer: Peer,
    /// The destination the guest claimed (canonical address).
    claimed: SocketAddr,
    /// A routed rule's model rewrite.
    model: Option<String>,
    rule: String,
    action: Action,
    protocol: Protocol,
    /// Client bytes read while deciding, to be sent upstream first.
    pending: Vec<u8>,
    /// The upstream pool's generation when the flow arrived (before the policy was read).
    generation: u64,
}

/// Handles one accepted flow stream to completion.
pub(crate) async fn handle(shared: Arc<Shared>, agent: UnixStream) {
    let uid = shared.next_uid.fetch_add(1, Ordering::Relaxed);
    let mut info = FlowInfo {
        uid: format!("{}-{uid}", shared.workspace),
        started: Some(SystemTime::now()),
        ..FlowInfo::default()
    };
    shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
    // Fail closed: no flow while its records could not be written. This refusal's own record
    // is the retry that lets flows in again once the log takes records.
    if shared.audit.failing() {
        finish_early(
            &shared,
            &info,
            Stop::new(Reason::AuditUnavailable).detail("the audit log cannot be written"),
        );
        return;
    }
    let Ok(_permit) = Arc::clone(&shared.permits).try_acquire_owned() else {
        finish_early(&shared, &info, Stop::new(Reason::TooManyFlows));
        return;
    };
    let mut agent = agent;
    let mut buf = Vec::with_capacity(2048);
    match admit(&shared, &mut agent, &mut info, &mut buf).await {
        Err(stop) => {
            let (reason, rule) = (stop.reason, stop.rule.clone());
            finish_early(&shared, &info, stop);
            // After the record: the answer is best effort and may wait for the first bytes.
            crate::refusal::answer(
                &mut agent,
                &mut buf,
                reason,
                rule.as_deref(),
                info.hostname.as_deref(),
                info.program.as_ref().map(|p| p.path().as_str()),
                shared.limits.sniff_timeout,
            )
            .await;
        }
        Ok(admitted) => run(&shared, uid, agent, admitted, &info).await,
    }
}

fn finish_early(shared: &Shared, info: &FlowInfo, stop: Stop) {
    let activity = match stop.reason {
        Reason::ResolveFailed
        | Reason::ConnectFailed
        | Reason::ProxyResources
        | Reason::CorporateUnavailable => Activity::Fail,
        _ => Activity::Refuse,
    };
    tracing::debug!(flow = %info.uid, reason = %stop.reason, detail = ?stop.detail, "flow stopped");
    shared.metrics.ended(stop.reason);
    shared.audit.emit(&Event {
        activity,
        flow: info,
        rule: stop.rule.as_deref(),
        action: stop.action,
        service: stop.service.as_ref().map(ServiceName::as_str),
        upstream: None,
        reason: Some(stop.reason),
        detail: stop.detail,
        bytes: None,
        allowed: activity == Activity::Fail,
        requests: None,
    });
}

/// Reads more bytes into `buf`, bounded by `deadline`. `Ok(false)` on EOF.
async fn read_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<bool, ()> {
    match timeout_at(deadline, r.read_buf(buf)).await {
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// Takes a flow through admission's numbered steps, each a function that returns its result
/// or the refusal that stops the flow: 1. header, 2. policy, 3. protocol, then either the
/// broker connector (corporate rules) or 4. resolve, 5. pooled connection, 6. connect.
async fn admit(
    shared: &Shared,
    agent: &mut UnixStream,
    info: &mut FlowInfo,
    buf: &mut Vec<u8>,
) -> Result<Admitted, Stop> {
    // Read before the policy: a reload between the two makes the flow's connections too old
    // to be pooled, never the reverse.
    let generation = shared.pool.generation();

    // 1. The flow header.
    let header = read_header(shared, agent, buf).await?;
    info.guest_flow_id = Some(header.flow_id);
    info.claimed = Some(header.destination);
    info.hostname = header.hostname.as_ref().map(|h| h.as_str().to_owned());
    info.program = header.program;
    let port = header.destination.port();
    let claimed_ip = moat_policy::addr::canonical(header.destination.ip());
    let claimed = SocketAddr::new(claimed_ip, port);

    // 2. The policy decision, on the claimed destination.
    let hostname = info.hostname.as_deref();
    let rule = decide(
        shared,
        Destination {
            hostname,
            addr: claimed_ip,
            port,
        },
    )?;

    // 2b. The program: a rule that names programs narrows itself to their flows.
    check_program(&rule, info)?;

    // 3. The protocol: the name the agent uses must be the name the policy allowed.
    let protocol = check_protocol(shared, agent, buf, &rule, hostname, port).await?;

    let (peer, model) = if rule.action == Action::Corporate {
        // A corporate rule's flow goes to the broker, asked for the rule's service by name:
        // the proxy neither resolves the hostname nor connects anywhere else.
        (open_corporate(shared, &rule, port).await?, None)
    } else {
        // A routed rule connects to its route's host and port instead of the flow's.
        let route = rule.route.as_ref();
        let port = route.map_or(port, |r| r.port);
        let hostname = route.map_or(hostname, |r| Some(r.host.as_str()));
        // 4. Where to connect.
        let addrs = resolve(shared, &rule, hostname, claimed_ip).await?;
        // 5. An idle verified connection (intercepted flows), else 6. a new one.
        let peer = match take_pooled(shared, &rule, hostname, &addrs, port) {
            Some(peer) => peer,
            None => connect(shared, &rule, hostname, addrs, port).await?,
        };
        (peer, route.and_then(|r| r.model.clone()))
    };
    Ok(Admitted {
        peer,
        claimed,
        model,
        rule: rule.name.clone(),
        action: rule.action,
        protocol,
        pending: std::mem::take(buf),
        generation,
    })
}

/// Step 1, the flow header, read into `buf`: bounded in size by the decoder, in time by the
/// header deadline. Returns it, leaving in `buf` the bytes read past it.
async fn read_header(
    shared: &Shared,
    agent: &mut UnixStream,
    buf: &mut Vec<u8>,
) -> Result<FlowHeader, Stop> {
    let deadline = Instant::now() + shared.limits.header_timeout;
    let (header, consumed) = loop {
        match FlowHeader::decode(buf) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(e) => return Err(Stop::new(Reason::HeaderInvalid).detail(e.to_string())),
        }
        match read_more(agent, buf, deadline).await {
            Ok(true) => {}
            Ok(false) => return Err(Stop::new(Reason::HeaderTruncated)),
            Err(()) => return Err(Stop::new(Reason::HeaderTimeout)),
        }
    };
    buf.drain(..consumed);
    Ok(header)
}

/// Step 2, the policy's decision on the claimed destination: the rule that allows it.
fn decide(shared: &Shared, destination: Destination<'_>) -> Result<Rule, Stop> {
    let policy = shared.policy.current();
    match policy.decide(destination) {
        Decision::Allow(rule) => Ok(rule.clone()),
        Decision::Deny(reason) => Err(Stop::new(match reason {
            DenyReason::NoRule => Reason::NoRule,
            DenyReason::PortNotAllowed => Reason::PortNotAllowed,
            DenyReason::IpLiteral => Reason::IpLiteral,
        })),
    }
}

/// Step 2b, the program the guest says opened the flow, against the rule's `programs`: never
/// more than the destination allowed, only less. Without a claim (a guest that could not tell,
/// or wrote version 1), a rule with `programs` refuses.
fn check_program(rule: &Rule, info: &FlowInfo) -> Result<(), Stop> {
    let claim = info.program_claim();
    if rule.allows_program(claim.as_ref()) {
        return Ok(());
    }
    let detail = match claim {
        Some(p) => format!("program {p} is not among the rule's programs"),
        None => "program unknown: the guest named none".to_owned(),
    };
    Err(Stop::new(Reason::ProgramNotAllowed)
        .rule(rule)
        .detail(detail))
}

/// Step 3, the flow's protocol: TCP where the rule allows any, else what the first bytes show
/// (read into `buf` under the sniff deadline), which must be allowed by the rule and name the
/// flow's hostname.
async fn check_protocol(
    shared: &Shared,
    agent: &mut UnixStream,
    buf: &mut Vec<u8>,
    rule: &Rule,
    hostname: Option<&str>,
    port: u16,
) -> Result<Protocol, Stop> {
    if rule.allows_protocol(Protocol::Tcp) {
        return Ok(Protocol::Tcp);
    }
    let deadline = Instant::now() + shared.limits.sniff_timeout;
    let sniffed = loop {
        match sniff::sniff(buf) {
            Ok(Some(s)) => break s,
            Ok(None) if buf.len() >= MAX_SNIFF => {
                return Err(Stop::new(Reason::TlsMalformed)
                    .rule(rule)
                    .detail("too large"));
            }
            Ok(None) => {}
            Err(reason) => return Err(Stop::new(reason).rule(rule)),
        }
        match read_more(agent, buf, deadline).await {
            Ok(true) => {}
            Ok(false) | Err(()) => return Err(Stop::new(Reason::SniffTimeout).rule(rule)),
        }
    };
    if !rule.allows_protocol(sniffed.protocol()) {
        return Err(Stop::new(Reason::ProtocolNotAllowed).rule(rule));
    }
    if let Err(reason) = sniff::check(&sniffed, hostname, port) {
        let detail = match &sniffed {
            Sniffed::Tls(Some(n), _) | Sniffed::Http(n, _) => format!("client named {n}"),
            _ => String::new(),
        };
        return Err(Stop::new(reason).rule(rule).detail(detail));
    }
    // An Encrypted ClientHello (or ESNI) asks the upstream for a name the proxy cannot read:
    // the SNI just checked is only a front, and whatever the encrypted one names at the
    // resolved address would be reached (domain fronting). Refused unless the proxy
    // terminates the TLS itself (intercept), where the hidden hello reaches no one and every
    // request's Host is checked.
    if let Sniffed::Tls(_, Some(ext)) = &sniffed
        && rule.action != Action::Intercept
    {
        return Err(Stop::new(Reason::TlsHiddenName)
            .rule(rule)
            .detail(format!("ClientHello extension {ext:#06x}")));
    }
    // A placeholder in a plaintext request head is never bound (secrets are only injected
    // over intercepted TLS): refuse rather than let it leave.
    if let Sniffed::Http(..) = sniffed
        && let Some(spec) = shared.secrets().placeholder_in(buf)
    {
        return Err(Stop::new(Reason::PlaceholderUnbound)
            .rule(rule)
            .detail(format!(
                "placeholder of secret {:?} in plain HTTP",
                spec.name
            )));
    }
    Ok(sniffed.protocol())
}

/// A corporate rule's peer: the broker connector's stream to the rule's service, open and
/// past the connector's `OK`, under the corporate deadline.
async fn open_corporate(shared: &Shared, rule: &Rule, port: u16) -> Result<Peer, Stop> {
    let Some(service) = rule.service.clone() else {
        // The profile parser refuses a corporate rule without a service.
        return Err(Stop::new(Reason::CorporateUnavailable)
            .rule(rule)
            .detail("the rule names no service"));
    };
    let deadline = Instant::now() + shared.limits.corporate_timeout;
    match crate::corporate::open(shared.corporate_uds.as_deref(), &service, port, deadline).await {
        Ok(stream) => Ok(Peer::Corporate { stream, service }),
        Err(e) => Err(Stop::new(e.reason())
            .rule(rule)
            .detail(crate::error_chain(&e))),
    }
}

/// Step 4, the addresses to connect to: `hostname` resolved on the host (under the resolve
/// deadline), or the claimed address for a flow without one; every address classified by the
/// rule, and one it refuses refuses the flow.
async fn resolve(
    shared: &Shared,
    rule: &Rule,
    hostname: Option<&str>,
    claimed_ip: IpAddr,
) -> Result<Vec<IpAddr>, Stop> {
    let Some(host) = hostname else {
        return match rule.check_address(claimed_ip) {
            Ok(canon) => Ok(vec![canon]),
            Err(class) => Err(Stop::new(Reason::NonPublicAddress)
                .rule(rule)
                .detail(format!("{claimed_ip} ({class})"))),
        };
    };
    let deadline = Instant::now() + shared.limits.resolve_timeout;
    let resolved = match timeout_at(deadline, shared.resolver.resolve(host)).await {
        Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
        Ok(Ok(_)) => return Err(Stop::new(Reason::ResolveFailed).rule(rule)),
        Ok(Err(e)) => {
            return Err(Stop::new(Reason::ResolveFailed)
                .rule(rule)
                .detail(e.to_string()));
        }
        Err(_) => {
            return Err(Stop::new(Reason::ResolveFailed)
                .rule(rule)
                .detail("timed out"));
        }
    };
    let mut checked = Vec::with_capacity(resolved.len());
    for addr in resolved {
        match rule.check_address(addr) {
            Ok(canon) => checked.push(canon),
            Err(class) => {
                return Err(Stop::new(Reason::NonPublicAddress)
                    .rule(rule)
                    .detail(format!("{host} resolved to {addr} ({class})")));
            }
        }
    }
    Ok(checked)
}

/// Step 5, for an intercepted flow to a named host: an idle upstream connection from the pool
/// verified for the same name and one of the addresses just resolved and classified.
fn take_pooled(
    shared: &Shared,
    rule: &Rule,
    hostname: Option<&str>,
    addrs: &[IpAddr],
    port: u16,
) -> Option<Peer> {
    if rule.action != Action::Intercept {
        return None;
    }
    let host = hostname?;
    addrs.iter().find_map(|&ip| {
        let key = PoolKey {
            host: host.to_owned(),
            addr: SocketAddr::new(ip, port),
        };
        let conn = shared.pool.take(&key)?;
        Some(Peer::Direct {
            upstream: Upstream::Pooled(conn),
            addr: key.addr,
            host: Some(key.host),
        })
    })
}

/// Step 6, a new TCP connection: to the first of `addrs` that accepts, each attempt bounded by
/// the connect deadline. Running out of descriptors is the proxy's failure, not the upstream's.
async fn connect(
    shared: &Shared,
    rule: &Rule,
    hostname: Option<&str>,
    addrs: Vec<IpAddr>,
    port: u16,
) -> Result<Peer, Stop> {
    let mut last_err: Option<io::Error> = None;
    for ip in addrs {
        let target = SocketAddr::new(ip, port);
        let deadline = Instant::now() + shared.limits.connect_timeout;
        match timeout_at(deadline, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                return Ok(Peer::Direct {
                    upstream: Upstream::Tcp(upstream),
                    addr: target,
                    host: hostname.map(str::to_owned),
                });
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => last_err = Some(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
    let err = last_err.unwrap_or_else(|| io::Error::other("no address"));
    let reason = match err.raw_os_error() {
        Some(code) if code == 24 || code == 23 => Reason::ProxyResources,
        _ => Reason::ConnectFailed,
    };
    Err(Stop::new(reason).rule(rule).detail(err.to_string()))
}

async fn run(
    shared: &Arc<Shared>,
    uid: u64,
    mut agent: UnixStream,
    admitted: Admitted,
    info: &FlowInfo,
) {
    let Admitted {
        peer,
        claimed,
        model,
        rule,
        action,
        protocol,
        pending,
        generation,
    } = admitted;
    let (upstream_addr, service) = match &peer {
        Peer::Direct { addr, .. } => (Some(*addr), None),
        Peer::Corporate { service, .. } => (None, Some(service.clone())),
    };
    let cancel = CancellationToken::new();
    shared.policy.register(
        uid,
        LiveFlow {
            hostname: info.hostname.clone(),
            claimed,
            upstream: upstream_addr.map(|a| a.ip()),
            service: service.clone(),
            protocol,
            action,
            program: info.program.clone(),
            cancel: cancel.clone(),
        },
    );
    shared.metrics.opened.fetch_add(1, Ordering::Relaxed);
    shared.metrics.active.fetch_add(1, Ordering::Relaxed);
    let recorded = shared.audit.emit(&Event {
        activity: Activity::Open,
        flow: info,
        rule: Some(&rule),
        action: Some(action),
        service: service.as_ref().map(ServiceName::as_str),
        upstream: upstream_addr,
        reason: None,
        detail: None,
        bytes: None,
        allowed: true,
        requests: None,
    });

    let counters = Arc::new(Counters::default());
    let mut detail = None;
    // Every request head of a plain-HTTP flow is checked, not only the one sniffed.
    let requests = (protocol == Protocol::Http)
        .then(|| RequestChecker::new(info.hostname.as_deref(), claimed.port(), shared.secrets()));
    let mut refused = false;
    let reason = if !recorded {
        // Fail closed: a flow without its Open record moves no byte.
        detail = Some("the flow's Open record could not be written".to_owned());
        Reason::AuditUnavailable
    } else {
        match (action, peer) {
            (
                Action::Intercept,
                Peer::Direct {
                    upstream,
                    addr,
                    host,
                },
            ) => {
                let flow = crate::intercept::Intercepted {
                    info: info.clone(),
                    hostname: info.hostname.clone().unwrap_or_default(),
                    port: claimed.port(),
                    rule: rule.clone(),
                    upstream_host: host.unwrap_or_default(),
                    upstream_addr: addr,
                    model,
                    generation,
                };
                let (reason, d) = crate::intercept::serve(
                    Arc::clone(shared),
                    flow,
                    agent,
                    pending,
                    upstream,
                    Arc::clone(&counters),
                    cancel,
                )
                .await;
                detail = d;
                reason
            }
            // Admission takes pooled connections for intercepted flows only.
            (
                _,
                Peer::Direct {
                    upstream: Upstream::Pooled(_),
                    ..
                },
            ) => Reason::ProxyResources,
            (
                _,
                Peer::Direct {
                    upstream: Upstream::Tcp(mut upstream),
                    ..
                },
            ) => {
                let (read, write) = upstream.split();
                let relayed = relay(
                    shared, &mut agent, read, write, &pending, requests, &counters, cancel,
                )
                .await;
                let reason = settle(relayed, info, &mut detail, &mut refused);
                if refused {
                    forbid_first(shared, &mut agent, &counters, reason, &rule, info).await;
                }
                reason
            }
            (Action::Corporate, Peer::Corporate { mut stream, .. }) => {
                let (read, write) = stream.split();
                let relayed = relay(
                    shared, &mut agent, read, write, &pending, requests, &counters, cancel,
                )
                .await;
                let reason = settle(relayed, info, &mut detail, &mut refused);
                if refused {
                    forbid_first(shared, &mut agent, &counters, reason, &rule, info).await;
                }
                reason
            }
            // Admission sends only corporate rules' flows to the broker.
            (_, Peer::Corporate { .. }) => Reason::ProxyResources,
        }
    };

    shared.policy.unregister(uid);
    let out = counters.out.load(Ordering::Relaxed);
    let inb = counters.r#in.load(Ordering::Relaxed);
    shared.metrics.active.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.bytes_out.fetch_add(out, Ordering::Relaxed);
    shared.metrics.bytes_in.fetch_add(inb, Ordering::Relaxed);
    shared.metrics.ended(reason);
    shared.audit.emit(&Event {
        activity: Activity::Close,
        flow: info,
        rule: Some(&rule),
        action: Some(action),
        service: service.as_ref().map(ServiceName::as_str),
        upstream: upstream_addr,
        reason: Some(reason),
        detail,
        bytes: Some((out, inb)),
        // A flow cut because one of its requests was refused ends denied.
        allowed: reason != Reason::Revoked && !refused,
        requests: (action == Action::Intercept).then(|| counters.requests.load(Ordering::Relaxed)),
    });
}

/// Answers a plain-HTTP flow whose request was refused with a 403, if nothing of the flow went
/// upstream (the refused request was the first, or pipelined with it): then the 403 is the
/// only response the agent gets. A request refused later on a kept-alive connection is not
/// answered: a response to an earlier one may be half sent, and a 403 would read as its rest.
async fn forbid_first(
    shared: &Shared,
    agent: &mut UnixStream,
    counters: &Counters,
    reason: Reason,
    rule: &str,
    info: &FlowInfo,
) {
    if counters.out.load(Ordering::Relaxed) != 0 || !crate::refusal::answered(reason) {
        return;
    }
    let bytes = crate::refusal::forbidden(
        reason,
        Some(rule),
        info.hostname.as_deref(),
        info.program.as_ref().map(|p| p.path().as_str()),
    );
    let deadline = Instant::now() + shared.limits.sniff_timeout.min(crate::refusal::ANSWER_WAIT);
    crate::refusal::write_answer(agent, &bytes, deadline).await;
}

/// The reason a relayed flow ended for; a refused plain-HTTP request's reason and detail.
fn settle(
    relayed: Result<Reason, Refusal>,
    info: &FlowInfo,
    detail: &mut Option<String>,
    refused: &mut bool,
) -> Reason {
    match relayed {
        Ok(reason) => reason,
        Err(refusal) => {
            tracing::debug!(flow = %info.uid, reason = %refusal.reason, detail = %refusal.detail,
                "plain HTTP request refused; flow cut");
            *refused = true;
            *detail = Some(refusal.detail);
            refusal.reason
        }
    }
}

/// Passes a flow through unchanged (passthrough and corporate rules): the bytes read while
/// deciding first, then a splice with the flow limits. With `requests` (a plain-HTTP flow),
/// the agent's bytes pass through it: every request head is checked before it leaves, and a
/// refused one ends the flow (`Err`) with none of its bytes sent.
#[allow(clippy::too_many_arguments)]
async fn relay<UR, UW>(
    shared: &Shared,
    agent: &mut UnixStream,
    read: UR,
    mut write: UW,
    pending: &[u8],
    requests: Option<RequestChecker>,
    counters: &Arc<Counters>,
    cancel: CancellationToken,
) -> Result<Reason, Refusal>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let limits = SpliceLimits {
        idle: shared.limits.idle_timeout,
        total: shared.limits.total_timeout,
        buffer: shared.limits.splice_buffer,
    };
    let (ar, aw) = agent.split();
    let Some(mut checker) = requests else {
        if !send_first(&mut write, pending, counters).await {
            return Ok(Reason::UpstreamError);
        }
        let agent = Halves {
            read: ar,
            write: aw,
        };
        let upstream = Halves { read, write };
        return Ok(splice(agent, upstream, limits, Arc::clone(counters), cancel).await);
    };
    let mut first = Vec::with_capacity(pending.len());
    checker.push(pending, &mut first)?;
    if !send_first(&mut write, &first, counters).await {
        return Ok(Reason::UpstreamError);
    }
    let refused = Arc::new(Mutex::new(None));
    let agent = Halves {
        read: Checked::new(ar, checker, limits.buffer, Arc::clone(&refused)),
        write: aw,
    };
    let upstream = Halves { read, write };
    let reason = splice(agent, upstream, limits, Arc::clone(counters), cancel).await;
    let refusal = match refused.lock() {
        Ok(mut r) => r.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    refusal.map_or(Ok(reason), Err)
}

/// Sends the bytes read while deciding; false if the upstream failed.
async fn send_first<W: AsyncWrite + Unpin>(
    write: &mut W,
    first: &[u8],
    counters: &Counters,
) -> bool {
    if write.write_all(first).await.is_err() {
        return false;
    }
    counters
        .out
        .fetch_add(first.len() as u64, Ordering::Relaxed);
    true
}
