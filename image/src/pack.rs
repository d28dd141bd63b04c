//! A root directory as a one-layer OCI archive (`cargo xtask images oci`): the layer is the
//! tree as tar+gzip (owners, modes, times and links kept; device nodes, FIFOs and sockets left
//! out, as a workspace's /dev is its own), the config names it by its `diff_id`, the index
//! names the manifest with a `ref.name`. Entries are written in name order, so the same tree
//! gives the same layer.

use std::io::{self, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

use crate::{Error, hex};

/// Packs `tree` into the OCI archive `out`, its image named `ref_name`; returns the manifest's
/// digest (`sha256:<hex>`). `out` appears only when whole.
pub fn pack(tree: &Path, out: &Path, ref_name: &str) -> Result<String, Error> {
    let tmp = out.with_extension("partial");
    let result = pack_to(tree, &tmp, ref_name);
    match result {
        Ok(digest) => {
            std::fs::rename(&tmp, out)
                .map_err(Error::io(format!("cannot write {}", out.display())))?;
            Ok(digest)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(tmp.with_extension("layer"));
            Err(e)
        }
    }
}

fn pack_to(tree: &Path, out: &Path, ref_name: &str) -> Result<String, Error> {
    let io_err = |what: &str| Error::io(format!("{what} ({})", tree.display()));
    // The layer goes to a file beside the archive first: its digest and size head the archive.
    let layer_path = out.with_extension("layer");
    let layer_file =
        std::fs::File::create(&layer_path).map_err(io_err("cannot write the layer"))?;
    let compressed = HashingWriter::new(io::BufWriter::new(layer_file));
    let gz = GzEncoder::new(compressed, Compression::fast());
    let mut builder = tar::Builder::new(HashingWriter::new(gz));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    // Plain entries only: GNU sparse ones (the tar crate's default for files with holes) are
    // refused by containerd's unpacker ("unhandled tar header type 83"), so `ctr images
    // import` could not take the archive.
    builder.sparse(false);
    for entry in walkdir::WalkDir::new(tree)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry =
            entry.map_err(|e| Error::image(format!("cannot walk {}: {e}", tree.display())))?;
        let kind = entry.file_type();
        if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
            continue;
        }
        let name = entry
            .path()
            .strip_prefix(tree)
            .map_err(|_| Error::image("a path outside the tree".to_owned()))?;
        builder
            .append_path_with_name(entry.path(), name)
            .map_err(io_err(&format!("cannot pack {}", name.display())))?;
    }
    let tar_stream = builder
        .into_inner()
        .map_err(io_err("cannot finish the layer"))?;
    let (gz, diff_id) = tar_stream.finish();
    let compressed = gz.finish().map_err(io_err("cannot finish the layer"))?;
    let (mut file, layer_digest, layer_size) = {
        let size = compressed.count;
        let (inner, digest) = compressed.finish();
        (inner, digest, size)
    };
    file.flush().map_err(io_err("cannot write the layer"))?;
    drop(file);

    let digest = |hex: &str| -> Result<oci_spec::image::Digest, Error> {
        let d: Sha256Digest = hex
            .parse()
            .map_err(|e| Error::image(format!("digest {hex}: {e}")))?;
        Ok(d.into())
    };
    let spec = |e: oci_spec::OciSpecError| Error::image(format!("OCI document: {e}"));
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                ])
                .cmd(vec!["/bin/bash".to_owned()])
                .build()
                .map_err(spec)?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()
                .map_err(spec)?,
        )
        .build()
        .map_err(spec)?;
    let config_json = config.to_string().map_err(spec)?.into_bytes();
    let config_hex = hex(&Sha256::digest(&config_json));
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(digest(&config_hex)?)
                .size(config_json.len() as u64)
                .build()
                .map_err(spec)?,
        )
        .layers(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageLayerGzip)
                .digest(digest(&layer_digest)?)
                .size(layer_size)
                .build()
                .map_err(spec)?,
        ])
        .build()
        .map_err(spec)?;
    let manifest_json = manifest.to_string().map_err(spec)?.into_bytes();
    let manifest_hex = hex(&Sha256::digest(&manifest_json));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(digest(&manifest_hex)?)
                .size(manifest_json.len() as u64)
                .platform(
                    PlatformBuilder::default()
                        .architecture(Arch::Amd64)
                        .os(Os::Linux)
                        .build()
                        .map_err(spec)?,
                )
                .annotations([(ANNOTATION_REF_NAME.to_owned(), ref_name.to_owned())])
                .build()
                .map_err(spec)?,
        ])
        .build()
        .map_err(spec)?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec)?;

    let archive_file = std::fs::File::create(out).map_err(io_err("cannot write the archive"))?;
    let mut archive = tar::Builder::new(io::BufWriter::new(archive_file));
    // Every member a plain file, 0644, dated 0: the archive's bytes follow from its content.
    let mut add = |name: &str, size: u64, data: &mut dyn io::Read| {
        let mut header = tar::Header::new_ustar();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        archive
            .append_data(&mut header, name, data)
            .map_err(io_err("cannot write the archive"))
    };
    let layout_json = layout.to_string().map_err(spec)?.into_bytes();
    let index_json = index.to_string().map_err(spec)?.into_bytes();
    for (name, data) in [
        ("oci-layout".to_owned(), &layout_json),
        ("index.json".to_owned(), &index_json),
        (format!("blobs/sha256/{config_hex}"), &config_json),
        (format!("blobs/sha256/{manifest_hex}"), &manifest_json),
    ] {
        add(&name, data.len() as u64, &mut data.as_slice())?;
    }
    let mut layer = std::fs::File::open(&layer_path).map_err(io_err("cannot read the layer"))?;
    add(
        &format!("blobs/sha256/{layer_digest}"),
        layer_size,
        &mut layer,
    )?;
    let mut inner = archive
        .into_inner()
        .map_err(io_err("cannot finish the archive"))?;
    inner.flush().map_err(io_err("cannot write the archive"))?;
    let _ = std::fs::remove_file(&layer_path);
    Ok(format!("sha256:{manifest_hex}"))
}

/// A writer that hashes and counts what goes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    /// The inner writer and the hex SHA-256 of everything written.
    fn finish(self) -> (W, String) {
        (self.inner, hex(&self.hash.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
