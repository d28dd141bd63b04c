//! The per-workspace interception CA: generated at proxy start (ECDSA P-256, rcgen), its key
//! held in this process's memory only, never written anywhere. Leaf certificates are minted
//! per SNI name on first use (one name each, valid for [`LEAF_VALIDITY`]) and cached.
//!
//! Only the CA *certificate* leaves this module ([`WorkspaceCa::cert_pem`]), for guest-init
//! to install in the workspace's trust store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
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

impl WorkspaceCa {
    /// Generates a fresh CA for `workspace`.
    pub fn generate(workspace: &str) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
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
            leaf_key: KeyPair::generate().map_err(CaError::Generate)?,
            cert_pem,
            cache: Mutex::new(HashMap::new()),
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

    fn mint(&self, name: &str) -> Result<ServerConfig, CaError> {
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
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let config_err = |source| CaError::Config {
            name: name.to_owned(),
            source,
        };
        let mut config = ServerConfig::builder_with_provider(super::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.cert_der()], key)
            .map_err(config_err)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The agent runs on this machine, so the suite cheapest here (see crypto_provider) is
        // the cheapest for it too.
        config.ignore_client_order = true;
        Ok(config)
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn leaf_is_cached_per_name() {
        let ca = WorkspaceCa::generate("t").unwrap();
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        let c = ca.server_config("other.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn ca_pem_is_a_certificate_and_never_a_key() {
        let ca = WorkspaceCa::generate("t").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.cert_pem().contains("PRIVATE KEY"));
    }
}
