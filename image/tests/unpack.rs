//! OCI images unpacked for real: layouts and archives written here with real tar and gzip
//! streams (hostile ones included), unpacked into a cache, the result read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One tar entry as a test wants it, hostile names included (written into the header raw).
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str),
}

fn tar_of(items: &[Item<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let mut h = tar::Header::new_gnu();
        let (name, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match item {
            Item::Dir(n) => (n, tar::EntryType::Directory, b"", None),
            Item::File(n, d) => (n, tar::EntryType::Regular, d, None),
            Item::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t)),
            Item::HardLink(n, t) => (n, tar::EntryType::Link, b"", Some(t)),
            Item::CharDevice(n) => (n, tar::EntryType::Char, b"", None),
        };
        // Raw, so a test can say `..`: tar's own setters refuse it.
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if matches!(item, Item::Dir(_)) {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let h = hex(&Sha256::digest(data));
    std::fs::write(dir.join("blobs/sha256").join(&h), data).unwrap();
    h
}

fn digest(h: &str) -> oci_spec::image::Digest {
    h.parse::<Sha256Digest>().unwrap().into()
}

/// An image layout at `dir` whose layers are `layers` (tar streams), gzipped; `arch` its
/// config's architecture.
fn layout(dir: &Path, layers: &[Vec<u8>], arch: Arch) -> PathBuf {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let gz = gzip(layer);
        diff_ids.push(format!("sha256:{}", hex(&Sha256::digest(layer))));
        let h = put_blob(dir, &gz);
        descs.push(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageLayerGzip)
                .digest(digest(&h))
                .size(gz.len() as u64)
                .build()
                .unwrap(),
        );
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(arch)
        .os(Os::Linux)
        .config(ConfigBuilder::default().build().unwrap())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
        .to_string()
        .unwrap();
    let config_hex = put_blob(dir, config.as_bytes());
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(digest(&config_hex))
                .size(config.len() as u64)
                .build()
                .unwrap(),
        )
        .layers(descs)
        .build()
        .unwrap()
        .to_string()
        .unwrap();
    let manifest_hex = put_blob(dir, manifest.as_bytes());
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .manifests(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(digest(&manifest_hex))
                .size(manifest.len() as u64)
                .build()
                .unwrap(),
        ])
        .build()
        .unwrap();
    std::fs::write(dir.join("index.json"), index.to_string().unwrap()).unwrap();
    dir.to_owned()
}

fn unpack(source: &Path, cache: &Path) -> Result<moat_image::Unpacked, moat_image::Error> {
    moat_image::unpack(source, cache, &mut |_| {})
}

