//! The VM backend's root disk from a directory: a read-only ext4 image written by mkfs.ext4
//! (e2fsprogs) straight from the tree (`-d`), no journal, sized to the tree plus room for
//! ext4's own metadata. The root image of `cargo xtask images rootfs` and the disks of
//! `moat run --backend vm --image` are both made here.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::{Error, Unpacked};

/// The VM's root disk for an unpacked image: `root.ext4` beside its root in the cache, made
/// the first time it is asked for. Returns its path and whether it was made now.
pub fn ext4_disk(unpacked: &Unpacked) -> Result<(std::path::PathBuf, bool), Error> {
    let dir = unpacked
        .root
        .parent()
        .ok_or_else(|| Error::image("an unpacked image's root has no parent".to_owned()))?;
    let disk = dir.join("root.ext4");
    if disk.exists() {
        return Ok((disk, false));
    }
    ext4_from_dir(&unpacked.root, &disk)?;
    Ok((disk, true))
}

/// Writes `out`, an ext4 image holding `tree` (owned by root at its top); `out` appears only
/// when whole. Returns its size in MiB.
pub fn ext4_from_dir(tree: &Path, out: &Path) -> Result<u64, Error> {
    let mut used: u64 = 0;
    // Hard links once, as du counts them.
    let mut seen = std::collections::HashSet::new();
    for entry in walkdir::WalkDir::new(tree).follow_links(false) {
        let entry =
            entry.map_err(|e| Error::image(format!("cannot walk {}: {e}", tree.display())))?;
        if let Ok(meta) = entry.metadata()
            && (meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())))
        {
            used += meta.blocks() * 512;
        }
    }
    let used_mib = used.div_ceil(1 << 20);
    // Room for ext4's own metadata; the image is mounted read-only, so no more.
    let size_mib = used_mib + used_mib / 4 + 32;
    let tmp = out.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    let status = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "moat-root",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(tree)
        .arg(&tmp)
        .arg(format!("{size_mib}M"))
        .status()
        .map_err(|e| {
            Error::image(format!(
                "cannot run mkfs.ext4 ({e}): making a VM disk from a directory needs e2fsprogs \
                 (apt-get install e2fsprogs)"
            ))
        })?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::image(format!(
            "mkfs.ext4 -d {} failed ({status})",
            tree.display()
        )));
    }
    std::fs::rename(&tmp, out).map_err(Error::io(format!("cannot write {}", out.display())))?;
    Ok(size_mib)
}
