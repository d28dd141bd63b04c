//! What the shim reads of a container's OCI bundle (`config.json`): which pod it belongs to,
//! what it runs, the pod's egress profile, verified before anything starts, and where its
//! workspace comes from (its own root file system, or one of the node's warm pools).

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::node::NodeConfig;

/// The pod annotation holding a pod's own profile (TOML text).
pub const PROFILE_ANNOTATION: &str = "moat.dev/profile";
/// The pod annotation holding that profile's minisign signature.
pub const SIGNATURE_ANNOTATION: &str = "moat.dev/profile.minisig";
/// The pod annotation naming the node's warm pool the pod's workspace is claimed from.
pub const POOL_ANNOTATION: &str = "moat.dev/pool";

/// containerd's CRI: whether a container is a pod's sandbox or one of its containers.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Why a container's bundle or its pod's profile is refused.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// config.json could not be read.
    #[error("cannot read the bundle's config.json")]
    ReadSpec(#[source] std::io::Error),
    /// config.json is not an OCI runtime spec.
    #[error("the bundle's config.json is not an OCI runtime spec")]
    ParseSpec(#[source] serde_json::Error),
    /// The profile annotation came without its signature.
    #[error(
        "the pod's {PROFILE_ANNOTATION} annotation has no {SIGNATURE_ANNOTATION} annotation \
         beside it: a pod's profile must be signed"
    )]
    Unsigned,
    /// The node trusts no key for pods' own profiles.
    #[error(
        "the pod carries a {PROFILE_ANNOTATION} annotation, but this node trusts no key for \
         pods' profiles (trusted_keys in the node configuration)"
    )]
    NoTrustedKey,
    /// No trusted key verifies the profile.
    #[error(
        "the pod's profile ({PROFILE_ANNOTATION}) is not signed by a key this node trusts, or \
         is invalid: {0}"
    )]
    Refused(String),
    /// A trusted key or the default profile could not be read.
    #[error("cannot read {}", .0.display())]
    ReadNode(PathBuf, #[source] std::io::Error),
    /// The verified profile could not be kept for the proxy.
    #[error("cannot write the pod's profile under {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The pod names a pool the node does not keep.
    #[error(
        "pod {pod} asks for the pool {pool:?} ({POOL_ANNOTATION}), which this node does not \
         keep; {}",
        pool_list(.known)
    )]
    UnknownPool {
        pod: String,
        pool: String,
        known: Vec<String>,
    },
    /// The pool is in the node configuration, but nothing serves its socket.
    #[error(
        "pod {pod} asks for the pool {pool:?}, whose socket {} is not there: is `moat pool \
         --socket {}` running on this node?",
        .socket.display(),
        .socket.display()
    )]
    PoolNotServing {
        pod: String,
        pool: String,
        socket: PathBuf,
    },
    /// A pooled VM starts its command in the agent's home: another working directory cannot
    /// be honoured.
    #[error(
        "pod {pod} runs in a VM from the pool {pool:?}, which starts its command in the \
         agent's home: the container's working directory {} cannot be honoured (leave the \
         container's workingDir unset, or cd in its command)",
        .workdir.display()
    )]
    PoolWorkdir {
        pod: String,
        pool: String,
        workdir: PathBuf,
    },
    /// The node's backend is vm, which cannot boot a container's root file system.
    #[error(
        "pod {pod} names no pool ({POOL_ANNOTATION}), and this node's backend is vm, whose \
         workspaces boot moat's root image, never a container's root file system: name one \
         of the node's pools, or set the node's backend to namespace; {}",
        pool_list(.known)
    )]
    VmNeedsPool { pod: String, known: Vec<String> },
}

/// "the node's pools: a, b", or that it has none.
fn pool_list(known: &[String]) -> String {
    if known.is_empty() {
        "the node keeps no pools (pools in the node configuration)".to_owned()
    } else {
        format!("the node's pools: {}", known.join(", "))
    }
}

/// The parts of an OCI runtime spec the shim uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI process: a container's, or an exec's (`ctr task exec`, ExecSync).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Process {
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub terminal: bool,
}

impl Process {
    /// The environment as `moat run --env` takes it, minus what the workspace sets itself
    /// (PATH, HOME: the workspace's own).
    pub fn env_args(&self) -> Vec<String> {
        self.env
            .iter()
            .filter(|kv| kv.contains('='))
            .filter(|kv| !kv.starts_with("PATH=") && !kv.starts_with("HOME="))
            .cloned()
            .collect()
    }

