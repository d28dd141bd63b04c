//! Interception: for a flow whose rule's action is `intercept`, the proxy terminates the
//! agent's TLS with a leaf of the workspace CA, reads every HTTP request, injects the secrets
//! bound to the host, and forwards the request over its own, verified, TLS connection to the
//! address the flow was pinned to. Everything else stays passthrough.
//!
//! ```text
//!  flow admitted (policy, SNI == flow hostname, resolved + classified address, connected)
//!    -> upstream TLS      verified: webpki roots + Config::upstream_roots; SNI = hostname
//!    -> agent TLS         ca.rs: leaf minted for the hostname, ALPN http/1.1
//!    -> HTTP/1.1 server   hyper: keep-alive, pipelining (in order), chunked; bounded head
//!    -> per request       inject.rs: authority, placeholders, credentials, hop-by-hop
//!                         scan.rs: placeholders in the streamed body, across frames
//!    -> forward           http.rs: hyper client on the pinned connection (re-dialled to the
//!                         same address when the upstream closes it); bodies stream both ways
//!    -> audit             one OCSF HTTP Activity record per request
//! ```
//!
//! Invariants: a secret is only ever written into a request whose TLS SNI, pinned address and
//! Host all name a host the secret is bound to; a placeholder for any other destination is
//! refused; the CA key never leaves this process.

pub mod ca;
mod http;
mod inject;
mod io;
mod scan;

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

pub(crate) use self::http::{Intercepted, serve};

/// The TLS client configuration for upstreams: the webpki roots plus `extra` trust anchors,
/// ALPN http/1.1.
pub fn upstream_tls_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots.add(cert.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
