//! `cargo xtask images [kernel|initramfs|rootfs|all]`: the workspace VM's images, built from
//! the recipes in `images/` and cached under `target/moat-images` (or `$MOAT_IMAGES`) by a hash
//! of everything that goes into them. A build that is interrupted resumes where it stopped:
//! the kernel tree keeps its objects, the root image keeps its downloaded packages.
//!
//! What `moat run --backend vm` boots is named in `<cache>/current.toml`, rewritten after every
//! build, so `moat` finds the images without knowing where the repository is.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{describe, root, run_cmd};

/// The Debian package whose tarball the kernel is built from.
pub(crate) const KERNEL_PACKAGE: &str = "linux-source-6.12";
/// Bump when the build steps below change in a way the inputs' hash cannot see.
const KERNEL_RECIPE: &str = "kernel recipe 1: tinyconfig + fragment + patches; vmlinux bzImage";
/// The musl target guest-init is built for: one static binary, no loader, no libc in the
/// initramfs.
pub(crate) const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";

pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("MOAT_IMAGES").map_or_else(|| root().join("target/moat-images"), PathBuf::from)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let what = args.first().map_or("all", String::as_str);
    if what == "kernel-gpu" {
        // Booted only where a GPU is passed through (`moat run --gpu`, docs/gpu.md).
        return write_current(&[("kernel_gpu", kernel_gpu()?.vmlinux)]);
    }
    if what == "kernel-smp" {
        // Booted only by the SMP test; current.toml does not name it.
        let k = kernel_smp()?;
        eprintln!("xtask images: kernel-smp: {}", k.vmlinux.display());
        return Ok(());
    }
    let mut built: Vec<(&str, PathBuf)> = Vec::new();
    if matches!(what, "kernel" | "all") {
        built.push(("kernel", kernel()?.vmlinux));
    }
    if matches!(what, "initramfs" | "all") {
        built.push(("initramfs", initramfs()?));
    }
    if what == "oci" {
        // Not in current.toml: `moat run --image` takes its path (and `cargo xtask test` hands
        // it to the tests as MOAT_OCI_IMAGE).
        let archive = oci()?;
        eprintln!("xtask images: oci: {}", archive.display());
        return Ok(());
    }
    if matches!(what, "rootfs" | "all") {
        built.push(("rootfs", rootfs()?));
    }
    if built.is_empty() {
        bail!(
            "unknown image {what:?} (kernel, kernel-gpu, kernel-smp, initramfs, rootfs, oci or all)"
        );
    }
    write_current(&built)
}

/// The built kernel: the PVH ELF (what moat-vmm boots) and the bzImage.
pub(crate) struct Kernel {
    pub(crate) vmlinux: PathBuf,
    pub(crate) bzimage: PathBuf,
}

