//! containerd-shim-moat-v2: moat as a containerd runtime (`io.containerd.moat.v2`, a
//! Kubernetes RuntimeClass `moat`).
//!
//! Hop in the data path: none of its own. It turns containerd's task calls into workspaces:
//! one pod is one workspace, whose egress goes only through its own proxy
//! (docs/kubernetes.md tells the design and the node's setup).
//!
//! - [`node`]: the node's configuration (default profile, trusted keys, audit directory, warm
//!   pools);
//! - [`pod`]: what a bundle says (pod, process, kind), the pod's profile, verified, and its
//!   placement (its own root, or a VM claimed from the pool `moat.dev/pool` names);
//! - [`io`]: a process's FIFOs;
//! - [`service`]: the shim v2 task service.
//!
//! Invariants: a pod's profile is the node's default or one signed by a key the node trusts,
//! never taken unverified from the pod; secret sources are the profile's, on the node; a pod
//! with a second application container, a terminal, a bad profile or a pool the node does not
//! keep does not start, and containerd is told why; nothing is exec'd into a pooled pod's VM.

pub mod io;
pub mod node;
pub mod pod;
pub mod service;
