//! The broker's X.509 side: a TLS CA for its own server certificate (which clients and workspace
//! hosts pin), and a workspace CA whose client certificates are the workspaces' tunnel identities.
//!
//! Both CAs live in the state directory (keys mode 0600) and survive restarts. A workspace
//! certificate carries the workspace's name as its CN, a random serial, the clientAuth purpose
//! only, and a bounded lifetime; the tunnel listener accepts no other CA and no server
//! certificate as a client.
//!
//! Every workspace certificate issued is recorded, with its serial, in the state directory's
//! register ([`ISSUED`]) before it is handed out, so that revoking a workspace can revoke each of
//! its certificates by serial ([`Pki::issued_to`]): a name alone would let an old, stolen
//! certificate back in as soon as the name is allowed again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_broker_client::protocol::EGRESS_ALPN;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
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
/// The register of issued workspace certificates in the state directory: one JSON object a line
/// ([`Issued`]), appended by every enrolment.
pub const ISSUED: &str = "workspace-certificates.jsonl";
/// Random bytes in a workspace certificate's serial (RFC 5280 allows up to 20 octets).
const SERIAL_BYTES: usize = 16;

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
    /// The system's random generator failed.
    #[error("no randomness for a certificate serial")]
    Random,
    /// A line of the register of issued certificates is not a record.
    #[error("{}, line {}: not a record of an issued certificate", .path.display(), .line)]
    Register {
        /// The register.
        path: PathBuf,
        /// Which line (from 1).
        line: usize,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A certificate's serial number, as lowercase hex without leading zero octets: how the
/// register and the revocation list name a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Serial(String);

impl Serial {
    /// The serial whose DER integer content is `bytes` (big-endian).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        // Zero (not issued here, but parseable) keeps one octet.
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        let significant = bytes.get(first..).unwrap_or_default();
        Serial(significant.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The serial as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of the register of issued workspace certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issued {
    /// The workspace the certificate names.
    pub workspace: WorkspaceName,
    /// Its serial.
    pub serial: Serial,
    /// Its end (Unix seconds).
    pub not_after: i64,
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
    /// The certificate's serial, as recorded in the register.
    pub serial: Serial,
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
    /// The register of issued workspace certificates ([`ISSUED`]).
    register: PathBuf,
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
            register: state_dir.join(ISSUED),
        })
    }

    /// The TLS CA (PEM) that clients and workspace hosts pin for the broker.
    pub fn tls_ca_pem(&self) -> &str {
        &self.tls_ca.pem
    }

    /// Issues a tunnel identity for `workspace`, with a random serial, and records it in the
    /// register before handing it out: a certificate that is not recorded could not be revoked
    /// by serial, so none is issued when the record cannot be written.
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
        params.serial_number = Some(random_serial()?);
        params.not_before = offset(BACKDATE, false);
        params.not_after = offset(WORKSPACE_VALIDITY, true);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = params.not_after.unix_timestamp();
        let key = KeyPair::generate().map_err(PkiError::Cert)?;
        let cert = params
            .signed_by(&key, &self.workspace_ca.issuer)
            .map_err(PkiError::Cert)?;
        // The serial exactly as the tunnel listener will read it from the certificate.
        let serial =
            serial_of(cert.der()).ok_or(PkiError::Cert(rcgen::Error::CouldNotParseCertificate))?;
        self.record(&Issued {
            workspace: workspace.clone(),
            serial: serial.clone(),
            not_after,
        })?;
        Ok(Enrolment {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            broker_ca_pem: self.tls_ca.pem.clone(),
            serial,
        })
    }

    /// Appends `issued` to the register, durably. One `write` of a short line with `O_APPEND`:
    /// an enrolment (`moat-broker enrol`, another process) and the running broker reading the
    /// register never see each other's half lines.
    fn record(&self, issued: &Issued) -> Result<(), PkiError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| PkiError::Io {
            path: self.register.clone(),
            source,
        };
        let mut line = serde_json::to_vec(issued).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.register)
            .map_err(io)?;
        file.write_all(&line).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The serials of every certificate ever issued to `workspace`, from the register. A line
    /// still being written (no newline yet) is not counted; any other line that is not a record
    /// is an error, so a revocation never silently misses a certificate.
    pub fn issued_to(&self, workspace: &WorkspaceName) -> Result<Vec<Serial>, PkiError> {
        let text = match std::fs::read_to_string(&self.register) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PkiError::Io {
                    path: self.register.clone(),
                    source,
                });
            }
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut serials = Vec::new();
        for (i, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let issued: Issued =
                serde_json::from_str(line).map_err(|source| PkiError::Register {
                    path: self.register.clone(),
                    line: i + 1,
                    source,
                })?;
            if &issued.workspace == workspace {
                serials.push(issued.serial);
            }
        }
        Ok(serials)
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
        config.alpn_protocols = vec![b"h2".to_vec(), EGRESS_ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The workspace a verified tunnel client certificate stands for (its CN, parsed as a name).
pub fn workspace_of(cert: &CertificateDer<'_>) -> Option<WorkspaceName> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    WorkspaceName::try_from(cn).ok()
}

/// A certificate's serial number.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Serial> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(Serial::from_be_bytes(parsed.raw_serial()))
}