fn hex(digest: &[u8]) -> String {
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn step(what: &str, n: usize, of: usize, doing: &str) {
    eprintln!("xtask images: {what} [{n}/{of}] {doing}");
}

fn package_version(package: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .output()
        .context("cannot run dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The kernel's patches, in the order they apply.
fn kernel_patches() -> Result<Vec<PathBuf>> {
    let dir = root().join("images/kernel/patches");
    let mut patches: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    Ok(patches)
}

/// Builds the guest kernel unless the cache already holds this exact one.
pub(crate) fn kernel() -> Result<Kernel> {
    build_kernel("kernel", &["config.fragment"])
}

/// The kernel for VMs with a GPU passed through: the same plus PCI and MSI
/// (`images/kernel/gpu.fragment`, docs/gpu.md).
pub(crate) fn kernel_gpu() -> Result<Kernel> {
    build_kernel("kernel-gpu", &["config.fragment", "gpu.fragment"])
}

/// The kernel with SMP (`images/kernel/smp.fragment`): what the SMP boot test brings up
/// several vCPUs with (`MOAT_LINUX_SMP_KERNEL`, set for the VM tests in L1).
///
/// Not the workspace kernel: measured on kvm_pvm (1 vCPU, 512 MiB, the guest-init initramfs,
/// to `Run /init`), this one takes 77.5 and 73.9 s against 32.0 and 28.5 s without SMP, 2.5
/// times as long where guest kernel mode is emulated; `moat run` gives one vCPU by default.
/// Inside L1 (real KVM) it brings up 2 vCPUs in 0.65 s of guest time.
pub(crate) fn kernel_smp() -> Result<Kernel> {
    build_kernel("kernel-smp", &["config.fragment", "smp.fragment"])
}

/// Builds kernel `variant` from `images/kernel/<fragments>` on top of tinyconfig.
fn build_kernel(variant: &str, fragments: &[&str]) -> Result<Kernel> {
    const STEPS: usize = 5;
    crate::setup::ensure(&[crate::setup::Job::Kernel])?;
    let version = package_version(KERNEL_PACKAGE)?;
    let fragment_paths: Vec<PathBuf> = fragments
        .iter()
        .map(|f| root().join("images/kernel").join(f))
        .collect();
    let mut fragment = Vec::new();
    for path in &fragment_paths {
        fragment.extend(
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        fragment.push(b'\n');
    }
    let patches = kernel_patches()?;
    let mut h = Sha256::new();
    h.update(KERNEL_RECIPE);
    h.update(variant);
    h.update(&version);
    h.update(&fragment);
    let mut patch_hash = Sha256::new();
    for p in &patches {
        let text = std::fs::read(p)?;
        h.update(&text);
        patch_hash.update(&text);
    }
    let key = hex(&h.finalize());
    let cache = cache_dir();
    let out = cache.join(format!("{variant}-{key}"));
    let kernel = Kernel {
        vmlinux: out.join("vmlinux"),
        bzimage: out.join("bzImage"),
    };
    if kernel.vmlinux.exists() && kernel.bzimage.exists() {
        eprintln!(
            "xtask images: {variant} {version} cached: {}",
            kernel.vmlinux.display()
        );
        return Ok(kernel);
    }
    let started = Instant::now();
    // The source tree is extracted and patched once per (package version, patches); the object
    // tree beside it survives config changes and interruptions (make is incremental).
    let work = cache.join("kernel-work");
    std::fs::create_dir_all(&work)?;
    // One kernel build at a time in the shared work tree (`cargo xtask test` beside `run-vm`).
    let lock = std::fs::File::create(work.join("lock"))?;
    if lock.try_lock().is_err() {
        eprintln!("xtask images: waiting for another kernel build to finish");
        lock.lock()?;
        if kernel.vmlinux.exists() && kernel.bzimage.exists() {
            return Ok(kernel);
        }
    }
    let src_key = format!("{version} {}", hex(&patch_hash.finalize()));
    let src = work.join("src");
    let src_stamp = work.join("src.stamp");
    if std::fs::read_to_string(&src_stamp).ok().as_deref() != Some(src_key.as_str()) {
        step(
            variant,
            1,
            STEPS,
            &format!("extracting {KERNEL_PACKAGE} {version}"),
        );
        let _ = std::fs::remove_dir_all(&src);
        for obj in ["obj", "obj-gpu", "obj-smp"] {
            let _ = std::fs::remove_dir_all(work.join(obj));
        }
        std::fs::create_dir_all(&src)?;
        let tarball = format!("/usr/src/{KERNEL_PACKAGE}.tar.xz");
        run_cmd(
            Command::new("tar")
                .args(["-x", "--strip-components=1", "-f", &tarball, "-C"])
                .arg(&src),
        )?;
        step(
            variant,
            2,
            STEPS,
            &format!("applying {} patches", patches.len()),
        );
        for p in &patches {
            run_cmd(
                Command::new("patch")
                    .args(["-p1", "--forward", "--quiet", "-d"])
                    .arg(&src)
                    .arg("-i")
                    .arg(p),
            )?;
        }
        std::fs::write(&src_stamp, &src_key)?;
    } else {
        step(variant, 1, STEPS, "source tree already extracted");
        step(variant, 2, STEPS, "patches already applied");
    }
    let obj = work.join(format!(
        "obj{}",
        variant.strip_prefix("kernel").unwrap_or("")
    ));
    std::fs::create_dir_all(&obj)?;
    step(
        variant,
        3,
        STEPS,
        "configuring (tinyconfig + images/kernel/config.fragment)",
    );
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C").arg(&src).arg(format!("O={}", obj.display()));
        c.args(args);
        c
    };
    let config_stamp = obj.join("moat-config.stamp");
    if std::fs::read_to_string(&config_stamp).ok().as_deref() != Some(key.as_str()) {
        run_cmd(make(&["-s", "tinyconfig"]).stdout(Stdio::null()))?;
        run_cmd(
            Command::new(src.join("scripts/kconfig/merge_config.sh"))
                .current_dir(&obj)
                .args(["-m", "-O"])
                .arg(&obj)
                .arg(obj.join(".config"))
                .args(&fragment_paths)
                .stdout(Stdio::null()),
        )?;
        run_cmd(make(&["-s", "olddefconfig"]).stdout(Stdio::null()))?;
        check_config(&obj.join(".config"), &String::from_utf8_lossy(&fragment))?;
        std::fs::write(&config_stamp, &key)?;
    }
    let jobs = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    step(
        variant,
        4,
        STEPS,
        &format!(
            "compiling vmlinux and bzImage with {jobs} jobs (about 7 minutes on 2 cores, cold)"
        ),
    );
    compile_with_progress(make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]), &obj)?;
    step(variant, 5, STEPS, "storing");
    let tmp = cache.join(format!("{variant}-{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::copy(obj.join("vmlinux"), tmp.join("vmlinux"))?;
    std::fs::copy(obj.join("arch/x86/boot/bzImage"), tmp.join("bzImage"))?;
    std::fs::copy(obj.join(".config"), tmp.join("config"))?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "xtask images: {variant} {version} built in {:.0?}: {}",
        started.elapsed(),
        kernel.vmlinux.display()
    );
    Ok(kernel)
}

/// Every `CONFIG_X=y` the fragment asks for must have survived `olddefconfig` (a dependency it
/// silently dropped would give a kernel without, say, vsock).
fn check_config(config: &Path, fragment: &str) -> Result<()> {
    let have = std::fs::read_to_string(config)?;
    let dropped: Vec<&str> = fragment
        .lines()
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
        .filter(|l| !have.lines().any(|h| h == *l))
        .collect();
    if !dropped.is_empty() {
        bail!(
            "the kernel config dropped options images/kernel/config.fragment asks for \
             (a missing dependency?): {}",
            dropped.join(" ")
        );
    }
    Ok(())
}

/// Runs make, printing how many files it has built every 15 s (and, when a previous build
/// left a count, how far along that is). Make's own output goes to `build.log` in `obj`.
fn compile_with_progress(mut cmd: Command, obj: &Path) -> Result<()> {
    let log_path = obj.join("build.log");
    let count_path = obj.join("moat-objects.count");
    let expected: Option<u64> = std::fs::read_to_string(&count_path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    eprintln!("xtask: {} (log: {})", describe(&cmd), log_path.display());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run make")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let err_log = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines
    });
    let mut log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut last = Instant::now();
    let mut built = 0u64;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let _ = writeln!(log, "{line}");
        let t = line.trim_start();
        if ["CC ", "AS ", "LD ", "AR ", "OBJCOPY ", "HOSTCC "]
            .iter()
            .any(|p| t.starts_with(p))
        {
            built += 1;
        }
        if last.elapsed().as_secs() >= 15 {
            last = Instant::now();
            let of = expected.map_or_else(String::new, |e| {
                format!(" of about {e} ({}%)", (built * 100 / e.max(1)).min(99))
            });
            eprintln!(
                "xtask images: kernel compiling: {built}{of} files built, {:.0?}",
                started.elapsed()
            );
        }
    }
    let status = child.wait()?;
    let errors = err_log.join().unwrap_or_default();
    for l in &errors {
        let _ = writeln!(log, "{l}");
    }
    if !status.success() {
        let tail: Vec<&String> = errors.iter().rev().take(30).collect();
        for l in tail.into_iter().rev() {
            eprintln!("  {l}");
        }
        bail!(
            "the kernel build failed ({status}); full log: {} (run again to resume)",
            log_path.display()
        );
    }
    // A cold build's count is the one worth keeping (a resumed build counts only the rest).
    if built > expected.unwrap_or(0) {
        let _ = std::fs::write(&count_path, built.to_string());
    }
    Ok(())
}

