//! One layer applied onto a root directory, as the OCI image spec's "applying changesets"
//! says: first its whiteouts remove what lower layers left (`.wh.NAME` removes NAME,
//! `.wh..wh..opq` empties its directory), then its entries are written, each replacing what was
//! there. The layer is read twice (once per step), and each read checks its digests (the
//! compressed blob against the manifest, the tar stream against the config's `diff_id`): the
//! first before anything is written, the second after, so a blob changed between the reads
//! fails too (and the scratch tree it went into is dropped).
//!
//! Writing is the `tar` crate's `unpack_in`, which refuses a path whose parent resolves outside
//! the root (through a symlink) and a hard link to a file outside it, and creates each file
//! anew (never writing through an existing link). Around it this module refuses `..` (which
//! `unpack_in` would skip silently), skips device nodes and FIFOs, and checks every path it
//! removes itself the same way.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{Archive, EntryType};

use crate::hex;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Compression {
    None,
    Gzip,
}

/// The digests a layer must have (hex of SHA-256).
pub(crate) struct Expected {
    /// Of the blob as stored.
    pub(crate) compressed: String,
    /// Of the tar stream inside (the config's `diff_id`).
    pub(crate) uncompressed: String,
}

/// Whiteout prefix and the opaque-directory marker (OCI image spec, "Whiteouts").
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Applies the layer in `blob` onto `root`.
pub(crate) fn apply(
    root: &Path,
    blob: &Path,
    compression: Compression,
    expected: &Expected,
) -> io::Result<()> {
    let as_root = is_root();
    // Step 1: digests, and the whiteouts, which apply to what lower layers left.
    let mut removals = Vec::new();
    {
        let (mut archive, digests) = open(blob, compression)?;
        for entry in archive.entries()? {
            let entry = entry?;
            let path = relative(&entry.path()?)?;
            if let Some(removal) = whiteout(&path) {
                removals.push(removal);
            }
        }
        // Whatever follows the tar stream's end counts too: read to the blob's end.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink())?;
        drop(rest);
        digests.check(expected)?;
    }
    for removal in &removals {
        match removal {
            Removal::Entry(path) => remove_in(root, path)?,
            Removal::Contents(dir) => empty_in(root, dir)?,
        }
    }
    // Step 2: the entries, from a second read that is checked again: a blob changed between
    // the reads (a layout directory someone else can write) fails the layer, and the tree
    // it was written into is never kept.
    let (mut archive, digests) = open(blob, compression)?;
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(as_root);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = relative(&entry.path()?)?;
        if whiteout(&path).is_some() || path.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::Char | EntryType::Block | EntryType::Fifo) {
            continue;
        }
        replace_other_kind(root, &path, kind.is_dir())?;
        let at = root.join(&path);
        if !entry.unpack_in(root)? {
            return Err(refused(&path, "it would land outside the root"));
        }
        // Not root, we cannot make a directory we may not write into, or later entries
        // (and the cache's own clean-up) could not write below it.
        if kind.is_dir() && !as_root {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::symlink_metadata(&at)?.permissions().mode();
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode | 0o700))?;
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    drop(rest);
    digests.check(expected)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What a whiteout entry removes.
enum Removal {
    /// This path, whatever it is.
    Entry(PathBuf),
    /// Everything inside this directory.
    Contents(PathBuf),
}

fn whiteout(path: &Path) -> Option<Removal> {
    let name = path.file_name()?.to_str()?;
    let parent = path.parent().unwrap_or(Path::new(""));
    if name == OPAQUE {
        Some(Removal::Contents(parent.to_owned()))
    } else {
        name.strip_prefix(WHITEOUT)
            .filter(|n| !n.is_empty())
            .map(|n| Removal::Entry(parent.join(n)))
    }
}

