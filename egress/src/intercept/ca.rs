//! The per-workspace interception CA: generated at proxy start (ECDSA P-256, rcgen), its key
//! held in this process's memory only, never written anywhere. Leaf certificates are minted
//! per SNI name on first use (one name each, valid for [`LEAF_VALIDITY`]) and cached.
//!
//! The CA certificate carries X.509 name constraints (RFC 5280, 4.2.1.10): permitted DNS
//! subtrees for exactly the hosts the policy at start intercepts ([`intercept_scope`]), so even
//! the workspace's own trust store accepts it for nothing else (rustls/webpki, OpenSSL, Go and
//! browsers enforce them). The scope is fixed with the certificate: a reload that would
//! intercept a host outside it is refused (restart the workspace for a new CA), and no leaf is
//! ever minted outside it.
//!
//! Only the CA *certificate* leaves this module ([`WorkspaceCa::cert_pem`]), for guest-init
//! to install in the workspace's trust store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_policy::{Action, HostPattern, Policy};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// How long a minted leaf is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is re-minted after this long, well before it expires.
const LEAF_REFRESH: Duration = Duration::from_secs(12 * 3600);
/// How long the CA certificate is valid (a workspace rarely lives this long).
const CA_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Leaves cached at most; the cache is emptied when full.
const MAX_CACHED: usize = 1024;
/// Clock skew allowed for on certificates' start of validity.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Why the CA or a leaf could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key generation or signing failed.
    #[error("cannot generate the workspace CA")]
    Generate(#[source] rcgen::Error),
    /// A leaf could not be signed.
    #[error("cannot mint a certificate for {name}")]
    Mint {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The name is outside the CA's name constraints (the policy at start intercepted no such
    /// host).
    #[error("{name} is outside the workspace CA's name constraints")]
    OutOfScope {
        /// The name.
        name: String,
    },
    /// rustls refused the minted certificate or key.
    #[error("cannot build the TLS server configuration for {name}")]
    Config {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}

struct Cached {
    config: Arc<ServerConfig>,
    minted: Instant,
}

/// One workspace's interception CA.
pub struct WorkspaceCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The permitted DNS subtrees of the certificate's name constraints.
    scope: Vec<String>,
    /// One key for every leaf (the CA key signs; leaves only prove they hold this one).
    leaf_key: KeyPair,
    cert_pem: String,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for WorkspaceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceCa").finish_non_exhaustive()
    }
}

fn offset(now: OffsetDateTime, by: Duration, forward: bool) -> OffsetDateTime {
    let d = time::Duration::try_from(by).unwrap_or(time::Duration::ZERO);
    if forward { now + d } else { now - d }
}

/// The DNS subtrees a workspace CA may certify under `policy`: every host of every intercept
/// rule (an exact name, or the suffix of a `*.` pattern; a subtree covers its name and every
/// name below it). None when nothing is intercepted: the CA then permits only `invalid`
/// (RFC 6761), so it certifies no real name at all.
pub fn intercept_scope(policy: &Policy) -> Vec<String> {
    let mut scope: Vec<String> = policy
        .rules
        .iter()
        .filter(|r| r.action == Action::Intercept)
        .flat_map(|r| &r.hosts)
        .map(|h| match h {
            HostPattern::Exact(name) | HostPattern::Suffix(name) => name.clone(),
        })
        .collect();
    scope.sort();
    scope.dedup();
    if scope.is_empty() {
        scope.push("invalid".to_owned());
    }
    scope
}