    /// The working directory unless it is the root, which containerd puts where the image
    /// names none (the workspace's own default, the agent's home, is better there).
    pub fn workdir(&self) -> Option<&Path> {
        self.cwd.as_deref().filter(|cwd| *cwd != Path::new("/"))
    }
}

/// What a container is to its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The CRI's pod sandbox (the pause container): it holds the pod.
    Sandbox,
    /// A pod's application container: the workspace's agent.
    App,
    /// A container outside any pod (`ctr run`): a workspace of its own.
    Standalone,
}

impl Spec {
    /// Reads `<bundle>/config.json`.
    pub fn read(bundle: &Path) -> Result<Spec, PodError> {
        let bytes = std::fs::read(bundle.join("config.json")).map_err(PodError::ReadSpec)?;
        serde_json::from_slice(&bytes).map_err(PodError::ParseSpec)
    }

    pub fn kind(&self) -> Kind {
        match self.annotations.get(CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Kind::Sandbox,
            Some(_) => Kind::App,
            None => Kind::Standalone,
        }
    }

    /// The pod's sandbox id (CRI), if any: the shim's grouping.
    pub fn sandbox_id(&self) -> Option<&str> {
        self.annotations.get(SANDBOX_ID).map(String::as_str)
    }

    /// The name audit records give the workspace: `<namespace>/<pod>` for a pod, or
    /// `<containerd namespace>/<container id>` outside one.
    pub fn workspace_name(&self, namespace: &str, id: &str) -> String {
        match (
            self.annotations.get(SANDBOX_NAMESPACE),
            self.annotations.get(SANDBOX_NAME),
        ) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => format!("{namespace}/{id}"),
        }
    }
}

/// A file name for `name` (`/` and anything outside `[A-Za-z0-9._-]` become `_`).
pub fn file_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// The profile and key the pod's egress proxy runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileChoice {
    pub profile: PathBuf,
    pub pubkey: PathBuf,
}

/// The pod's profile: its own, from the annotation, verified against the node's trusted keys
/// and written under `dir`; or, without the annotation, the node's default. Nothing is
/// written for a profile no trusted key verifies.
pub fn choose_profile(
    spec: &Spec,
    node: &NodeConfig,
    dir: &Path,
) -> Result<ProfileChoice, PodError> {
    let Some(profile) = spec.annotations.get(PROFILE_ANNOTATION) else {
        return Ok(ProfileChoice {
            profile: node.default_profile.clone(),
            pubkey: node.default_pubkey.clone(),
        });
    };
    let signature = spec
        .annotations
        .get(SIGNATURE_ANNOTATION)
        .ok_or(PodError::Unsigned)?;
    if node.trusted_keys.is_empty() {
        return Err(PodError::NoTrustedKey);
    }
    let mut why = Vec::new();
    for key_path in &node.trusted_keys {
        let text = std::fs::read_to_string(key_path)
            .map_err(|e| PodError::ReadNode(key_path.clone(), e))?;
        let verified = moat_policy::signing::parse_public_key(&text).and_then(|key| {
            moat_policy::signing::load_verified(profile.as_bytes(), signature, &key)
        });
        match verified {
            Ok(_) => {
                let write = |name: &str, text: &str| {
                    let path = dir.join(name);
                    std::fs::create_dir_all(dir)
                        .and_then(|()| std::fs::write(&path, text))
                        .map_err(|e| PodError::Write(dir.to_owned(), e))?;
                    Ok::<_, PodError>(path)
                };
                let profile = write("profile.toml", profile)?;
                write("profile.toml.minisig", signature)?;
                return Ok(ProfileChoice {
                    profile,
                    pubkey: key_path.clone(),
                });
            }
            Err(e) => why.push(format!("{}: {}", key_path.display(), error_chain(&e))),
        }
    }
    Err(PodError::Refused(why.join("; ")))
}

/// Where a container's workspace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Built for it by `moat run` on the node's backend, with the container's root file
    /// system as the workspace's root.
    Rootfs,
    /// Claimed from one of the node's warm pools (`moat run --backend vm --pool SOCKET`): a
    /// VM restored from the pool's template, whose root is the template's image, not the
    /// container's.
    Pool { name: String, socket: PathBuf },
}

