//! Interception: for a flow whose rule's action is `intercept`, the proxy terminates the
//! agent's TLS with a leaf of the workspace CA, reads every HTTP request, injects the secrets
//! bound to the host, and forwards the request over its own, verified, TLS connection to the
//! address the flow was pinned to. Everything else stays passthrough.
//!
//! ```text
//!  flow admitted (policy, SNI == flow hostname, resolved + classified address, connected,
//!  or an idle connection for the same name and address taken from pool.rs)
//!    -> upstream TLS      verified: webpki roots + Config::upstream_roots; SNI = hostname
//!    -> agent TLS         ca.rs: leaf minted for the hostname, ALPN h2 or http/1.1
//!    -> HTTP/1.1 framing  framing.rs: each request head seen as sent (CL with TE refused)
//!    -> HTTP server       hyper: HTTP/2, or HTTP/1.1 keep-alive, pipelining (in order),
//!                         chunked; bounded heads
//!    -> per request       inject.rs: authority, HTTP rules, placeholders, credentials,
//!                         hop-by-hop; mcp.rs: MCP rules on the rule's MCP endpoint (JSON-RPC
//!                         read by jsonrpc.rs, judged per message; tools/list answers filtered)
//!                         scan.rs: placeholders in the streamed body, across frames
//!    -> forward           http.rs: hyper client (h2 or HTTP/1.1 by ALPN) on the pinned
//!                         connection (re-dialled to the same address when the upstream closes
//!                         it); bodies stream both ways
//!    -> response          reflect.rs: head, body and trailers scanned for every secret
//!                         injected on the connection (raw and encoded), each hit replaced
//!                         by its placeholder before the agent sees a byte; compressed
//!                         bodies asked away (Accept-Encoding: identity) or refused
//!    -> audit             one OCSF HTTP Activity record per request
//!    -> flow end          pool.rs: the idle upstream connection kept for the next flow
//! ```
//!
//! Invariants: a secret is only ever written into a request whose TLS SNI, pinned address and
//! Host all name a host the secret is bound to; a placeholder for any other destination is
//! refused; a secret injected on a connection never reaches the agent in a response on it,
//! raw or in the encodings reflect.rs lists; the CA key never leaves this process; a pooled upstream connection only ever
//! carries requests for the name and address it was verified for, under the policy in force
//! when it was opened.

pub mod ca;
pub mod framing;
mod http;
pub mod inject;
mod io;
pub mod jsonrpc;
mod mcp;
pub(crate) mod pool;
mod reflect;
mod scan;

use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;

pub(crate) use self::http::{Intercepted, Upstream, serve};

/// Largest request head (request line and headers) accepted; more is answered 431. hyper's
/// server is built with it (http.rs) and the framing follower (framing.rs) gives up past it.
pub(crate) const MAX_REQUEST_HEAD: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an answer's body stopped on its way to the agent: the upstream's error, or a filter's
/// (mcp.rs). A concrete type, where a boxed error trips the compiler's checks of hyper's
/// server future.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BodyError(pub(crate) String);

impl From<hyper::Error> for BodyError {
    fn from(e: hyper::Error) -> Self {
        BodyError(e.to_string())
    }
}
/// A request body on its way upstream: streamed (scanned), or rewritten whole. Sent by
/// http.rs on the connections that pool.rs keeps.
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A DER certificate (a trust anchor for upstreams).
pub type Certificate = CertificateDer<'static>;

/// Reads every certificate of a PEM bundle (for `Config::upstream_roots`). A bundle holding
/// none is an error.
pub fn read_pem_certs(path: &std::path::Path) -> std::io::Result<Vec<Certificate>> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if certs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no PEM certificate in the file",
        ));
    }
    Ok(certs)
}

/// The crypto provider of both TLS sides: ring, with the AES-128-GCM suites first. Every
/// intercepted byte is decrypted and encrypted again, and AES-128 does ten rounds per block
/// where AES-256 does fourteen; TLS 1.3's AES-128 suite also hashes with SHA-256, which the
/// CPU accelerates, where AES-256's uses SHA-384. Both are TLS 1.3's recommended suites (RFC
/// 8446, 9.1); the set offered and accepted is ring's default, only the order changes.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // Stable: otherwise the default order (TLS 1.3 first, then by strength) is kept.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// The TLS client configuration for upstreams: the webpki roots plus `extra` trust anchors,
/// ALPN h2 then http/1.1.
pub fn upstream_tls_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        // A bundle's anchors are added one by one: a bad one is an error, never skipped.
        roots.add(cert.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bundle_reads_back_the_workspace_ca() {
        let ca = ca::WorkspaceCa::generate("t", &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert_pem()).unwrap();
        assert_eq!(read_pem_certs(&path).unwrap(), vec![ca.cert_der()]);
    }

    #[test]
    fn file_without_a_certificate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        assert!(read_pem_certs(&path).is_err());
    }

    #[test]
    fn aes_128_gcm_is_preferred_and_no_suite_is_added_or_dropped() {
        let ours = crypto_provider();
        let default = rustls::crypto::ring::default_provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let mut a: Vec<_> = ours.cipher_suites.iter().map(|s| s.suite()).collect();
        let mut b: Vec<_> = default.cipher_suites.iter().map(|s| s.suite()).collect();
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b);
    }

    #[test]
    fn extra_roots_are_accepted_alongside_the_webpki_roots() {
        let ca = ca::WorkspaceCa::generate("t", &[]).unwrap();
        assert!(upstream_tls_config(&[ca.cert_der()]).is_ok());
    }
}
