//! The live policy: loaded from a signed profile, swapped atomically on reload, and the sweep
//! that cuts live flows a new policy denies.
//!
//! Reload order matters: the new policy is *verified* first (a bad one changes nothing), then
//! swapped in, then every live flow is re-decided. A flow registers itself before checking the
//! current policy once more, so no flow can slip between a swap and its sweep.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use moat_policy::signing::PublicKey;
use moat_policy::signing::{self, SignError};
use moat_policy::{Action, Decision, Destination, Policy, Protocol, ServiceName};
use tokio_util::sync::CancellationToken;

/// Where a policy comes from: a profile, its detached signature, and the trusted key.
#[derive(Debug, Clone)]
pub struct PolicySource {
    /// The TOML profile.
    pub profile: PathBuf,
    /// Its minisign signature (conventionally `<profile>.minisig`).
    pub signature: PathBuf,
    /// The only key whose signatures are accepted.
    pub key: PublicKey,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A secret the policy declares could not be read.
    #[error("policy secrets refused")]
    Secrets(#[source] crate::secrets::SecretError),
    /// The policy intercepts a host outside the workspace CA's name constraints (fixed when the
    /// proxy started, from the policy in force then).
    #[error(
        "intercept host {host} is outside the workspace CA's name constraints; restart the workspace to intercept it"
    )]
    OutsideCaScope {
        /// The host pattern.
        host: String,
    },
    /// A validly signed profile whose serial is lower than the one in force: an older version
    /// replayed (rollback).
    #[error(
        "profile serial {serial} is lower than the serial in force ({in_force}): an older profile is not taken back"
    )]
    Rollback {
        /// The refused profile's serial.
        serial: u64,
        /// The serial of the policy in force.
        in_force: u64,
    },
    /// Verification or parsing failed.
    #[error("policy {} refused", .path.display())]
    Refused {
        /// The profile.
        path: PathBuf,
        /// Why.
        #[source]
        source: SignError,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

impl PolicySource {
    /// `profile`, `<profile>.minisig`, and the key file at `key_path`.
    pub fn new(profile: &Path, key_path: &Path) -> Result<Self, LoadError> {
        let key_text = String::from_utf8_lossy(&read(key_path)?).into_owned();
        let key = signing::parse_public_key(&key_text).map_err(|source| LoadError::Refused {
            path: key_path.to_owned(),
            source,
        })?;
        let mut sig = profile.as_os_str().to_owned();
        sig.push(".minisig");
        Ok(PolicySource {
            profile: profile.to_owned(),
            signature: PathBuf::from(sig),
            key,
        })
    }

    /// Reads and verifies the profile. Nothing is parsed before the signature checks out.
    pub fn load(&self) -> Result<Policy, LoadError> {
        self.load_attested().map(|(policy, _)| policy)
    }

    /// [`PolicySource::load`], and what the audit log's start record names as the policy in
    /// force: the profile's name, serial and path, the SHA-256 of the very bytes verified (the
    /// profile and its signature) and the signing key's minisign id and SHA-256.
    pub fn load_attested(&self) -> Result<(Policy, serde_json::Value), LoadError> {
        let profile = read(&self.profile)?;
        let sig_bytes = read(&self.signature)?;
        let sig = String::from_utf8_lossy(&sig_bytes);
        let policy = signing::load_verified(&profile, &sig, &self.key).map_err(|source| {
            LoadError::Refused {
                path: self.profile.clone(),
                source,
            }
        })?;
        let sha256 = |b: &[u8]| moat_audit::chain::hex(&moat_audit::chain::sha256(b));
        let subject = serde_json::json!({
            "name": policy.name,
            "serial": policy.serial,
            "profile": self.profile.display().to_string(),
            "profile_sha256": sha256(&profile),
            "signature_sha256": sha256(&sig_bytes),
            "signing_key": {
                "id": moat_audit::chain::hex(self.key.keynum()).to_uppercase(),
                "sha256": sha256(&self.key.to_bytes()),
            },
        });
        Ok((policy, subject))
    }
}

/// What the sweep needs to know about a live flow to re-decide it.
#[derive(Debug, Clone)]
pub struct LiveFlow {
    /// The flow's normalised hostname.
    pub hostname: Option<String>,
    /// The destination the guest claimed (the port is what was decided on).
    pub claimed: SocketAddr,
    /// The address actually connected to; none for a corporate flow (the broker connected).
    pub upstream: Option<IpAddr>,
    /// The service a corporate flow was sent to (a flow whose rule now names another service
    /// is cut).
    pub service: Option<ServiceName>,
    /// The protocol recognised (`Tcp` when the rule let bytes through unchecked).
    pub protocol: Protocol,
    /// What the allowing rule did with it (a flow whose rule changes action is cut: an
    /// intercepted flow must not carry on as passthrough, nor the reverse).
    pub action: Action,
    /// The program the guest says opened the flow, if it named one (a flow whose rule now
    /// names programs that exclude it is cut).
    pub program: Option<moat_flow_header::Program>,
    /// Cancelling this cuts the flow.
    pub cancel: CancellationToken,
}

impl LiveFlow {
    /// Would `policy` still allow this flow, exactly as it is?
    pub fn allowed_by(&self, policy: &Policy) -> bool {
        let dest = Destination {
            hostname: self.hostname.as_deref(),
            addr: self.claimed.ip(),
            port: self.claimed.port(),
        };
        match policy.decide(dest) {
            Decision::Allow(rule) => {
                // A corporate flow has no address of its own to check: the broker connected it
                // to the service the rule names, which must still be the same.
                let destination = match self.upstream {
                    Some(addr) => rule.check_address(addr).is_ok(),
                    None => rule.action == Action::Corporate,
                };
                let program = self.program.as_ref().map(|p| moat_policy::ProgramClaim {
                    path: p.path().as_str(),
                    sha256: p.sha256(),
                });
                destination
                    && rule.allows_program(program.as_ref())
                    && rule.action == self.action
                    && rule.service == self.service
                    && (rule.allows_protocol(self.protocol) || rule.allows_protocol(Protocol::Tcp))
            }
            Decision::Deny(_) => false,
        }
    }
}

/// The current policy and the live flows it governs.
#[derive(Debug)]
pub struct PolicyStore {
    current: RwLock<Arc<Policy>>,
    flows: Mutex<HashMap<u64, LiveFlow>>,
}

impl PolicyStore {
    /// Starts with `policy`.
    pub fn new(policy: Policy) -> Self {
        PolicyStore {
            current: RwLock::new(Arc::new(policy)),
            flows: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        match self.current.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in `policy` and cuts every live flow it denies. Returns how many were cut.
    pub fn replace(&self, policy: Policy) -> usize {
        let policy = Arc::new(policy);
        match self.current.write() {
            Ok(mut p) => *p = Arc::clone(&policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&policy),
        }
        let flows = self.lock_flows();
        let mut cut = 0;
        for flow in flows.values() {
            if !flow.allowed_by(&policy) {
                flow.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// Registers a live flow, then re-checks it against the policy in force *now*, so a reload
    /// that raced with its admission still cuts it.
    pub fn register(&self, uid: u64, flow: LiveFlow) {
        let check = flow.clone();
        self.lock_flows().insert(uid, flow);
        if !check.allowed_by(&self.current()) {
            check.cancel.cancel();
        }
    }

    /// Forgets a flow that ended.
    pub fn unregister(&self, uid: u64) {
        self.lock_flows().remove(&uid);
    }

    /// Number of live flows.
    pub fn live(&self) -> usize {
        self.lock_flows().len()
    }

    fn lock_flows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveFlow>> {
        match self.flows.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPORATE: &str = r#"
version = 1
name = "corp"

[[rules]]
name = "git"
hosts = ["git.corp.test"]
ports = [22]
action = "corporate"
service = "git-corp"
protocols = ["tcp"]
"#;

    fn corporate_flow() -> LiveFlow {
        LiveFlow {
            hostname: Some("git.corp.test".into()),
            claimed: "198.18.0.5:22".parse().unwrap(),
            upstream: None,
            service: Some(ServiceName::parse("git-corp").unwrap()),
            protocol: Protocol::Tcp,
            action: Action::Corporate,
            program: None,
            cancel: CancellationToken::new(),
        }
    }

    fn policy(text: &str) -> Policy {
        moat_policy::profile::parse(text).unwrap()
    }

    #[test]
    fn corporate_flow_stays_allowed_by_its_rule_without_an_address() {
        assert!(corporate_flow().allowed_by(&policy(CORPORATE)));
    }

    #[test]
    fn corporate_flow_is_cut_when_its_rule_names_another_service() {
        let moved = CORPORATE.replace("\"git-corp\"", "\"git-corp-2\"");
        assert!(!corporate_flow().allowed_by(&policy(&moved)));
    }

    #[test]
    fn corporate_flow_is_cut_when_its_rule_becomes_passthrough() {
        let direct = CORPORATE.replace(
            "action = \"corporate\"\nservice = \"git-corp\"",
            "action = \"passthrough\"",
        );
        assert!(!corporate_flow().allowed_by(&policy(&direct)));
    }

    #[test]
    fn direct_flow_without_an_address_is_never_allowed_by_a_passthrough_rule() {
        let direct = CORPORATE.replace(
            "action = \"corporate\"\nservice = \"git-corp\"",
            "action = \"passthrough\"",
        );
        let flow = LiveFlow {
            service: None,
            action: Action::Passthrough,
            ..corporate_flow()
        };
        assert!(!flow.allowed_by(&policy(&direct)));
    }

    #[test]
    fn passthrough_flow_is_cut_when_its_rule_becomes_corporate() {
        let flow = LiveFlow {
            upstream: Some("140.82.112.3".parse().unwrap()),
            service: None,
            action: Action::Passthrough,
            ..corporate_flow()
        };
        assert!(!flow.allowed_by(&policy(CORPORATE)));
    }
}