/// Where the workspace of the container `spec` describes, in pod `pod` (named in errors),
/// comes from: the pool its `moat.dev/pool` annotation names, which the node must keep and
/// serve; or, without the annotation, its own root file system, which the vm backend cannot
/// boot. A pod's sandbox carries the pod's annotations too: checked there, a pod naming a
/// pool the node lacks fails at its first call (RunPodSandbox).
pub fn placement(spec: &Spec, node: &NodeConfig, pod: &str) -> Result<Placement, PodError> {
    let known = || node.pools.keys().cloned().collect::<Vec<_>>();
    let runs_a_process = spec.kind() != Kind::Sandbox;
    let Some(name) = spec.annotations.get(POOL_ANNOTATION) else {
        if runs_a_process && node.backend == "vm" {
            return Err(PodError::VmNeedsPool {
                pod: pod.to_owned(),
                known: known(),
            });
        }
        return Ok(Placement::Rootfs);
    };
    let pool = node.pools.get(name).ok_or_else(|| PodError::UnknownPool {
        pod: pod.to_owned(),
        pool: name.clone(),
        known: known(),
    })?;
    let serving = std::fs::metadata(&pool.socket).is_ok_and(|m| m.file_type().is_socket());
    if !serving {
        return Err(PodError::PoolNotServing {
            pod: pod.to_owned(),
            pool: name.clone(),
            socket: pool.socket.clone(),
        });
    }
    if runs_a_process && let Some(workdir) = spec.process.as_ref().and_then(Process::workdir) {
        return Err(PodError::PoolWorkdir {
            pod: pod.to_owned(),
            pool: name.clone(),
            workdir: workdir.to_owned(),
        });
    }
    Ok(Placement::Pool {
        name: name.clone(),
        socket: pool.socket.clone(),
    })
}

