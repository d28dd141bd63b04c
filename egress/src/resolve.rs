//! Host-side name resolution. The guest's address for a named flow is never trusted: the proxy
//! resolves the name itself, and every address it gets back is classified before use.
//!
//! Pluggable so tests and development can pin names to loopback upstreams
//! ([`StaticResolver`]); production uses the host's resolver ([`SystemResolver`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;

/// The future a resolver returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Resolves a normalised hostname to addresses.
pub trait Resolver: Send + Sync + std::fmt::Debug + 'static {
    /// All addresses for `host`, in preference order. An empty list is an error.
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}

/// The host's resolver (getaddrinfo, through tokio's blocking pool).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
                .await?
                .map(|sa| sa.ip())
                .collect();
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
            }
            Ok(addrs)
        })
    }
}

/// A fixed map from names to addresses, for tests and development. Unknown names fail.
#[derive(Debug, Default, Clone)]
pub struct StaticResolver {
    map: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `addr` to the addresses of `host` (normalised).
    pub fn insert(&mut self, host: &str, addr: IpAddr) -> Result<(), moat_policy::host::HostError> {
        let name = moat_policy::normalize(host)?;
        self.map.entry(name).or_default().push(addr);
        Ok(())
    }

    /// Parses `host=addr` (as given to `--resolve`).
    pub fn insert_spec(&mut self, spec: &str) -> Result<(), String> {
        let (host, addr) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not host=address"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        self.insert(host, addr).map_err(|e| e.to_string())
    }
}

impl Resolver for StaticResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        let found = self.map.get(host).cloned();
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name not in static map"))
        })
    }
}