/// No root, and nothing half-built, left in the cache.
fn assert_cache_has_no_root(cache: &Path) {
    let left: Vec<_> = std::fs::read_dir(cache)
        .map(|d| {
            d.map(|e| e.unwrap().file_name())
                .filter(|n| n != ".lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "the cache holds {left:?}");
}

#[test]
fn layers_apply_in_order_with_their_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let lower = tar_of(&[
        Item::Dir("a"),
        Item::File("a/x", b"x"),
        Item::File("a/y", b"y"),
        Item::Dir("b"),
        Item::File("b/old", b"old"),
        Item::Dir("b/deep"),
        Item::File("b/deep/f", b"f"),
        Item::Dir("c"),
        Item::File("c/keep", b"keep"),
        Item::File("d", b"a file that becomes a directory"),
    ]);
    let upper = tar_of(&[
        Item::File("a/.wh.x", b""),
        Item::File("b/.wh..wh..opq", b""),
        Item::File("b/new", b"new"),
        Item::Dir("d"),
        Item::File("d/inside", b"in"),
        Item::File("c/keep", b"replaced"),
    ]);
    let src = layout(&t.path().join("img"), &[lower, upper], Arch::Amd64);
    let cache = t.path().join("cache");
    let got = unpack(&src, &cache).unwrap();
    assert!(!got.cached);
    let r = &got.root;
    assert!(!r.join("a/x").exists(), "a/x was whited out");
    assert_eq!(std::fs::read(r.join("a/y")).unwrap(), b"y");
    assert!(
        !r.join("b/old").exists() && !r.join("b/deep").exists(),
        "b is opaque"
    );
    assert_eq!(std::fs::read(r.join("b/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(r.join("c/keep")).unwrap(), b"replaced");
    assert_eq!(std::fs::read(r.join("d/inside")).unwrap(), b"in");
    assert!(!r.join("a/.wh.x").exists() && !r.join("b/.wh..wh..opq").exists());
    // The same image again comes from the cache.
    let again = unpack(&src, &cache).unwrap();
    assert!(again.cached);
    assert_eq!(again.root, got.root);
    assert_eq!(again.digest, got.digest);
}

#[test]
fn a_path_climbing_out_is_refused_and_nothing_is_kept() {
    let t = tempfile::tempdir().unwrap();
    let evil = tar_of(&[Item::File("../escaped", b"x")]);
    let src = layout(&t.path().join("img"), &[evil], Arch::Amd64);
    let cache = t.path().join("cache");
    let err = unpack(&src, &cache).unwrap_err().to_string();
    assert!(err.contains("climbs out"), "{err}");
    assert!(!t.path().join("escaped").exists());
    assert!(!cache.join("escaped").exists());
    assert_cache_has_no_root(&cache);
}

#[test]
fn nothing_is_written_through_a_symlink_that_leaves_the_root() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap().to_owned();
    let evil = tar_of(&[
        Item::Symlink("out", &target),
        Item::File("out/planted", b"x"),
    ]);
    let src = layout(&t.path().join("img"), &[evil], Arch::Amd64);
    let cache = t.path().join("cache");
    let err = unpack(&src, &cache).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
    assert!(
        !outside.join("planted").exists(),
        "written through the link"
    );
    assert_cache_has_no_root(&cache);
}

#[test]
fn a_hard_link_to_a_file_outside_the_root_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let secret = t.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    let evil = tar_of(&[Item::HardLink("stolen", secret.to_str().unwrap())]);
    let src = layout(&t.path().join("img"), &[evil], Arch::Amd64);
    let cache = t.path().join("cache");
    let err = unpack(&src, &cache).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    assert_cache_has_no_root(&cache);
}

#[test]
fn a_whiteout_behind_a_symlink_that_leaves_the_root_removes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"keep me").unwrap();
    let lower = tar_of(&[Item::Symlink("out", outside.to_str().unwrap())]);
    let upper = tar_of(&[
        Item::File("out/.wh.victim", b""),
        Item::File("out/.wh..wh..opq", b""),
    ]);
    let src = layout(&t.path().join("img"), &[lower, upper], Arch::Amd64);
    let cache = t.path().join("cache");
    let err = unpack(&src, &cache).unwrap_err().to_string();
    assert!(err.contains("outside the root"), "{err}");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep me");
    assert_cache_has_no_root(&cache);
}

#[test]
fn a_layer_that_does_not_match_its_digest_is_refused_before_a_byte_is_written() {
    let t = tempfile::tempdir().unwrap();
    let layer = tar_of(&[Item::File("f", b"the real content")]);
    let src = layout(
        &t.path().join("img"),
        std::slice::from_ref(&layer),
        Arch::Amd64,
    );
    // Swap the blob for another of the same size: only the digest can tell.
    let gz = gzip(&layer);
    let blob = src.join("blobs/sha256").join(hex(&Sha256::digest(&gz)));
    let forged = gzip(&tar_of(&[Item::File("f", b"the fake content")]));
    assert_eq!(forged.len(), gz.len(), "the test wants equal sizes");
    std::fs::write(&blob, &forged).unwrap();
    let cache = t.path().join("cache");
    let err = unpack(&src, &cache).unwrap_err().to_string();
    assert!(err.contains("SHA-256"), "{err}");
    assert_cache_has_no_root(&cache);
}

#[test]
fn device_nodes_in_a_layer_are_not_made() {
    let t = tempfile::tempdir().unwrap();
    let layer = tar_of(&[
        Item::Dir("dev"),
        Item::CharDevice("dev/mem"),
        Item::File("ok", b"ok"),
    ]);
    let src = layout(&t.path().join("img"), &[layer], Arch::Amd64);
    let got = unpack(&src, &t.path().join("cache")).unwrap();
    assert!(std::fs::symlink_metadata(got.root.join("dev/mem")).is_err());
    assert_eq!(std::fs::read(got.root.join("ok")).unwrap(), b"ok");
}

#[test]
fn an_image_for_another_architecture_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let src = layout(
        &t.path().join("img"),
        &[tar_of(&[Item::File("f", b"")])],
        Arch::ARM64,
    );
    let err = unpack(&src, &t.path().join("cache"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linux/arm64") && err.contains("amd64"),
        "{err}"
    );
}

#[test]
fn a_packed_tree_unpacks_to_the_same_files_modes_and_links() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("usr/bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(tree.join("usr/bin/tool"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(tree.join("etc/os-release"), b"ID=test\n").unwrap();
    std::os::unix::fs::symlink("usr/bin", tree.join("bin")).unwrap();
    let archive = t.path().join("image.tar");
    let digest = moat_image::pack(&tree, &archive, "moat-test:1").unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let cache = t.path().join("cache");
    let got = unpack(&archive, &cache).unwrap();
    assert_eq!(
        got.digest, digest,
        "the manifest packed is the one unpacked"
    );
    let r = &got.root;
    assert_eq!(
        std::fs::read(r.join("etc/os-release")).unwrap(),
        b"ID=test\n"
    );
    assert_eq!(
        std::fs::read_link(r.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read(r.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    let mode = std::fs::metadata(r.join("usr/bin/tool")).unwrap().mode();
    assert_eq!(mode & 0o777, 0o755);
    // The archive is remembered: the next start reads none of it.
    assert!(unpack(&archive, &cache).unwrap().cached);
    // And the same tree packs to the same image.
    let again = moat_image::pack(&tree, &t.path().join("again.tar"), "moat-test:1").unwrap();
    assert_eq!(again, digest);
}