/// "outer: cause: root cause".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(dir: &Path, keys: Vec<PathBuf>) -> NodeConfig {
        toml::from_str::<NodeConfig>(&format!(
            "default_profile = \"{0}/default.toml\"\ndefault_pubkey = \"{0}/default.pub\"\n",
            dir.display()
        ))
        .map(|mut n| {
            n.trusted_keys = keys;
            n
        })
        .unwrap()
    }

    const PROFILE: &str = "version = 1\nname = \"pod\"\n";

    fn annotated(profile: &str, signature: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        spec.annotations
            .insert(PROFILE_ANNOTATION.into(), profile.into());
        if let Some(sig) = signature {
            spec.annotations
                .insert(SIGNATURE_ANNOTATION.into(), sig.into());
        }
        spec
    }

    #[test]
    fn without_the_annotation_the_pod_gets_the_nodes_default_profile() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), Vec::new());
        let choice = choose_profile(&Spec::default(), &node, &dir.path().join("pod")).unwrap();
        assert_eq!(choice.profile, node.default_profile);
    }

    #[test]
    fn a_profile_signed_by_a_trusted_key_is_written_for_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let key = moat_policy::signing::generate("").unwrap();
        std::fs::write(dir.path().join("team.pub"), &key.public).unwrap();
        let sig = moat_policy::signing::sign(PROFILE.as_bytes(), &key.secret, "").unwrap();
        let node = node(dir.path(), vec![dir.path().join("team.pub")]);
        let pod = dir.path().join("pod");
        let choice = choose_profile(&annotated(PROFILE, Some(&sig)), &node, &pod).unwrap();
        assert_eq!(std::fs::read_to_string(&choice.profile).unwrap(), PROFILE);
        assert_eq!(choice.pubkey, dir.path().join("team.pub"));
    }

    #[test]
    fn a_profile_signed_by_another_key_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let trusted = moat_policy::signing::generate("").unwrap();
        let other = moat_policy::signing::generate("").unwrap();
        std::fs::write(dir.path().join("team.pub"), &trusted.public).unwrap();
        let sig = moat_policy::signing::sign(PROFILE.as_bytes(), &other.secret, "").unwrap();
        let node = node(dir.path(), vec![dir.path().join("team.pub")]);
        let pod = dir.path().join("pod");
        let err = choose_profile(&annotated(PROFILE, Some(&sig)), &node, &pod).unwrap_err();
        assert!(matches!(err, PodError::Refused(_)), "{err}");
        assert!(!pod.exists());
    }

    #[test]
    fn an_unsigned_profile_annotation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), vec![dir.path().join("team.pub")]);
        let err = choose_profile(&annotated(PROFILE, None), &node, dir.path()).unwrap_err();
        assert!(matches!(err, PodError::Unsigned), "{err}");
    }

    /// A node (backend `backend`) keeping the pool `python`, served on a real socket in
    /// `dir`, and `idle`, whose socket nothing serves.
    fn pool_node(dir: &Path, backend: &str) -> (NodeConfig, std::os::unix::net::UnixListener) {
        let socket = dir.join("python.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let node = toml::from_str::<NodeConfig>(&format!(
            "backend = \"{backend}\"\ndefault_profile = \"/p\"\ndefault_pubkey = \"/k\"\n\
             [pools.python]\nsocket = \"{}\"\n[pools.idle]\nsocket = \"{}\"\n",
            socket.display(),
            dir.join("idle.sock").display()
        ))
        .unwrap();
        (node, listener)
    }

    /// An application container of a pod, with `annotations` and working directory `cwd`.
    fn app(annotations: &[(&str, &str)], cwd: &str) -> Spec {
        let mut spec = Spec {
            process: Some(Process {
                args: vec!["python3".into()],
                cwd: Some(cwd.into()),
                ..Process::default()
            }),
            ..Spec::default()
        };
        spec.annotations
            .insert(CONTAINER_TYPE.into(), "container".into());
        for (k, v) in annotations {
            spec.annotations.insert((*k).into(), (*v).into());
        }
        spec
    }

    #[test]
    fn a_pod_naming_a_pool_the_node_keeps_is_placed_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "auto");
        let placed = placement(&app(&[(POOL_ANNOTATION, "python")], "/"), &node, "ns/pod");
        assert_eq!(
            placed.unwrap(),
            Placement::Pool {
                name: "python".into(),
                socket: dir.path().join("python.sock"),
            }
        );
    }

    #[test]
    fn a_pod_naming_a_pool_the_node_lacks_is_refused_naming_the_pod_and_the_nodes_pools() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "auto");
        let err = placement(
            &app(&[(POOL_ANNOTATION, "ruby")], "/"),
            &node,
            "team-a/agent",
        )
        .unwrap_err();
        assert!(matches!(err, PodError::UnknownPool { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("team-a/agent")
                && text.contains("\"ruby\"")
                && text.contains("the node's pools: idle, python"),
            "{text}"
        );
    }

    #[test]
    fn a_pod_naming_a_pool_on_a_node_without_pools_is_told_the_node_keeps_none() {
        let node =
            toml::from_str::<NodeConfig>("default_profile = \"/p\"\ndefault_pubkey = \"/k\"\n")
                .unwrap();
        let err =
            placement(&app(&[(POOL_ANNOTATION, "python")], "/"), &node, "ns/pod").unwrap_err();
        assert!(err.to_string().contains("the node keeps no pools"), "{err}");
    }

    #[test]
    fn a_pod_sandbox_naming_a_pool_the_node_lacks_is_refused_already() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "auto");
        let mut sandbox = app(&[(POOL_ANNOTATION, "ruby")], "/");
        sandbox
            .annotations
            .insert(CONTAINER_TYPE.into(), "sandbox".into());
        let err = placement(&sandbox, &node, "ns/pod").unwrap_err();
        assert!(matches!(err, PodError::UnknownPool { .. }), "{err}");
    }

    #[test]
    fn a_pool_whose_socket_nothing_serves_is_refused_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "auto");
        let err = placement(&app(&[(POOL_ANNOTATION, "idle")], "/"), &node, "ns/pod").unwrap_err();
        assert!(matches!(err, PodError::PoolNotServing { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&dir.path().join("idle.sock").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_pooled_container_with_its_own_working_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "auto");
        let err = placement(
            &app(&[(POOL_ANNOTATION, "python")], "/app"),
            &node,
            "ns/pod",
        )
        .unwrap_err();
        assert!(matches!(err, PodError::PoolWorkdir { .. }), "{err}");
        assert!(err.to_string().contains("/app"), "{err}");
    }

    #[test]
    fn a_pod_without_the_annotation_runs_on_its_own_root() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "namespace");
        let placed = placement(&app(&[], "/app"), &node, "ns/pod").unwrap();
        assert_eq!(placed, Placement::Rootfs);
    }

    #[test]
    fn on_a_vm_node_a_pod_without_a_pool_is_refused_naming_the_nodes_pools() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _serving) = pool_node(dir.path(), "vm");
        let err = placement(&app(&[], "/"), &node, "ns/pod").unwrap_err();
        assert!(matches!(err, PodError::VmNeedsPool { .. }), "{err}");
        assert!(
            err.to_string().contains("the node's pools: idle, python"),
            "{err}"
        );
    }

    #[test]
    fn file_names_keep_nothing_that_could_leave_the_directory() {
        assert_eq!(file_name("default/../etc"), "default_.._etc");
        assert_eq!(file_name(".hidden"), "_.hidden");
    }
}
