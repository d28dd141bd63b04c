//! Idle upstream connections of intercepted flows, kept for the next flow to the same place so
//! that a new agent connection does not pay for a new upstream TCP connect and TLS handshake.
//!
//! A connection is only ever handed to a flow whose upstream name *and* pinned address equal
//! the ones it was verified for ([`PoolKey`]): its TLS session was opened with that SNI and its
//! certificate verified for that name by the proxy's one upstream TLS configuration (fixed at
//! start, with its ALPN offer), so a flow for another host never gets it. Nothing of a flow
//! stays on the connection: every request on it is checked and injected by the flow that sends
//! it, and only a connection idle between messages (its last response read to the end) is
//! kept. A policy reload empties the pool, and a connection checked out before a reload is not
//! taken back after it ([`UpstreamPool::clear`]), so no connection outlives the policy that
//! allowed it. The pool is bounded in size and in idle time, and belongs to one proxy, so to
//! one workspace: no connection is ever shared between workspaces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use tokio::task::JoinHandle;

use super::UpBody;

/// Idle connections kept at most, all upstreams together.
pub const MAX_IDLE: usize = 64;
/// Idle connections kept at most per upstream (name and address).
pub const MAX_IDLE_PER_KEY: usize = 8;
/// An idle connection is closed after this long (below common server keep-alive timeouts,
/// so the upstream rarely closes one just as it is reused).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What an upstream connection is interchangeable by: the name its certificate was verified
/// for (and the SNI it was opened with), and the pinned address it is connected to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// The upstream's hostname (normalised).
    pub(crate) host: String,
    /// The pinned address, port included.
    pub(crate) addr: SocketAddr,
}

/// The client side of one upstream connection: HTTP/2 when the upstream's ALPN chose `h2`
/// (requests run concurrently), else HTTP/1.1 (one request at a time).
pub(crate) enum Sender {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

impl Sender {
    /// Can a new request be sent right now (idle between messages, not closed)?
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// Waits until a request can be sent.
    pub(crate) async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }
}

/// One verified upstream connection: its sender, and the task driving it (aborted, closing
/// the connection, when this is dropped).
pub(crate) struct Connection {
    pub(crate) key: PoolKey,
    pub(crate) sender: Sender,
    driver: JoinHandle<()>,
    /// The pool generation (policy) it was opened under.
    generation: u64,
}

impl Connection {
    pub(crate) fn new(
        key: PoolKey,
        sender: Sender,
        driver: JoinHandle<()>,
        generation: u64,
    ) -> Self {
        Connection {
            key,
            sender,
            driver,
            generation,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

struct Idle {
    conn: Connection,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    idle: HashMap<PoolKey, Vec<Idle>>,
    count: usize,
}

impl Inner {
    /// Drops every connection idle for longer than [`IDLE_TIMEOUT`] or closed by its upstream.
    fn sweep(&mut self, now: Instant) {
        let mut count = 0;
        self.idle.retain(|_, conns| {
            conns
                .retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT && i.conn.sender.is_ready());
            count += conns.len();
            !conns.is_empty()
        });
        self.count = count;
    }
}

/// The idle upstream connections of one proxy.
#[derive(Default)]
pub(crate) struct UpstreamPool {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("idle", &self.idle())
            .finish()
    }
}

impl UpstreamPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The generation a connection opened now belongs to.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Idle connections held now.
    pub(crate) fn idle(&self) -> usize {
        self.lock().count
    }

    /// An idle connection for exactly `key`, ready for a request, if one is held. The most
    /// recently used first (the least likely to have been closed by the upstream).
    pub(crate) fn take(&self, key: &PoolKey) -> Option<Connection> {
        let now = Instant::now();
        let mut inner = self.lock();
        let generation = inner.generation;
        let conns = inner.idle.get_mut(key)?;
        let mut found = None;
        while let Some(idle) = conns.pop() {
            let fresh = now.duration_since(idle.since) < IDLE_TIMEOUT;
            if fresh && idle.conn.generation == generation && idle.conn.sender.is_ready() {
                debug_assert_eq!(&idle.conn.key, key);
                found = Some(idle.conn);
                break;
            }
        }
        if conns.is_empty() {
            inner.idle.remove(key);
        }
        inner.count = inner.idle.values().map(Vec::len).sum();
        found
    }

