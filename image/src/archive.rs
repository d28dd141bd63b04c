//! An OCI archive: a tar of an image layout. Its layout is extracted (only `oci-layout`,
//! `index.json` and `blobs/sha256/<hex>`, regular files and directories; nothing else is
//! written) into a scratch directory in the cache, unpacked from there, and the scratch
//! removed. Which image an archive held is remembered by the archive's identity (path, size,
//! modification time), so the next start with the same file reads nothing.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::layout::{Unpacked, unpack_layout};
use crate::{Error, hex};

pub(crate) fn unpack_archive(
    archive: &Path,
    meta: &Metadata,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Unpacked, Error> {
    // Path, size and modification time: what survives a share (9p renumbers devices and
    // inodes). A memo only saves reading the archive; the root it leads to was checked.
    let path = std::fs::canonicalize(archive).unwrap_or_else(|_| archive.to_owned());
    let identity = format!(
        "{}\0{}\0{}.{}",
        path.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let memo = cache.join(format!(
        "oci-archive-{}",
        &hex(&Sha256::digest(identity.as_bytes()))[..32]
    ));
    if let Ok(digest_hex) = std::fs::read_to_string(&memo) {
        let digest_hex = digest_hex.trim();
        let root = cache.join(format!("oci-{digest_hex}")).join("root");
        if digest_hex.len() == 64 && root.is_dir() {
            return Ok(Unpacked {
                digest: format!("sha256:{digest_hex}"),
                root,
                cached: true,
            });
        }
    }
    progress(&format!(
        "reading the archive {} ({} MiB)",
        archive.display(),
        meta.len().div_ceil(1 << 20)
    ));
    let scratch = cache.join(crate::scratch_name("archive"));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = extract_layout(archive, &scratch).and_then(|()| {
        let unpacked = unpack_layout(&scratch, cache, progress)?;
        if let Some(hex) = unpacked.digest.strip_prefix("sha256:") {
            // A memo lost only costs reading the archive again.
            let _ = std::fs::write(&memo, hex);
        }
        Ok(unpacked)
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Extracts the image layout in `archive` into `to`.
fn extract_layout(archive: &Path, to: &Path) -> Result<(), Error> {
    let what = || format!("the image archive {}", archive.display());
    let file = std::fs::File::open(archive).map_err(Error::io(what()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    std::fs::create_dir_all(to.join("blobs/sha256"))
        .map_err(Error::io(format!("cannot make {}", to.display())))?;
    for entry in tar.entries().map_err(Error::io(what()))? {
        let mut entry = entry.map_err(Error::io(what()))?;
        let path = entry.path().map_err(Error::io(what()))?.into_owned();
        let Some(name) = layout_name(&path) else {
            // Docker's own files (manifest.json, repositories) and anything else: not read.
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => {
                return Err(Error::image(format!(
                    "{}: {} is a {other:?}, where an image layout has plain files",
                    what(),
                    path.display()
                )));
            }
        }
        let out = to.join(&name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(Error::io(format!(
                "{}: {} (twice in the archive?)",
                what(),
                path.display()
            )))?;
        std::io::copy(&mut (&mut entry).take(u64::MAX), &mut file).map_err(Error::io(format!(
            "{}: {}",
            what(),
            path.display()
        )))?;
    }
    Ok(())
}

/// Where `path` (an archive member) goes in the layout, if it is part of one: `oci-layout`,
/// `index.json` or `blobs/sha256/<64 lowercase hex>`, after a leading `./`.
fn layout_name(path: &Path) -> Option<PathBuf> {
    let parts: Vec<&str> = path
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(p) => p.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        ["oci-layout"] | ["index.json"] => Some(PathBuf::from(parts[0])),
        ["blobs", "sha256", hex]
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Some(Path::new("blobs/sha256").join(hex))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layout_members_are_taken() {
        let hex = "a".repeat(64);
        assert_eq!(
            layout_name(Path::new("./index.json")),
            Some(PathBuf::from("index.json"))
        );
        assert_eq!(
            layout_name(Path::new(&format!("blobs/sha256/{hex}"))),
            Some(PathBuf::from(format!("blobs/sha256/{hex}")))
        );
        for bad in [
            "manifest.json".to_owned(),
            "../index.json".to_owned(),
            "/etc/passwd".to_owned(),
            format!("blobs/sha256/../{hex}"),
            format!("blobs/sha256/{}", "A".repeat(64)),
            "blobs/sha256/abc".to_owned(),
            "blobs/sha512/x".to_owned(),
        ] {
            assert_eq!(layout_name(Path::new(&bad)), None, "{bad}");
        }
    }
}
