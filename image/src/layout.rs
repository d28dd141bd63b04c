//! An OCI image layout directory: `oci-layout`, `index.json`, `blobs/sha256/<hex>`. The index
//! names the manifest (the linux/amd64 one), the manifest the config and the layers; every
//! blob read is checked against its descriptor's size and SHA-256 before it is used.

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest,
    MediaType, OciLayout, Os,
};
use sha2::{Digest as _, Sha256};

use crate::layer::{self, Compression};
use crate::{Error, hex};

/// The most a JSON blob (index, manifest, config) may take: real ones are a few KiB.
const MAX_JSON: u64 = 4 << 20;
/// Docker's manifest media types, which registries and `docker save` still write beside OCI's.
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// An image unpacked into the cache.
#[derive(Debug)]
pub struct Unpacked {
    /// The manifest's digest, `sha256:<hex>`: what the root is cached under.
    pub digest: String,
    /// The root file system, complete.
    pub root: PathBuf,
    /// It was already in the cache.
    pub cached: bool,
}

/// Unpacks the image at `source` (a layout directory, or an archive of one) into `cache`,
/// or finds it there; `progress` hears each step of real work.
pub fn unpack(
    source: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Unpacked, Error> {
    std::fs::create_dir_all(cache)
        .map_err(Error::io(format!("cannot make {}", cache.display())))?;
    // One unpacking at a time per cache: a second moat starting the same image waits and then
    // finds it cached. Where the file system cannot lock (9p), each works on its own scratch
    // and the first rename wins.
    let lock_path = cache.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(format!("cannot open {}", lock_path.display())))?;
    let _ = lock.lock();
    let meta =
        std::fs::metadata(source).map_err(Error::io(format!("the image {}", source.display())))?;
    if meta.is_dir() {
        unpack_layout(source, cache, progress)
    } else {
        crate::archive::unpack_archive(source, &meta, cache, progress)
    }
}

/// Unpacks the layout directory `dir` into `cache` (or finds it there).
pub(crate) fn unpack_layout(
    dir: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Unpacked, Error> {
    let layout_file = dir.join("oci-layout");
    let layout: OciLayout = read_json(&layout_file, None)?;
    if !layout.image_layout_version().starts_with("1.") {
        return Err(Error::image(format!(
            "{}: image layout version {} (this moat reads 1.x)",
            layout_file.display(),
            layout.image_layout_version()
        )));
    }
    let index: ImageIndex = read_json(&dir.join("index.json"), None)?;
    let manifest_desc = choose_manifest(dir, &index, 0)?;
    let manifest: ImageManifest = read_blob_json(dir, &manifest_desc)?;
    let digest_hex = sha256_hex(manifest_desc.digest())?;
    let digest = format!("sha256:{digest_hex}");
    let done = cache.join(format!("oci-{digest_hex}"));
    let root = done.join("root");
    if root.is_dir() {
        return Ok(Unpacked {
            digest,
            root,
            cached: true,
        });
    }
    let config: ImageConfiguration = read_blob_json(dir, manifest.config())?;
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(Error::image(format!(
            "the image is for {}/{}; moat runs linux/amd64 workspaces",
            config.os(),
            config.architecture()
        )));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::image(format!(
            "the image's config lists {} layers and its manifest {}",
            diff_ids.len(),
            manifest.layers().len()
        )));
    }

    // Built under a temporary name and renamed when whole: a root under `oci-<digest>` is
    // always complete and checked.
    let building = cache.join(crate::scratch_name(&format!("oci-{digest_hex}")));
    let _ = std::fs::remove_dir_all(&building);
    let tree = building.join("root");
    std::fs::create_dir_all(&tree).map_err(Error::io(format!("cannot make {}", tree.display())))?;
    let result = (|| {
        let count = manifest.layers().len();
        for (i, (desc, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
            let compression = match desc.media_type() {
                MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
                MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
                    Compression::Gzip
                }
                MediaType::Other(t) if t == DOCKER_LAYER_GZIP => Compression::Gzip,
                other => {
                    return Err(Error::image(format!(
                        "layer {} of {count} is {other}: moat reads tar and tar+gzip layers",
                        i + 1
                    )));
                }
            };
            let blob = blob_file(dir, desc)?;
            progress(&format!(
                "layer {} of {count}: {} ({} MiB)",
                i + 1,
                desc.digest(),
                desc.size().div_ceil(1 << 20)
            ));
            let expected = layer::Expected {
                compressed: sha256_hex(desc.digest())?,
                uncompressed: sha256_hex(&parse_digest(diff_id)?)?,
            };
            layer::apply(&tree, &blob, compression, &expected)
                .map_err(|e| Error::image(format!("layer {} of {count}: {}", i + 1, chain(&e))))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    match std::fs::rename(&building, &done) {
        Ok(()) => {}
        // Another moat unpacked the same image meanwhile: theirs is as good.
        Err(_) if root.is_dir() => {
            let _ = std::fs::remove_dir_all(&building);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(Error::io(format!("cannot keep {}", done.display()))(e));
        }
    }
    Ok(Unpacked {
        digest,
        root,
        cached: false,
    })
}

/// The linux/amd64 image manifest `index` names (through one nested index at most).
fn choose_manifest(dir: &Path, index: &ImageIndex, depth: u8) -> Result<Descriptor, Error> {
    let fits = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    };
    let candidates: Vec<&Descriptor> = index.manifests().iter().filter(fits).collect();
    let desc = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(Error::image(
                "the image index names no linux/amd64 image".to_owned(),
            ));
        }
        several => {
            let names: Vec<String> = several
                .iter()
                .map(|d| {
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(oci_spec::image::ANNOTATION_REF_NAME))
                        .map_or_else(|| d.digest().to_string(), Clone::clone)
                })
                .collect();
            return Err(Error::image(format!(
                "the image index names {} linux/amd64 images ({}); give an archive or layout \
                 holding one",
                several.len(),
                names.join(", ")
            )));
        }
    };
    match desc.media_type() {
        MediaType::ImageManifest => Ok(desc),
        MediaType::Other(t) if t == DOCKER_MANIFEST => Ok(desc),
        MediaType::ImageIndex if depth == 0 => {
            choose_manifest(dir, &read_blob_json(dir, &desc)?, depth + 1)
        }
        MediaType::Other(t) if t == DOCKER_LIST && depth == 0 => {
            choose_manifest(dir, &read_blob_json(dir, &desc)?, depth + 1)
        }
        other => Err(Error::image(format!(
            "the image index names a {other}, not an image manifest"
        ))),
    }
}

