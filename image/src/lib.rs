//! Workspace roots from images.
//!
//! A workspace's root can be an OCI image (`moat run --image PATH`): an image layout directory
//! or an archive of one (`oci-archive`, what `cargo xtask images oci`, `skopeo copy
//! oci-archive:` and `buildah push oci-archive:` write). [`unpack`] reads it, checks every blob
//! against its digest, applies the layers in order with their whiteouts into a directory
//! cached by the manifest's digest, and [`ext4_from_dir`] turns such a directory into the
//! read-only disk the VM backend boots. [`pack`] is the other way round: a root directory as a
//! one-layer OCI archive.
//!
//! Invariants: an image is data from elsewhere, so nothing it says can write outside the
//! directory it is unpacked into (no `..`, no path through a symlink that leaves the root, no
//! hard link to a file outside it: each refused with the entry named), no device node or FIFO
//! is made (a workspace's /dev is its own), and a root becomes visible under its digest only
//! once every layer was applied and every digest matched (it is built under a temporary name
//! and renamed).

mod archive;
mod ext4;
mod layer;
mod layout;
mod pack;

use std::path::PathBuf;

pub use ext4::{ext4_disk, ext4_from_dir};
pub use layout::{Unpacked, unpack};
pub use pack::pack;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Image(String),
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn image(message: impl Into<String>) -> Self {
        Self::Image(message.into())
    }
}

/// A name for scratch work in the cache no other thread or process uses at the same time.
pub(crate) fn scratch_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".{prefix}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
