//! The broker's configuration file (TOML), parsed once at start and refused if it names anything
//! unknown.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("invalid configuration {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Defined with the wire protocol, which the clients share.
pub use moat_broker_client::protocol::WorkspaceName;

impl From<moat_broker_client::protocol::InvalidName> for ConfigError {
    fn from(e: moat_broker_client::protocol::InvalidName) -> Self {
        ConfigError::Invalid(e.to_string())
    }
}

/// A corporate service's name, with the same rules as a workspace's: what a workspace asks the
/// broker for instead of an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ServiceName {
    type Error = ConfigError;
    fn try_from(s: &str) -> Result<Self, ConfigError> {
        WorkspaceName::try_from(s)
            .map(|n| ServiceName(n.as_str().to_owned()))
            .map_err(|_| ConfigError::Invalid(format!("{s:?} is not a service name")))
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ServiceName::try_from(s.as_str()).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where people's clients connect (HTTPS).
    pub listen: SocketAddr,
    /// Where workspaces' host sides connect their tunnels (TLS with a workspace certificate).
    pub tunnel_listen: SocketAddr,
    /// The broker's base URL as people's browsers reach it (the OIDC redirect goes there).
    pub public_url: String,
    /// DNS names and IP addresses in the broker's TLS server certificate.
    pub server_names: Vec<String>,
    /// Keys and CAs (created on first start, mode 0700).
    pub state_dir: PathBuf,
    /// The admin API's Unix socket (mode 0600: whoever can open it may revoke).
    pub admin_socket: PathBuf,
    /// OCSF JSON Lines audit log; standard output if absent.
    pub audit: Option<PathBuf>,
    /// Session lifetime in seconds (60 to 43200). A session is never renewed past it.
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// The bound, in seconds, on how long a session outlives the identity provider's last word
    /// on it ([`ENTITLEMENT_CHECK_SECS`], at most `session_ttl_secs`): the broker uses each
    /// session's refresh token at the provider before that long has passed since the last
    /// confirmation, and ends the session when the provider refuses, when the person's groups no
    /// longer entitle them, or when no confirmation came in time (provider unreachable, no
    /// refresh token).
    #[serde(default = "default_entitlement_check")]
    pub entitlement_check_secs: u64,
    /// The identity provider.
    pub oidc: OidcConfig,
    /// The workspaces people may reach, and who may reach them.
    #[serde(default)]
    pub workspaces: Vec<WorkspaceConfig>,
    /// Corporate services workspaces may reach through the broker (and no other way).
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// One corporate service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Its name, as workspaces ask for it.
    pub name: ServiceName,
    /// Where the broker connects: `host:port`, resolved by the broker.
    pub address: String,
}

fn default_session_ttl() -> u64 {
    900
}

/// The range of `entitlement_check_secs`. Below 10 s is meant for tests: every live session
/// costs one token request at the provider per interval.
pub const ENTITLEMENT_CHECK_SECS: std::ops::RangeInclusive<u64> = 2..=3600;

fn default_entitlement_check() -> u64 {
    60
}

/// The OpenID Connect provider and the broker's client registration there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer, exactly as in its discovery document and its ID tokens (https only).
    pub issuer: String,
    /// The broker's client id.
    pub client_id: String,
    /// A file holding the client secret (never in this file).
    pub client_secret_file: PathBuf,
    /// Extra trust anchors (PEM) for the provider's TLS, besides the Web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// The claim that lists a person's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// ID token signature algorithms accepted; asymmetric only (RS256, RS384, RS512, PS256,
    /// PS384, PS512, ES256, ES384, EdDSA).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned(), "ES256".to_owned()]
}

/// One workspace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    /// Its name (also the CN of its tunnel certificate).
    pub name: WorkspaceName,
    /// Members of any of these groups may reach it.
    pub groups: Vec<String>,
    /// The account people log into over SSH (the certificate's only principal).
    #[serde(default = "default_ssh_user")]
    pub ssh_user: String,
    /// The vsock port the workspace's sshd answers on.
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u32,
    /// The corporate services this workspace may reach (names from `[[services]]`).
    #[serde(default)]
    pub services: Vec<ServiceName>,
}

fn default_ssh_user() -> String {
    "agent".to_owned()
}