/// A digest written as text (the config's `diff_ids`).
fn parse_digest(text: &str) -> Result<Digest, Error> {
    text.parse()
        .map_err(|e| Error::image(format!("digest {text:?}: {e}")))
}

/// The hex of a `sha256:` digest, checked to be 64 lowercase hex digits (it becomes a file
/// name).
pub(crate) fn sha256_hex(digest: &Digest) -> Result<String, Error> {
    let hex = digest.digest();
    let ok = *digest.algorithm() == DigestAlgorithm::Sha256
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(hex.to_owned())
    } else {
        Err(Error::image(format!(
            "digest {digest}: moat reads sha256 digests only"
        )))
    }
}

/// The path of `desc`'s blob, checked to exist with the size the descriptor gives.
fn blob_file(dir: &Path, desc: &Descriptor) -> Result<PathBuf, Error> {
    let path = dir.join("blobs/sha256").join(sha256_hex(desc.digest())?);
    let meta = std::fs::metadata(&path)
        .map_err(Error::io(format!("blob {} of the image", desc.digest())))?;
    if !meta.is_file() || meta.len() != desc.size() {
        return Err(Error::image(format!(
            "blob {}: {} bytes where the image says {}",
            desc.digest(),
            meta.len(),
            desc.size()
        )));
    }
    Ok(path)
}

/// `desc`'s blob parsed as JSON, after its size and digest were checked.
fn read_blob_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    desc: &Descriptor,
) -> Result<T, Error> {
    if desc.size() > MAX_JSON {
        return Err(Error::image(format!(
            "blob {}: {} bytes, more than a manifest or config may take",
            desc.digest(),
            desc.size()
        )));
    }
    let path = blob_file(dir, desc)?;
    read_json(&path, Some(&sha256_hex(desc.digest())?))
}

/// The JSON file at `path` (bounded), its SHA-256 first checked against `want` if given.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path, want: Option<&str>) -> Result<T, Error> {
    let file =
        std::fs::File::open(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io(format!("cannot read {}", path.display())))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(Error::image(format!(
            "{}: larger than {MAX_JSON} bytes",
            path.display()
        )));
    }
    if let Some(want) = want {
        let got = hex(&Sha256::digest(&bytes));
        if got != want {
            return Err(Error::image(format!(
                "{}: its SHA-256 is {got}, not the sha256:{want} the image names",
                path.display()
            )));
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `e` and its causes, as one line: the tar crate wraps the reason in a "failed to unpack".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
