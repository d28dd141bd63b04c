//! The node's configuration: what every pod on this node gets from the node, never from the
//! pod spec (the moat binary, the default profile, the keys a pod's own profile must be
//! signed with, where audit goes, the warm pools a pod may claim its VM from).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the node's configuration is read unless `MOAT_NODE_CONFIG` names another file.
pub const DEFAULT_PATH: &str = "/etc/moat/node.toml";

/// The node's configuration file (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The `moat` binary (default: `moat` beside the shim, else on PATH).
    #[serde(default)]
    pub moat: Option<PathBuf>,
    /// `moat run --backend`: auto (by the node's capability, as `moat run` decides), vm or
    /// namespace.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// The profile of a pod without a `moat.dev/profile` annotation; its signature is
    /// `<profile>.minisig`.
    pub default_profile: PathBuf,
    /// The key `default_profile` is signed with.
    pub default_pubkey: PathBuf,
    /// The keys a pod's own profile (annotation) may be signed with; none: pods get only the
    /// default profile, and an annotation is refused.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Where each pod's audit log is written (`<namespace>_<pod>.audit.jsonl`).
    #[serde(default = "default_audit_dir")]
    pub audit_dir: PathBuf,
    /// The node's OTLP sink (OTLP/HTTP, `http://`: a collector on the node): every pod's audit
    /// records are exported there as well as written to its file (`moat run --otlp-endpoint`).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The node's audit key, which signs the checkpoints of every pod's audit chain
    /// (`moat run --audit-key`; default: moat's, /var/lib/moat/audit.key for root).
    #[serde(default)]
    pub audit_key: Option<PathBuf>,
    /// Where the shim keeps a pod's own files (its verified profile).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Extra CA certificates (PEM) every workspace trusts (`moat run --ca`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Extra CA certificates (PEM) the egress proxy trusts for intercepted upstreams
    /// (`--upstream-ca`: a corporate TLS-inspection CA).
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    /// Static name resolution for the proxies (`--resolve host=addr`): development and tests.
    #[serde(default)]
    pub resolve: Vec<String>,
    /// The warm pools this node keeps (each a `moat pool` the node runs), by the name a pod
    /// asks for one with (`moat.dev/pool`): `[pools.NAME]`.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

/// One warm pool of the node: restored, paused VM workspaces made from one template, of
/// which a pod claims one (`moat run --backend vm --pool SOCKET`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The socket the node's `moat pool --socket` serves claims on.
    pub socket: PathBuf,
}

fn default_backend() -> String {
    "auto".to_owned()
}

fn default_audit_dir() -> PathBuf {
    PathBuf::from("/var/log/moat/pods")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/moat/pods")
}

/// Why the node's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The file could not be read.
    #[error("cannot read the node configuration {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not a node configuration.
    #[error("invalid node configuration {}", .0.display())]
    Parse(PathBuf, #[source] toml::de::Error),
}

impl NodeConfig {
    /// The file `MOAT_NODE_CONFIG` names, or [`DEFAULT_PATH`].
    pub fn path() -> PathBuf {
        std::env::var_os("MOAT_NODE_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| NodeError::Read(path.to_owned(), e))?;
        toml::from_str(&text).map_err(|e| NodeError::Parse(path.to_owned(), e))
    }

    /// The `moat` binary: the configured one, else the one beside this shim, else `moat` on
    /// PATH.
    pub fn moat_binary(&self) -> PathBuf {
        if let Some(path) = &self.moat {
            return path.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("moat")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("moat"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_unknown_key_is_refused_naming_it() {
        let err = toml::from_str::<NodeConfig>(
            "default_profile = \"/p\"\ndefault_pubkey = \"/k\"\nsecrets = []\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("secrets"), "{err}");
    }

    #[test]
    fn the_defaults_are_the_nodes_log_and_run_directories() {
        let config: NodeConfig =
            toml::from_str("default_profile = \"/p\"\ndefault_pubkey = \"/k\"\n").unwrap();
        assert_eq!(config.audit_dir, Path::new("/var/log/moat/pods"));
        assert_eq!(config.backend, "auto");
        assert!(config.trusted_keys.is_empty());
        assert!(config.pools.is_empty());
    }

    #[test]
    fn pools_are_read_by_name_with_their_sockets() {
        let config: NodeConfig = toml::from_str(
            "default_profile = \"/p\"\ndefault_pubkey = \"/k\"\n\
             [pools.python]\nsocket = \"/run/moat/pools/python.sock\"\n",
        )
        .unwrap();
        assert_eq!(
            config.pools["python"].socket,
            Path::new("/run/moat/pools/python.sock")
        );
    }

    #[test]
    fn a_pool_without_its_socket_or_with_an_unknown_key_is_refused() {
        let base = "default_profile = \"/p\"\ndefault_pubkey = \"/k\"\n[pools.python]\n";
        let missing = toml::from_str::<NodeConfig>(base).unwrap_err();
        assert!(missing.to_string().contains("socket"), "{missing}");
        let unknown = toml::from_str::<NodeConfig>(&format!("{base}socket = \"/s\"\nsize = 4\n"))
            .unwrap_err();
        assert!(unknown.to_string().contains("size"), "{unknown}");
    }
}