impl WorkspaceCa {
    /// Generates a fresh CA for `workspace`, constrained to the DNS subtrees `scope` (see
    /// [`intercept_scope`]; an empty scope permits only `invalid`).
    pub fn generate(workspace: &str, scope: &[String]) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let mut scope = scope.to_vec();
        if scope.is_empty() {
            scope.push("invalid".to_owned());
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: scope.iter().cloned().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: Vec::new(),
        });
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "moat");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("moat workspace CA ({workspace})"),
        );
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, CA_VALIDITY, true);
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(CaError::Generate)?;
        let cert_pem = issuer.pem();
        Ok(WorkspaceCa {
            issuer,
            scope,
            leaf_key: KeyPair::generate().map_err(CaError::Generate)?,
            cert_pem,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Does the CA's name scope cover `pattern` (every name it matches)?
    pub fn covers(&self, pattern: &HostPattern) -> bool {
        let (HostPattern::Exact(name) | HostPattern::Suffix(name)) = pattern;
        self.covers_name(name)
    }

    fn covers_name(&self, name: &str) -> bool {
        self.scope.iter().any(|d| {
            name.strip_suffix(d.as_str())
                .is_some_and(|head| head.is_empty() || head.ends_with('.'))
        })
    }

    /// The CA certificate, PEM, for the workspace's trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// The TLS server configuration presenting a leaf for `name` (normalised, already held to
    /// the policy), minted on first use and cached. ALPN: h2, then http/1.1.
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, CaError> {
        {
            let cache = self.lock();
            if let Some(c) = cache.get(name)
                && c.minted.elapsed() < LEAF_REFRESH
            {
                return Ok(Arc::clone(&c.config));
            }
        }
        let config = Arc::new(self.mint(name)?);
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            name.to_owned(),
            Cached {
                config: Arc::clone(&config),
                minted: Instant::now(),
            },
        );
        Ok(config)
    }

    /// The server configuration presenting a new leaf for `name`, which must be in scope.
    fn mint(&self, name: &str) -> Result<ServerConfig, CaError> {
        if !self.covers_name(name) {
            return Err(CaError::OutOfScope {
                name: name.to_owned(),
            });
        }
        let leaf = self.leaf(name)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let config_err = |source| CaError::Config {
            name: name.to_owned(),
            source,
        };
        let mut config = ServerConfig::builder_with_provider(super::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(vec![leaf, self.cert_der()], key)
            .map_err(config_err)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The agent runs on this machine, so the suite cheapest here (see crypto_provider) is
        // the cheapest for it too.
        config.ignore_client_order = true;
        Ok(config)
    }

    /// A leaf certificate for `name`, signed by the CA (scope not checked here).
    fn leaf(&self, name: &str) -> Result<CertificateDer<'static>, CaError> {
        let mint_err = |source| CaError::Mint {
            name: name.to_owned(),
            source,
        };
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(mint_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, LEAF_VALIDITY, true);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(mint_err)?;
        Ok(leaf.der().clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// Verifies `leaf` for `name` as a client trusting only `ca` does (rustls, webpki).
    fn verify(ca: &WorkspaceCa, leaf: &CertificateDer<'static>, name: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            super::super::crypto_provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(leaf, &[], &name, &[], now)
            .is_ok()
    }

    #[test]
    fn leaf_inside_the_name_constraints_verifies() {
        let ca = WorkspaceCa::generate("t", &scope(&["api.example.com", "example.org"])).unwrap();
        for name in ["api.example.com", "example.org", "a.b.example.org"] {
            assert!(verify(&ca, &ca.leaf(name).unwrap(), name), "{name}");
        }
    }

    #[test]
    fn leaf_outside_the_name_constraints_is_rejected_by_a_verifying_client() {
        let ca = WorkspaceCa::generate("t", &scope(&["api.example.com"])).unwrap();
        // Minted here bypassing the scope check, as a stolen CA key could.
        for name in ["bank.example", "example.com", "evilapi.example.com"] {
            assert!(!verify(&ca, &ca.leaf(name).unwrap(), name), "{name}");
        }
    }

    #[test]
    fn no_leaf_is_minted_outside_the_scope() {
        let ca = WorkspaceCa::generate("t", &scope(&["api.example.com"])).unwrap();
        assert!(matches!(
            ca.server_config("bank.example"),
            Err(CaError::OutOfScope { .. })
        ));
    }

    #[test]
    fn ca_without_intercepted_hosts_certifies_only_invalid() {
        let ca = WorkspaceCa::generate("t", &[]).unwrap();
        assert!(!ca.covers(&HostPattern::parse("example.com").unwrap()));
        assert!(!verify(
            &ca,
            &ca.leaf("example.com").unwrap(),
            "example.com"
        ));
    }

    #[test]
    fn scope_covers_names_and_wildcards_below_its_subtrees_only() {
        let ca = WorkspaceCa::generate("t", &scope(&["example.com"])).unwrap();
        for (pattern, covered) in [
            ("example.com", true),
            ("api.example.com", true),
            ("*.example.com", true),
            ("*.api.example.com", true),
            ("badexample.com", false),
            ("*.com", false),
        ] {
            let p = HostPattern::parse(pattern).unwrap();
            assert_eq!(ca.covers(&p), covered, "{pattern}");
        }
    }

    #[test]
    fn leaf_is_cached_per_name() {
        let ca = WorkspaceCa::generate("t", &scope(&["example.com"])).unwrap();
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        let c = ca.server_config("other.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn ca_pem_is_a_certificate_and_never_a_key() {
        let ca = WorkspaceCa::generate("t", &[]).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.cert_pem().contains("PRIVATE KEY"));
    }
}