/// The cargo target directory (where the guest-init binary lands).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Builds the static guest-init and packs it as `/init` of a newc initramfs.
pub(crate) fn initramfs() -> Result<PathBuf> {
    crate::setup::ensure(&[crate::setup::Job::Initramfs])?;
    step(
        "initramfs",
        1,
        2,
        &format!("building guest-init for {GUEST_TARGET} (static)"),
    );
    // Stripped: the guest kernel copies the initramfs at boot, and on nested PVM hosts
    // kernel-mode copying is instruction-emulated.
    run_cmd(
        crate::setup::cargo()
            .current_dir(root())
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "moat-guest-init",
                "--bin",
                "moat-guest-init",
                "--target",
                GUEST_TARGET,
            ]),
    )?;
    let bin = target_dir().join(format!("{GUEST_TARGET}/release/moat-guest-init"));
    let init = std::fs::read(&bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let key = hex(&Sha256::digest(&init));
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)?;
    let out = cache.join(format!("initramfs-{key}.cpio"));
    if out.exists() {
        eprintln!("xtask images: initramfs cached: {}", out.display());
        return Ok(out);
    }
    step("initramfs", 2, 2, "packing /init");
    let tmp = out.with_extension("tmp");
    write_initramfs(&init, std::fs::File::create(&tmp)?)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "xtask images: initramfs ({} KiB of guest-init): {}",
        init.len() / 1024,
        out.display()
    );
    Ok(out)
}