    /// Takes `conn` back if it is idle between messages, was opened under the policy in force,
    /// and there is room; otherwise drops (closes) it.
    pub(crate) fn put(&self, conn: Connection) {
        if !conn.sender.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if conn.generation != inner.generation {
            return;
        }
        if inner.count >= MAX_IDLE {
            inner.sweep(now);
        }
        let per_key = inner.idle.get(&conn.key).map_or(0, Vec::len);
        if inner.count >= MAX_IDLE || per_key >= MAX_IDLE_PER_KEY {
            return;
        }
        inner
            .idle
            .entry(conn.key.clone())
            .or_default()
            .push(Idle { conn, since: now });
        inner.count += 1;
    }

    /// Closes every connection idle too long (run periodically).
    pub(crate) fn sweep(&self) {
        self.lock().sweep(Instant::now());
    }

    /// Closes every idle connection and starts a new generation: connections in use now are
    /// not taken back. Called when the policy changes.
    pub(crate) fn clear(&self) {
        let drained = {
            let mut inner = self.lock();
            inner.generation += 1;
            inner.count = 0;
            std::mem::take(&mut inner.idle)
        };
        // Closed outside the lock.
        drop(drained);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::DuplexStream;

    fn key(host: &str) -> PoolKey {
        PoolKey {
            host: host.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 443)),
        }
    }

    /// An idle HTTP/1.1 client connection over an in-memory pipe (its far end returned, to be
    /// kept open).
    async fn idle(host: &str, generation: u64) -> (Connection, DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(near)).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut c = Connection::new(key(host), Sender::H1(sender), driver, generation);
        c.sender.ready().await.unwrap();
        (c, far)
    }

    #[tokio::test]
    async fn connection_is_only_handed_out_for_its_own_name_and_address() {
        let pool = UpstreamPool::default();
        let (c, _far) = idle("a.test", pool.generation()).await;
        pool.put(c);
        assert!(pool.take(&key("b.test")).is_none());
        let other_port = PoolKey {
            addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            ..key("a.test")
        };
        assert!(pool.take(&other_port).is_none());
        assert_eq!(pool.take(&key("a.test")).unwrap().key, key("a.test"));
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn connection_of_an_older_generation_is_not_taken_back() {
        let pool = UpstreamPool::default();
        let (c, _far) = idle("a.test", pool.generation()).await;
        pool.clear();
        pool.put(c);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn clear_closes_every_idle_connection() {
        let pool = UpstreamPool::default();
        let (c, _far) = idle("a.test", pool.generation()).await;
        pool.put(c);
        pool.clear();
        assert_eq!(pool.idle(), 0);
        assert!(pool.take(&key("a.test")).is_none());
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_per_upstream() {
        let pool = UpstreamPool::default();
        let mut fars = Vec::new();
        for _ in 0..MAX_IDLE_PER_KEY + 2 {
            let (c, far) = idle("a.test", pool.generation()).await;
            fars.push(far);
            pool.put(c);
        }
        assert_eq!(pool.idle(), MAX_IDLE_PER_KEY);
    }

    #[tokio::test]
    async fn connection_closed_by_its_upstream_is_not_pooled() {
        let pool = UpstreamPool::default();
        let (c, far) = idle("a.test", pool.generation()).await;
        drop(far);
        tokio::time::sleep(Duration::from_millis(20)).await;
        pool.put(c);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn sweep_closes_connections_idle_past_the_timeout() {
        let pool = UpstreamPool::default();
        let (c, _far) = idle("a.test", pool.generation()).await;
        pool.put(c);
        pool.lock().sweep(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle(), 0);
    }
}