/// A fresh serial: [`SERIAL_BYTES`] from the system's generator, the first octet's top bit
/// clear so that the DER integer stays positive and within RFC 5280's 20 octets.
fn random_serial() -> Result<SerialNumber, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SERIAL_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
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

#[cfg(test)]
mod tests {

    use super::*;

    fn ws(name: &str) -> WorkspaceName {
        WorkspaceName::try_from(name).unwrap()
    }

    fn pki(dir: &Path) -> Pki {
        Pki::load_or_create(&dir.join("state"), &["127.0.0.1".to_owned()]).unwrap()
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn every_enrolment_is_recorded_with_the_serial_its_certificate_carries() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());

        let first = pki.enrol(&ws("ws1")).unwrap();
        let other = pki.enrol(&ws("ws2")).unwrap();
        let again = pki.enrol(&ws("ws1")).unwrap();

        assert_eq!(serial_of(&der(&first.cert_pem)), Some(first.serial.clone()));
        assert_eq!(serial_of(&der(&again.cert_pem)), Some(again.serial.clone()));
        assert_ne!(first.serial, again.serial);
        assert_eq!(
            pki.issued_to(&ws("ws1")).unwrap(),
            vec![first.serial, again.serial]
        );
        assert_eq!(pki.issued_to(&ws("ws2")).unwrap(), vec![other.serial]);
        assert!(pki.issued_to(&ws("ws3")).unwrap().is_empty());
        // The register survives a restart (it is the state directory's).
        let restarted = Pki::load_or_create(&dir.path().join("state"), &[]).unwrap();
        assert_eq!(restarted.issued_to(&ws("ws1")).unwrap().len(), 2);
    }

    #[test]
    fn a_line_being_written_is_not_counted_and_a_malformed_one_is_an_error() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let issued = pki.enrol(&ws("ws1")).unwrap();
        let mut register = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("state").join(ISSUED))
            .unwrap();

        register.write_all(br#"{"workspace":"ws1","ser"#).unwrap();
        assert_eq!(pki.issued_to(&ws("ws1")).unwrap(), vec![issued.serial]);

        register.write_all(b"\n").unwrap();
        assert!(matches!(
            pki.issued_to(&ws("ws1")),
            Err(PkiError::Register { line: 2, .. })
        ));
    }

    #[test]
    fn serials_are_hex_without_leading_zero_octets() {
        assert_eq!(Serial::from_be_bytes(&[0, 0x7f, 0x01]).as_str(), "7f01");
        assert_eq!(Serial::from_be_bytes(&[0, 0]).as_str(), "00");
    }
}
