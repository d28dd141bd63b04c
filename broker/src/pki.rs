//! The broker's X.509 side: a TLS CA for its own server certificate (which clients and workspace
//! hosts pin), and a workspace CA whose client certificates are the workspaces' tunnel identities.
//!
//! Both CAs live in the state directory (keys mode 0600) and survive restarts. A workspace
//! certificate carries the workspace's name as its CN, the clientAuth purpose only, and a bounded
//! lifetime; the tunnel listener accepts no other CA and no server certificate as a client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::config::WorkspaceName;
use crate::ssh_ca::write_private;

/// CA lifetime.
const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// The broker's server certificate is minted at every start, for this long.
const SERVER_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// A workspace identity's lifetime (enrol again before it ends).
pub const WORKSPACE_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("cannot use {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Key or certificate generation or parsing failed.
    #[error("certificate operation failed")]
    Cert(#[source] rcgen::Error),
    /// A TLS configuration could not be built.
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The client verifier could not be built.
    #[error("cannot build the workspace certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// A workspace's tunnel identity, handed to its host at enrolment.
#[derive(Debug)]
pub struct Enrolment {
    /// Its certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM). Secret.
    pub key_pem: String,
    /// The broker's TLS CA (PEM), which the host pins for the broker.
    pub broker_ca_pem: String,
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// Both CAs and the current server certificate.
pub struct Pki {
    tls_ca: Ca,
    workspace_ca: Ca,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

fn offset(by: Duration, forward: bool) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let d = time::Duration::try_from(by).unwrap_or(time::Duration::ZERO);
    if forward { now + d } else { now - d }
}

fn load_or_create_ca(dir: &Path, stem: &str, common_name: &str) -> Result<Ca, PkiError> {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io { path, source }
    };
    if key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(PkiError::Cert)?;
        let issuer = Issuer::from_ca_cert_pem(&pem, key).map_err(PkiError::Cert)?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|_| PkiError::Cert(rcgen::Error::CouldNotParseCertificate))?;
        return Ok(Ca { issuer, der, pem });
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Cert)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "moat");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = offset(BACKDATE, false);
    params.not_after = offset(CA_VALIDITY, true);
    let key = KeyPair::generate().map_err(PkiError::Cert)?;
    let key_pem = key.serialize_pem();
    let certified = CertifiedIssuer::self_signed(params, key).map_err(PkiError::Cert)?;
    let pem = certified.pem();
    let der = certified.der().clone();
    write_private(&key_path, key_pem.as_bytes()).map_err(io(&key_path))?;
    std::fs::write(&cert_path, &pem).map_err(io(&cert_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(PkiError::Cert)?;
    let issuer = Issuer::from_ca_cert_pem(&pem, key).map_err(PkiError::Cert)?;
    Ok(Ca { issuer, der, pem })
}

impl Pki {
    /// Loads (or creates) both CAs under `state_dir` and mints a server certificate for
    /// `server_names` (DNS names or IP addresses).
    pub fn load_or_create(state_dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        create_private_dir(state_dir)?;
        let tls_ca = load_or_create_ca(state_dir, "tls-ca", "moat broker TLS CA")?;
        let workspace_ca = load_or_create_ca(state_dir, "workspace-ca", "moat workspace CA")?;
        let mut params = CertificateParams::new(server_names.to_vec()).map_err(PkiError::Cert)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "moat broker");
        params.not_before = offset(BACKDATE, false);
        params.not_after = offset(SERVER_VALIDITY, true);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(PkiError::Cert)?;
        let cert = params
            .signed_by(&key, &tls_ca.issuer)
            .map_err(PkiError::Cert)?;
        Ok(Pki {
            server_chain: vec![cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            tls_ca,
            workspace_ca,
        })
    }

    /// The TLS CA (PEM) that clients and workspace hosts pin for the broker.
    pub fn tls_ca_pem(&self) -> &str {
        &self.tls_ca.pem
    }

    /// Issues a tunnel identity for `workspace`.
    pub fn enrol(&self, workspace: &WorkspaceName) -> Result<Enrolment, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Cert)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, workspace.as_str());
        params.subject_alt_names = vec![SanType::URI(
            format!("moat-workspace:{workspace}")
                .try_into()
                .map_err(PkiError::Cert)?,
        )];
        params.not_before = offset(BACKDATE, false);
        params.not_after = offset(WORKSPACE_VALIDITY, true);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(PkiError::Cert)?;
        let cert = params
            .signed_by(&key, &self.workspace_ca.issuer)
            .map_err(PkiError::Cert)?;
        Ok(Enrolment {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            broker_ca_pem: self.tls_ca.pem.clone(),
        })
    }

    fn server_builder(
        &self,
    ) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, PkiError> {
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::Tls)
    }

    /// The people-facing HTTPS listener's configuration (TLS 1.3, HTTP/1.1).
    pub fn api_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut config = self
            .server_builder()?
            .with_no_client_auth()
            .with_single_cert(
                self.server_chain.clone(),
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )
            .map_err(PkiError::Tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The tunnel listener's configuration: TLS 1.3, a client certificate of the workspace CA
    /// required; ALPN `h2` for the tunnel, `moat-egress` for corporate egress.
    pub fn tunnel_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.workspace_ca.der.clone())
            .map_err(PkiError::Tls)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(PkiError::Verifier)?;
        let mut config = self
            .server_builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.server_chain.clone(),
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )
            .map_err(PkiError::Tls)?;
        config.alpn_protocols = vec![b"h2".to_vec(), crate::corporate::ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The workspace a verified tunnel client certificate stands for (its CN, parsed as a name).
pub fn workspace_of(cert: &CertificateDer<'_>) -> Option<WorkspaceName> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    WorkspaceName::try_from(cn).ok()
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(PkiError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}