/// The initramfs: the directories guest-init mounts on, `/dev/console` (so the kernel can give
/// init its standard descriptors before devtmpfs is mounted), and `/init`. Owned by root,
/// every timestamp 0: the same binary always gives the same archive.
pub(crate) fn write_initramfs<W: Write>(init: &[u8], out: W) -> Result<W> {
    use cpio::NewcBuilder;
    let dir = |name: &str| (NewcBuilder::new(name).mode(0o040_755).nlink(2), &[][..]);
    let entries: Vec<(NewcBuilder, &[u8])> = vec![
        dir("dev"),
        (
            NewcBuilder::new("dev/console")
                .mode(0o020_600)
                .rdev_major(5)
                .rdev_minor(1),
            &[],
        ),
        dir("proc"),
        dir("sys"),
        dir("mnt"),
        dir("mnt/root"),
        (NewcBuilder::new("init").mode(0o100_755), init),
    ];
    let out = cpio::write_cpio(
        entries
            .into_iter()
            .map(|(b, data)| (b.uid(0).gid(0).mtime(0), std::io::Cursor::new(data))),
        out,
    )?;
    Ok(out)
}

/// Debian suite and mirror of the root image.
const ROOTFS_SUITE: &str = "bookworm";
const ROOTFS_MIRROR: &str = "http://deb.debian.org/debian";
/// Bump when the steps below change in a way the recipe's hash cannot see.
const ROOTFS_RECIPE: &str = "rootfs recipe 1: mmdebstrap minbase + packages + customize; ext4";

/// Builds the read-only root image from Debian packages (`images/rootfs/packages`, customized by
/// `images/rootfs/customize.sh`) with mmdebstrap: an ext4 image (the VM's root disk) and the
/// same tree as a directory beside it (the namespace backend's root, [`rootfs_dir`]).
pub(crate) fn rootfs() -> Result<PathBuf> {
    const STEPS: usize = 2;
    crate::setup::ensure(&[crate::setup::Job::RootImage])?;
    let dir = root().join("images/rootfs");
    let packages_text = std::fs::read_to_string(dir.join("packages"))
        .context("cannot read images/rootfs/packages")?;
    let customize = dir.join("customize.sh");
    let mut h = Sha256::new();
    h.update(ROOTFS_RECIPE);
    h.update(ROOTFS_SUITE);
    h.update(ROOTFS_MIRROR);
    h.update(&packages_text);
    h.update(std::fs::read(&customize).context("cannot read images/rootfs/customize.sh")?);
    let key = hex(&h.finalize());
    let cache = cache_dir();
    let out = cache.join(format!("rootfs-{key}.ext4"));
    let kept = rootfs_dir(&out);
    if out.exists() && kept.is_dir() {
        eprintln!("xtask images: root image cached: {}", out.display());
        return Ok(out);
    }
    let packages: Vec<&str> = packages_text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    let debs = cache.join("rootfs-debs");
    std::fs::create_dir_all(&debs)?;
    let tree = cache.join(format!("rootfs-{key}.tree"));
    let _ = std::fs::remove_dir_all(&tree);
    step(
        "root image",
        1,
        STEPS,
        &format!(
            "mmdebstrap {ROOTFS_SUITE} minbase + {} packages (downloads are kept in {} and \
             reused by the next run)",
            packages.len(),
            debs.display()
        ),
    );
    let debs_s = debs.display().to_string();
    run_cmd(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--mode=auto", "--format=directory"])
            .arg(format!("--include={}", packages.join(",")))
            .arg("--skip=download/empty")
            .arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!(
                "--setup-hook=sync-in {debs_s} /var/cache/apt/archives/"
            ))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {debs_s}"
            ))
            .arg(format!("--customize-hook={}", customize.display()))
            .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb")
            .arg(ROOTFS_SUITE)
            .arg(&tree)
            .arg(ROOTFS_MIRROR),
    )?;
    step("root image", 2, STEPS, "writing the ext4 image");
    let size_mib = moat_image::ext4_from_dir(&tree, &out)?;
    eprintln!("xtask images: root image: {size_mib} MiB ext4");
    // The tree stays, as the namespace backend's root: renamed last, so a directory under
    // this name is always complete.
    let _ = std::fs::remove_dir_all(&kept);
    std::fs::rename(&tree, &kept)
        .with_context(|| format!("cannot keep the root tree as {}", kept.display()))?;
    eprintln!(
        "xtask images: root image: {} (and as a directory: {})",
        out.display(),
        kept.display()
    );
    Ok(out)
}

