//! moat-vmm: the KVM microVM monitor (issue 5).
//!
//! Hop in the data path: guest virtio-vsock -> this VMM -> host Unix socket `<uds>_<port>`,
//! where the egress proxy listens. Nothing is implemented here yet; this crate holds its place
//! in the tree so the layout matches ARCHITECTURE.md. It does not pretend to boot anything.