fn default_ssh_port() -> u32 {
    22
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(60..=43_200).contains(&self.session_ttl_secs) {
            return Err(ConfigError::Invalid(
                "session_ttl_secs must be between 60 and 43200".into(),
            ));
        }
        if !ENTITLEMENT_CHECK_SECS.contains(&self.entitlement_check_secs) {
            return Err(ConfigError::Invalid(format!(
                "entitlement_check_secs must be between {} and {}",
                ENTITLEMENT_CHECK_SECS.start(),
                ENTITLEMENT_CHECK_SECS.end()
            )));
        }
        if self.entitlement_check_secs > self.session_ttl_secs {
            return Err(ConfigError::Invalid(format!(
                "entitlement_check_secs ({}) must not exceed session_ttl_secs ({})",
                self.entitlement_check_secs, self.session_ttl_secs
            )));
        }
        if !self.oidc.issuer.starts_with("https://") {
            return Err(ConfigError::Invalid(
                "oidc.issuer must be an https URL".into(),
            ));
        }
        if !self.public_url.starts_with("https://") {
            return Err(ConfigError::Invalid(
                "public_url must be an https URL".into(),
            ));
        }
        let mut names: Vec<&WorkspaceName> = self.workspaces.iter().map(|w| &w.name).collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid("a workspace is listed twice".into()));
        }
        for service in &self.services {
            let port = service
                .address
                .rsplit_once(':')
                .map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(p)) if p != 0) {
                return Err(ConfigError::Invalid(format!(
                    "service {}: address {:?} is not host:port",
                    service.name, service.address
                )));
            }
        }
        for ws in &self.workspaces {
            if let Some(s) = ws.services.iter().find(|s| self.service(s).is_none()) {
                return Err(ConfigError::Invalid(format!(
                    "workspace {} names service {s}, which is not configured",
                    ws.name
                )));
            }
        }
        Ok(())
    }

    /// The service called `name`, if configured.
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| &s.name == name)
    }

    /// The workspace called `name`, if configured.
    pub fn workspace(&self, name: &WorkspaceName) -> Option<&WorkspaceConfig> {
        self.workspaces.iter().find(|w| &w.name == name)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:8443"
tunnel_listen = "127.0.0.1:8444"
public_url = "https://broker.test"
server_names = ["broker.test"]
state_dir = "/var/lib/moat-broker"
admin_socket = "/run/moat-broker/admin.sock"

[oidc]
issuer = "https://idp.test"
client_id = "moat-broker"
client_secret_file = "/etc/moat-broker/secret"
"#;

    /// `BASE` with `top` (top-level keys) before it and `tables` after it.
    fn parse_with(top: &str, tables: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(&format!("{top}{BASE}{tables}")).map_err(|e| e.to_string())?;
        config.check().map_err(|e| e.to_string())?;
        Ok(config)
    }

    fn parse(tables: &str) -> Result<Config, String> {
        parse_with("", tables)
    }

    #[test]
    fn a_workspace_may_list_only_configured_services() {
        let err =
            parse("[[workspaces]]\nname = \"ws1\"\ngroups = [\"eng\"]\nservices = [\"git\"]\n");
        assert!(err.unwrap_err().contains("names service git"));
    }

    #[test]
    fn a_service_address_needs_a_port() {
        let err = parse("[[services]]\nname = \"git\"\naddress = \"git.corp\"\n");
        assert!(err.unwrap_err().contains("is not host:port"));
    }

    #[test]
    fn an_http_issuer_is_refused() {
        let config: Config =
            toml::from_str(&BASE.replace("https://idp.test", "http://idp.test")).unwrap();
        assert!(config.check().is_err());
    }

    #[test]
    fn sessions_last_between_a_minute_and_twelve_hours() {
        let ttl = |secs: u32| parse_with(&format!("session_ttl_secs = {secs}\n"), "");
        assert!(ttl(59).unwrap_err().contains("between 60 and 43200"));
        assert!(ttl(43_201).unwrap_err().contains("between 60 and 43200"));
        assert_eq!(ttl(900).unwrap().session_ttl_secs, 900);
    }

    #[test]
    fn the_entitlement_check_defaults_to_a_minute() {
        assert_eq!(parse("").unwrap().entitlement_check_secs, 60);
    }

    #[test]
    fn the_entitlement_check_is_between_two_seconds_and_an_hour() {
        let check = |secs: u64| {
            parse_with(
                &format!("session_ttl_secs = 43200\nentitlement_check_secs = {secs}\n"),
                "",
            )
        };
        assert!(check(0).unwrap_err().contains("between 2 and 3600"));
        assert!(check(1).unwrap_err().contains("between 2 and 3600"));
        assert!(check(3601).unwrap_err().contains("between 2 and 3600"));
        assert_eq!(check(2).unwrap().entitlement_check_secs, 2);
        assert_eq!(check(3600).unwrap().entitlement_check_secs, 3600);
    }

    #[test]
    fn the_entitlement_check_may_not_exceed_the_session_ttl() {
        let err = parse_with("session_ttl_secs = 300\nentitlement_check_secs = 301\n", "");
        assert!(
            err.unwrap_err()
                .contains("entitlement_check_secs (301) must not exceed session_ttl_secs (300)")
        );
        let ok = parse_with("session_ttl_secs = 300\nentitlement_check_secs = 300\n", "");
        assert_eq!(ok.unwrap().entitlement_check_secs, 300);
    }
}