/// The root image as an OCI archive (`rootfs-<key>.v2.oci.tar` beside the ext4 form): one layer,
/// the same tree, for `moat run --image` and the tests of it, without a registry.
pub(crate) fn oci() -> Result<PathBuf> {
    let ext4 = rootfs()?;
    // `v2`: packed without GNU sparse entries, which containerd cannot unpack (an archive
    // of the same tree packed before keeps its own name, and is never taken for this one).
    let out = ext4.with_extension("v2.oci.tar");
    if out.exists() {
        eprintln!("xtask images: OCI archive cached: {}", out.display());
        return Ok(out);
    }
    step(
        "OCI archive",
        1,
        1,
        "packing the root image's tree (one tar+gzip layer)",
    );
    let digest = moat_image::pack(&rootfs_dir(&ext4), &out, "moat-root:latest")?;
    eprintln!(
        "xtask images: OCI archive: {} (manifest {digest})",
        out.display()
    );
    Ok(out)
}

/// The root image as a directory, beside its ext4 form: what `moat run`'s namespace backend
/// binds read-only as the workspace's root.
pub(crate) fn rootfs_dir(ext4: &Path) -> PathBuf {
    ext4.with_extension("dir")
}

/// Updates `<cache>/current.toml`, the images `moat run --backend vm` boots: the ones this run
/// built (or found cached), and for the others what the file already named.
fn write_current(built: &[(&str, PathBuf)]) -> Result<()> {
    let path = cache_dir().join("current.toml");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut text =
        String::from("# Written by `cargo xtask images`: the images moat's vm backend boots.\n");
    let root_dir = built
        .iter()
        .find(|(k, _)| *k == "rootfs")
        .map(|(_, p)| ("rootfs_dir", rootfs_dir(p)));
    let built: Vec<(&str, PathBuf)> = built.iter().cloned().chain(root_dir).collect();
    for key in ["kernel", "kernel_gpu", "initramfs", "rootfs", "rootfs_dir"] {
        let line = built.iter().find(|(k, _)| *k == key).map_or_else(
            || {
                old.lines()
                    .find(|l| l.starts_with(&format!("{key} = ")))
                    .map(str::to_owned)
            },
            |(_, p)| Some(format!("{key} = {:?}", p.display().to_string())),
        );
        if let Some(line) = line {
            let _ = writeln!(text, "{line}");
        }
    }
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask images: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_holds_init_and_console_and_is_reproducible() {
        let init = b"\x7fELF not really".to_vec();
        let a = write_initramfs(&init, Vec::new()).unwrap();
        let b = write_initramfs(&init, Vec::new()).unwrap();
        assert_eq!(a, b, "the same binary gives the same archive");
        let mut rest = &a[..];
        let mut seen = Vec::new();
        loop {
            let mut r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let name = e.name().to_owned();
            seen.push((name.clone(), e.mode(), e.uid(), e.mtime()));
            if name == "dev/console" {
                assert_eq!((e.rdev_major(), e.rdev_minor()), (5, 1));
            }
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            if name == "init" {
                assert_eq!(data, init);
            }
            rest = r.finish().unwrap();
        }
        assert!(
            seen.contains(&("init".to_owned(), 0o100_755, 0, 0)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("dev/console".to_owned(), 0o020_600, 0, 0)),
            "{seen:?}"
        );
        assert!(seen.iter().any(|(n, ..)| n == "mnt/root"), "{seen:?}");
    }

    #[test]
    fn a_dropped_config_option_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xtask-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join(".config");
        std::fs::write(&config, "CONFIG_VSOCKETS=y\nCONFIG_TUN=y\n").unwrap();
        assert!(check_config(&config, "CONFIG_TUN=y\n# comment\nCONFIG_VSOCKETS=y\n").is_ok());
        let err = check_config(&config, "CONFIG_TUN=y\nCONFIG_VIRTIO_VSOCKETS=y\n").unwrap_err();
        assert!(
            err.to_string().contains("CONFIG_VIRTIO_VSOCKETS=y"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
