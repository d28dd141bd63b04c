//! Whether the VM backend's full path can run here, and where its images are: shared by
//! vm_e2e and the broker's session into a VM workspace (broker_e2e).

use std::path::{Path, PathBuf};

pub use moat_host_probe::{KvmFlavour, kvm_flavour, kvm_usable};

/// moat-vmm beside the moat binary under test (`cargo xtask test` builds the whole workspace).
pub fn vmm_built() -> bool {
    Path::new(env!("CARGO_BIN_EXE_moat"))
        .with_file_name("moat-vmm")
        .is_file()
}

pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// Like [`skip`], but where this run expects real KVM (`MOAT_EXPECT_REAL_KVM`, set by
/// `cargo xtask test` inside L1) the test fails instead: the full path must have run.
pub fn skip_full(test: &str, why: &str) {
    assert!(
        std::env::var_os("MOAT_EXPECT_REAL_KVM").is_none(),
        "{test}: this run expects real KVM and the images, but: {why}"
    );
    skip(test, why);
}

/// Where the full path finds its images: `$MOAT_IMAGES`, or what `cargo xtask images` built.
fn full_images() -> Result<PathBuf, String> {
    let dir = std::env::var_os("MOAT_IMAGES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moat-images"),
        PathBuf::from,
    );
    let current = std::fs::read_to_string(dir.join("current.toml")).map_err(|_| {
        format!(
            "no {}/current.toml (build the images with `cargo xtask images`)",
            dir.display()
        )
    })?;
    if !current.contains("rootfs") {
        return Err("the root image is not built (`cargo xtask images rootfs`)".into());
    }
    Ok(dir)
}

/// Why the full VM path cannot run on this host, if it cannot.
fn full_vm_unavailable() -> Option<String> {
    if !kvm_usable() {
        return Some("/dev/kvm is not available".into());
    }
    if kvm_flavour() == KvmFlavour::NestedPvm {
        return Some(
            "/dev/kvm is nested PVM, where a Linux guest's user space cannot run \
             (`cargo xtask test` runs this test inside L1, where KVM is real)"
                .into(),
        );
    }
    if !kvm_flavour().is_hardware() {
        return Some("/dev/kvm is neither kvm_intel nor kvm_amd".into());
    }
    if !vmm_built() {
        return Some("moat-vmm is not built beside moat (cargo build -p moat-vmm)".into());
    }
    None
}

/// The images directory for test `name`'s VM workspace, or `None` (after saying why) where
/// the full path cannot run here; inside L1 that is a failure instead ([`skip_full`]).
pub fn vm_images(name: &str) -> Option<PathBuf> {
    if let Some(why) = full_vm_unavailable() {
        skip_full(name, &why);
        return None;
    }
    match full_images() {
        Ok(images) => Some(images),
        Err(why) => {
            skip_full(name, &why);
            None
        }
    }
}