/// `path` as a plain relative path: leading `/` and `.` dropped; `..` refused (a layer that
/// says it is malicious or broken; `unpack_in` would skip it, losing a file unseen).
fn relative(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(refused(path, "its path climbs out with ..")),
            Component::Normal(p) => out.push(p),
        }
    }
    Ok(out)
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("entry {}: refused: {why}", path.display()),
    )
}

/// `root/path`'s parent, if it exists and resolves inside `root` (nothing is removed through a
/// symlink that leaves the root).
fn parent_inside(root: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    let Some(parent) = root.join(path).parent().map(Path::to_owned) else {
        return Ok(None);
    };
    let parent = match parent.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if parent.starts_with(root.canonicalize()?) {
        Ok(Some(parent))
    } else {
        Err(refused(path, "its parent leads outside the root"))
    }
}

/// Removes `root/path` (a link itself, never what it points to).
fn remove_in(root: &Path, path: &Path) -> io::Result<()> {
    let Some(parent) = parent_inside(root, path)? else {
        return Ok(());
    };
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    let target = parent.join(name);
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
        Ok(_) => std::fs::remove_file(&target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything inside `root/dir` (a directory lower layers made).
fn empty_in(root: &Path, dir: &Path) -> io::Result<()> {
    let target = if dir.as_os_str().is_empty() {
        root.canonicalize()?
    } else {
        let Some(parent) = parent_inside(root, dir)? else {
            return Ok(());
        };
        let Some(name) = dir.file_name() else {
            return Ok(());
        };
        parent.join(name)
    };
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => {}
        _ => return Ok(()),
    }
    for child in std::fs::read_dir(&target)? {
        let child = child?;
        if child.file_type()?.is_dir() {
            std::fs::remove_dir_all(child.path())?;
        } else {
            std::fs::remove_file(child.path())?;
        }
    }
    Ok(())
}

/// A directory where a non-directory comes, or the other way round: the lower layer's goes
/// first (the spec's "replaced"); `unpack_in` would fail on either.
fn replace_other_kind(root: &Path, path: &Path, new_is_dir: bool) -> io::Result<()> {
    let Some(parent) = parent_inside(root, path)? else {
        return Ok(());
    };
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    match std::fs::symlink_metadata(parent.join(name)) {
        Ok(m) if m.is_dir() != new_is_dir => remove_in(root, path),
        _ => Ok(()),
    }
}

/// The blob opened as a tar stream, with both digests computed as it is read.
fn open(blob: &Path, compression: Compression) -> io::Result<(Archive<Box<dyn Read>>, Digests)> {
    let file = BufReader::new(File::open(blob)?);
    let digests = Digests::default();
    let compressed = Hashing {
        inner: file,
        hash: digests.compressed.clone(),
    };
    let tar: Box<dyn Read> = match compression {
        Compression::None => Box::new(Hashing {
            inner: compressed,
            hash: digests.uncompressed.clone(),
        }),
        Compression::Gzip => Box::new(Hashing {
            inner: flate2::read::GzDecoder::new(compressed),
            hash: digests.uncompressed.clone(),
        }),
    };
    Ok((Archive::new(tar), digests))
}

type SharedHash = std::rc::Rc<std::cell::RefCell<Sha256>>;

#[derive(Default)]
struct Digests {
    compressed: SharedHash,
    uncompressed: SharedHash,
}

impl Digests {
    fn check(&self, expected: &Expected) -> io::Result<()> {
        let pairs = [
            ("blob", &self.compressed, &expected.compressed),
            (
                "tar stream (diff_id)",
                &self.uncompressed,
                &expected.uncompressed,
            ),
        ];
        for (what, hash, want) in pairs {
            let got = hex(&hash.borrow().clone().finalize());
            if &got != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("its {what} has SHA-256 {got}, not the sha256:{want} the image names"),
                ));
            }
        }
        Ok(())
    }
}

/// A reader that feeds what it reads into a hash.
struct Hashing<R> {
    inner: R,
    hash: SharedHash,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}
