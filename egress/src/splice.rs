//! Splice an admitted flow both ways until it ends, with backpressure (each direction writes
//! everything it read before reading again), half-close (EOF on one side shuts down writing
//! on the other, the other direction carries on), an idle timeout, a total lifetime, and
//! cancellation (a policy reload that denies the flow).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::outcome::Reason;

/// Live byte counts of one flow, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Agent -> upstream.
    pub out: AtomicU64,
    /// Upstream -> agent.
    pub r#in: AtomicU64,
    /// Requests the agent sent on an intercepted flow (each has one HTTP Activity record,
    /// numbered from 1; the Close record says how many).
    pub requests: AtomicU64,
    /// Milliseconds after the flow's start of the last byte moved either way.
    last_activity_ms: AtomicU64,
}

/// Timeouts and buffer size for one flow.
#[derive(Debug, Clone, Copy)]
pub struct SpliceLimits {
    /// Close after this long with no byte moving either way.
    pub idle: Duration,
    /// Close after this long in total.
    pub total: Duration,
    /// Bytes buffered per direction.
    pub buffer: usize,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Agent,
    Upstream,
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    from_side: Side,
    count: &AtomicU64,
    counters: &Counters,
    start: Instant,
    buffer: usize,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = match from_side {
        Side::Agent => Side::Upstream,
        Side::Upstream => Side::Agent,
    };
    let mut buf = vec![0u8; buffer];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| from_side)?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction running.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|_| to_side)?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        counters.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }
}

/// The two halves of one side of a flow (borrowed halves from `TcpStream::split` and
/// `UnixStream::split` cost nothing, unlike the locking `tokio::io::split`).
#[derive(Debug)]
pub struct Halves<R, W> {
    /// Reading half.
    pub read: R,
    /// Writing half.
    pub write: W,
}

/// Splices `agent` and `upstream` until both directions finish or something ends the flow.
/// Returns why it ended.
pub async fn splice<AR, AW, UR, UW>(
    agent: Halves<AR, AW>,
    upstream: Halves<UR, UW>,
    limits: SpliceLimits,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> Reason
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let (agent_r, agent_w) = (agent.read, agent.write);
    let (up_r, up_w) = (upstream.read, upstream.write);
    let c = &*counters;
    let out = one_way(agent_r, up_w, Side::Agent, &c.out, c, start, limits.buffer);
    let inb = one_way(
        up_r,
        agent_w,
        Side::Upstream,
        &c.r#in,
        c,
        start,
        limits.buffer,
    );
    tokio::pin!(out, inb);
    let idle = async {
        loop {
            let last = Duration::from_millis(c.last_activity_ms.load(Ordering::Relaxed));
            let deadline = start + last + limits.idle;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    };
    tokio::pin!(idle);
    let total = sleep(limits.total);
    tokio::pin!(total);
    let (mut out_done, mut in_done) = (false, false);
    loop {
        let result = tokio::select! {
            r = &mut out, if !out_done => { out_done = true; r }
            r = &mut inb, if !in_done => { in_done = true; r }
            () = cancel.cancelled() => return Reason::Revoked,
            () = &mut total => return Reason::TotalTimeout,
            () = &mut idle => return Reason::IdleTimeout,
        };
        match result {
            Err(Side::Agent) => return Reason::AgentError,
            Err(Side::Upstream) => return Reason::UpstreamError,
            Ok(()) if out_done && in_done => return Reason::Finished,
            Ok(()) => {}
        }
    }
}
