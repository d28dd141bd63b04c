//! `cargo xtask l1 [--timeout SECS] [--rw DIR]... -- CMD [ARGS...]`: runs CMD inside "L1", a
//! Debian Linux booted in QEMU's TCG emulator with an emulated AMD CPU (SVM and nested paging),
//! where kvm_amd gives a real /dev/kvm.
//!
//! Why: on our CI machines /dev/kvm is kvm_pvm, where a guest's user space cannot run at all,
//! so moat-vmm can boot Linux no further than `Run /init`. Inside L1 the VM backend's whole
//! path runs.
//!
//! How:
//! - the L1 pieces (Debian's kernel, pinned by [`L1_KERNEL_VERSION`], and a busybox initramfs
//!   holding the modules L1 needs) are built once and cached in `<images>/l1-<key>/`;
//! - the host's root is shared read-only by 9p and L1 `switch_root`s into it (not chroot:
//!   chroot makes unshare(CLONE_NEWUSER) fail with EPERM), with its own /proc, /sys, /dev,
//!   /dev/pts, and tmpfs on /tmp, /run and /var/log; `--rw DIR` shares a host directory
//!   read-write at the same path;
//! - CMD runs in the caller's working directory with the caller's environment (written into a
//!   read-write work share with the command), its output streams through the serial console,
//!   and its exit status (written back into the work share) becomes ours;
//! - L1 is a q35 machine with an Intel IOMMU (interrupt remapping, snoop control) and QEMU's
//!   educational PCI device `edu` (1234:11e8: a BAR, MSI, DMA) behind it; before CMD runs the
//!   device is bound to vfio-pci and named in `MOAT_VFIO_DEVICE`, so the real VFIO path
//!   (`moat-vmm --gpu`) runs in every L1 (vmm/tests/vfio_host.rs, docs/gpu.md);
//! - every run has an outer timeout: the L1 has been seen to freeze (both CPUs spinning with
//!   interrupts off), which is reported as a hang with its own exit status, [`EXIT_HUNG`].
//!
//! [`run_vm_tests`] is what `cargo xtask test` calls: where /dev/kvm cannot run a guest's user
//! space, the VM tests' executables (built here) run inside one L1. `cargo xtask l1 --vm-tests`
//! runs just those, inside L1 whatever the host's KVM.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{describe, root, run_cmd};

/// L1's kernel: Debian's generic kernel (the cloud kernel lacks 9p), fetched with
/// `apt-get download` and unpacked with `dpkg-deb`, never installed.
const L1_KERNEL_PACKAGE: &str = "linux-image-6.1.0-57-amd64";
/// The exact version of [`L1_KERNEL_PACKAGE`]. Debian's mirrors keep only the newest builds of
/// a stable kernel: when this one cannot be downloaded any more, bump both consts together
/// (`apt-cache policy linux-image-amd64` names the current package).
const L1_KERNEL_VERSION: &str = "6.1.192-3";
/// The modules L1 loads, in this order after their dependencies (read from each module's
/// `.modinfo`): KVM, the 9p file system over virtio, VFIO for passthrough tests, and overlayfs,
/// which containerd's snapshots mount (the shim's pooled pod runs under a containerd in L1).
const L1_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm_amd",
    "vfio_iommu_type1",
    "vfio_pci",
    "overlay",
];
/// Bump when the pieces change in a way the key (kernel, modules, scripts, busybox) cannot see.
const L1_RECIPE: &str = "l1 recipe 1: debian kernel + busybox initramfs, 9p root, switch_root";
/// The outer timeout of one L1 run unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT_SECS: u64 = 1800;
/// The outer timeout of the VM tests' L1: they take 8 to 10 minutes with its boot on our
/// 2-core machines (2026-12-06, every backend scenario through the VM included), so an L1
/// still running after this has frozen.
const VM_TESTS_TIMEOUT_SECS: u64 = 1200;
/// The VM tests' L1 counts as frozen when its console is silent this long: every test binary
/// prints as each of its tests ends, and all of them together took 217 s inside L1.
const VM_TESTS_SILENCE_SECS: u64 = 300;
/// L1 boots the VM tests may take when one dies under them (see `run_vm_tests_in_l1`).
const VM_TESTS_MAX_BOOTS: usize = 6;
/// Our exit status when L1 hung past its timeout (as timeout(1) reports one).
pub(crate) const EXIT_HUNG: i32 = 124;
/// Our exit status when L1 stopped without reporting CMD's status (a panic, a failed mount).
pub(crate) const EXIT_NO_STATUS: i32 = 125;
/// What L1's second stage prints once it is about to run CMD (xtask replaces the line with
/// its own phase line).
const READY_MARKER: &str = "moat-l1: ready";

/// L1's first stage, `/init` of the initramfs: loads the modules, mounts the host's root (9p,
/// read-only) and what a Linux system needs under it, then switch_roots into it with busybox
/// (copied onto the new /run) running the second stage.
const STAGE1: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "moat-l1: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
dmesg -n 1
for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" 2>/dev/null || echo "moat-l1: cannot load module $m"
done
o=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$o,ro,cache=loose" hostroot /newroot || fail "cannot mount the host's root"
mount -t tmpfs -o mode=0755 run /newroot/run || fail "no tmpfs on /run"
# L1's own /var/log: the host's is read-only here, and `moat run` keeps its logs there.
mount -t tmpfs -o mode=0755 log /newroot/var/log || fail "no tmpfs on /var/log"
mkdir -p /newroot/run/moat-l1/work
mount -t 9p -o "$o" work /newroot/run/moat-l1/work || fail "cannot mount the work share"
cp /bin/busybox /stage2 /newroot/run/moat-l1/
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mkdir -p /newroot/run/moat-l1/hosttmp
mount -o bind /newroot/tmp /newroot/run/moat-l1/hosttmp || fail "cannot keep the host's /tmp"
mount -t tmpfs -o mode=1777 tmp /newroot/tmp || fail "no tmpfs on /tmp"
# A job under the host's /tmp (a clone there, as CI may make) stays visible through the tmpfs.
while read -r dir; do
  mkdir -p "/newroot$dir" || fail "cannot make $dir"
  mount -o bind "/newroot/run/moat-l1/hosttmp${dir#/tmp}" "/newroot$dir" || fail "cannot keep $dir"
done < /newroot/run/moat-l1/work/keep
while read -r tag dir; do
  mount -t 9p -o "$o" "$tag" "/newroot$dir" || fail "cannot mount $dir read-write"
done < /newroot/run/moat-l1/work/rw
umount /proc /sys /dev
exec switch_root -c /dev/console /newroot /run/moat-l1/busybox sh /run/moat-l1/stage2
"#;

/// L1's second stage, PID 1 in the host's root view: runs CMD with the host's shell, writes
/// its exit status into the work share, powers off.
const STAGE2: &str = r#"B=/run/moat-l1/busybox
W=/run/moat-l1/work
$B hostname l1
$B ip link set lo up
ulimit -l unlimited
[ -e /dev/kvm ] || echo "moat-l1: no /dev/kvm in L1 (kvm_amd did not load)"
echo "moat-l1: ready"
/bin/sh $W/cmd.sh
echo $? > $W/status
$B sync
$B poweroff -f
"#;

/// How one L1 run ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// CMD ran and exited with this status.
    Exited(i32),
    /// L1 was still running at the timeout and was killed.
    Hung,
    /// L1 stopped without CMD's status (it never got as far, or it crashed).
    NoStatus,
}

/// What to run inside L1.
pub(crate) struct Job {
    pub(crate) argv: Vec<OsString>,
    pub(crate) cwd: PathBuf,
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Host directories shared read-write, at the same path.
    pub(crate) rw: Vec<PathBuf>,
    pub(crate) timeout: Duration,
    /// L1 counts as frozen (`Outcome::Hung`) when its console stays silent this long.
    pub(crate) silence: Option<Duration>,
}

/// The verb.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut timeout = DEFAULT_TIMEOUT_SECS;
    let mut rw = Vec::new();
    let mut it = args.iter();
    let mut argv = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout" => {
                timeout = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--timeout takes a number of seconds")?;
            }
            "--rw" => rw.push(PathBuf::from(it.next().context("--rw takes a directory")?)),
            "--vm-tests" if argv.is_empty() => return vm_tests_only(),
            "--" => {
                argv = it.map(OsString::from).collect();
                break;
            }
            other => bail!("cargo xtask l1: unknown option {other:?} (the command goes after --)"),
        }
    }
    if argv.is_empty() {
        bail!("usage: cargo xtask l1 [--timeout SECS] [--rw DIR]... -- CMD [ARGS...]");
    }
    let job = Job {
        argv,
        cwd: std::env::current_dir()?,
        env: std::env::vars_os().collect(),
        rw,
        timeout: Duration::from_secs(timeout),
        silence: None,
    };
    let code = match boot(&job)? {
        Outcome::Exited(code) => code,
        Outcome::Hung => EXIT_HUNG,
        Outcome::NoStatus => EXIT_NO_STATUS,
    };
    std::process::exit(code);
}

/// L1's kernel and initramfs.
pub(crate) struct Pieces {
    pub(crate) vmlinuz: PathBuf,
    pub(crate) initramfs: PathBuf,
}

fn hex8(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds L1's pieces unless the cache holds them.
pub(crate) fn pieces() -> Result<Pieces> {
    crate::setup::ensure(&[crate::setup::Job::L1])?;
    let busybox = std::fs::read("/bin/busybox").context("cannot read /bin/busybox")?;
    let mut h = Sha256::new();
    for part in [
        L1_RECIPE,
        L1_KERNEL_PACKAGE,
        L1_KERNEL_VERSION,
        &L1_MODULES.join(","),
        STAGE1,
        STAGE2,
    ] {
        h.update(part);
        h.update([0]);
    }
    h.update(&busybox);
    let dir = crate::images::cache_dir().join(format!("l1-{}", hex8(&h.finalize())));
    let pieces = Pieces {
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
    };
    if pieces.vmlinuz.exists() && pieces.initramfs.exists() {
        eprintln!("xtask l1: L1 pieces cached: {}", dir.display());
        return Ok(pieces);
    }
    let started = Instant::now();
    eprintln!(
        "xtask l1: building the L1 pieces ({L1_KERNEL_PACKAGE} {L1_KERNEL_VERSION}, busybox \
         initramfs) into {}",
        dir.display()
    );
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let deb = download_kernel(&tmp)?;
    let tree = tmp.join("x");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let release = L1_KERNEL_PACKAGE
        .strip_prefix("linux-image-")
        .context("L1_KERNEL_PACKAGE is not a linux-image package")?;
    std::fs::copy(
        tree.join(format!("boot/vmlinuz-{release}")),
        tmp.join("vmlinuz"),
    )
    .context("the kernel package holds no vmlinuz")?;
    let index = module_index(&tree.join(format!("lib/modules/{release}/kernel")))?;
    let order = load_order(L1_MODULES, &|m| {
        let path = index
            .get(m)
            .with_context(|| format!("the kernel package has no module {m}"))?;
        Ok(module_depends(&std::fs::read(path)?))
    })?;
    let mut modules = Vec::new();
    for m in &order {
        modules.push((m.clone(), std::fs::read(&index[m])?));
    }
    write_initramfs(
        &busybox,
        &modules,
        std::fs::File::create(tmp.join("initramfs.cpio"))?,
    )?;
    std::fs::remove_dir_all(&tree)?;
    std::fs::remove_file(&deb)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    eprintln!(
        "xtask l1: L1 pieces built in {:.1} s ({} modules: {})",
        started.elapsed().as_secs_f64(),
        order.len(),
        order.join(" ")
    );
    Ok(pieces)
}

/// `apt-get download`s the pinned kernel package into `dir`; returns the .deb.
fn download_kernel(dir: &Path) -> Result<PathBuf> {
    let spec = format!("{L1_KERNEL_PACKAGE}={L1_KERNEL_VERSION}");
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", &spec])
            .current_dir(dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        // Perhaps only the package lists are stale.
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        if !download() {
            bail!(
                "cannot download L1's kernel `{spec}` with apt-get download. Debian's mirrors \
                 keep only the newest builds of a stable kernel, so this pinned version has \
                 probably been superseded: set L1_KERNEL_PACKAGE and L1_KERNEL_VERSION in \
                 xtask/src/l1.rs to what `apt-cache depends linux-image-amd64` and \
                 `apt-cache policy linux-image-6.1.0-NN-amd64` name today (a bookworm 6.1 \
                 kernel; its modules must include kvm_amd and 9p), then run again."
            );
        }
    }
    std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")
}

/// A module's name as modprobe spells it: `kvm-amd.ko` is `kvm_amd`.
fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

/// Every `.ko` under `dir`, by module name.
fn module_index(dir: &Path) -> Result<std::collections::HashMap<String, PathBuf>> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = e?.path();
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".ko") {
                index.insert(module_name(&name), path);
            } else if name.contains(".ko.") {
                bail!("{name}: compressed modules are not supported (the initramfs insmods)");
            }
        }
    }
    Ok(index)
}

/// The `depends=` field of a module's `.modinfo` section (NUL-separated `key=value` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    ko.windows(KEY.len())
        .position(|w| w == KEY)
        .map(|at| {
            let rest = &ko[at + KEY.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(module_name)
                .collect()
        })
        .unwrap_or_default()
}

/// `wanted` and everything they depend on, each after its dependencies.
fn load_order(
    wanted: &[&str],
    depends: &dyn Fn(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        depends: &dyn Fn(&str) -> Result<Vec<String>>,
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|o| o == m) {
            return Ok(());
        }
        if path.iter().any(|p| p == m) {
            bail!("modules depend on each other in a cycle: {path:?} -> {m}");
        }
        path.push(m.to_owned());
        for d in depends(m)? {
            visit(&d, depends, order, path)?;
        }
        path.pop();
        order.push(m.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    for m in wanted {
        visit(m, depends, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// L1's initramfs: busybox, the two stages, the modules and their load order. Owned by root,
/// timestamps 0.
fn write_initramfs<W: Write>(busybox: &[u8], modules: &[(String, Vec<u8>)], out: W) -> Result<W> {
    use cpio::NewcBuilder;
    let order: String = modules.iter().map(|(m, _)| format!("{m}\n")).collect();
    let mut entries: Vec<(NewcBuilder, &[u8])> = Vec::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        entries.push((NewcBuilder::new(d).mode(0o040_755).nlink(2), &[]));
    }
    entries.push((
        NewcBuilder::new("dev/console")
            .mode(0o020_600)
            .rdev_major(5)
            .rdev_minor(1),
        &[],
    ));
    entries.push((NewcBuilder::new("bin/busybox").mode(0o100_755), busybox));
    entries.push((NewcBuilder::new("init").mode(0o100_755), STAGE1.as_bytes()));
    entries.push((
        NewcBuilder::new("stage2").mode(0o100_644),
        STAGE2.as_bytes(),
    ));
    entries.push((
        NewcBuilder::new("modules/order").mode(0o100_644),
        order.as_bytes(),
    ));
    for (m, ko) in modules {
        entries.push((
            NewcBuilder::new(&format!("modules/{m}.ko")).mode(0o100_644),
            ko,
        ));
    }
    Ok(cpio::write_cpio(
        entries
            .into_iter()
            .map(|(b, data)| (b.uid(0).gid(0).mtime(0), std::io::Cursor::new(data))),
        out,
    )?)
}

/// `s` quoted for a POSIX shell.
fn sh_quote(s: &OsStr) -> Vec<u8> {
    let mut q = b"'".to_vec();
    for &b in s.as_bytes() {
        if b == b'\'' {
            q.extend_from_slice(b"'\\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

/// What L1 runs before CMD, after the caller's environment: binds QEMU's edu device (1234:11e8,
/// alone in its IOMMU group) to vfio-pci and names it in `MOAT_VFIO_DEVICE`, so that moat-vmm
/// can pass it through (`--gpu`) and vmm/tests/vfio_host.rs finds it.
const VFIO_PRELUDE: &str = r#"for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] || continue
  a=${d##*/}
  echo vfio-pci > "$d/driver_override"
  [ -e "$d/driver" ] && echo "$a" > "$d/driver/unbind"
  echo "$a" > /sys/bus/pci/drivers_probe
  if [ -e "/sys/bus/pci/drivers/vfio-pci/$a" ]; then
    export MOAT_VFIO_DEVICE="$a"
  else
    echo "moat-l1: cannot bind the edu device $a to vfio-pci"
  fi
done
"#;

/// The script L1 runs: the caller's environment (names a shell can set), [`VFIO_PRELUDE`],
/// directory and command.
fn command_script(job: &Job) -> Vec<u8> {
    let mut s = Vec::new();
    for (k, v) in &job.env {
        let name = k.as_bytes();
        let valid = !name.is_empty()
            && !name[0].is_ascii_digit()
            && name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
        if valid {
            s.extend_from_slice(b"export ");
            s.extend_from_slice(name);
            s.push(b'=');
            s.extend(sh_quote(v));
            s.push(b'\n');
        }
    }
    s.extend_from_slice(VFIO_PRELUDE.as_bytes());
    s.extend_from_slice(b"cd ");
    s.extend(sh_quote(job.cwd.as_os_str()));
    s.extend_from_slice(b" || exit 125\nexec");
    for a in &job.argv {
        s.push(b' ');
        s.extend(sh_quote(a));
    }
    s.push(b'\n');
    s
}

/// Boots L1, runs `job` in it, and reports how it ended.
pub(crate) fn boot(job: &Job) -> Result<Outcome> {
    let pieces = pieces()?;
    let work = crate::images::cache_dir().join(format!("l1-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = boot_in(job, &pieces, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn boot_in(job: &Job, pieces: &Pieces, work: &Path) -> Result<Outcome> {
    std::fs::write(work.join("cmd.sh"), command_script(job))?;
    // L1's /tmp is a tmpfs of its own: a working directory under the host's /tmp is bound
    // back over it (STAGE1), or the job would not find its files.
    let cwd = job.cwd.canonicalize().unwrap_or_else(|_| job.cwd.clone());
    let keep = match cwd.to_str() {
        Some(dir) if dir.starts_with("/tmp/") && !dir.contains('\n') => format!("{dir}\n"),
        _ => String::new(),
    };
    std::fs::write(work.join("keep"), keep)?;
    let mut rw_lines = String::new();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max,-la57"])
        .args(["-smp", "2", "-m", "3072"])
        // An IOMMU (first: it must exist before the devices it translates for) and QEMU's
        // educational PCI device behind it, for the real VFIO path (`VFIO_PRELUDE`).
        // snoop-control=on: without it moat-vmm refuses the container (no cache-coherent DMA).
        .args([
            "-device",
            "intel-iommu,intremap=on,snoop-control=on",
            "-device",
            "edu",
        ])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&pieces.vmlinuz)
        .arg("-initrd")
        .arg(&pieces.initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off intel_iommu=on iommu=pt",
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=none",
            work.display()
        ));
    for (i, dir) in job.rw.iter().enumerate() {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--rw {}: no such directory", dir.display()))?;
        let text = dir.to_str().filter(|s| !s.contains([',', '\n', ' ']));
        let text = text.with_context(|| format!("--rw {}: an awkward path", dir.display()))?;
        rw_lines.push_str(&format!("rw{i} {text}\n"));
        qemu.arg("-virtfs").arg(format!(
            "local,path={text},mount_tag=rw{i},security_model=none,multidevs=remap"
        ));
    }
    std::fs::write(work.join("rw"), rw_lines)?;
    let shown: Vec<String> = job
        .argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let shown = shown.join(" ");
    eprintln!(
        "xtask l1: booting L1 (QEMU TCG, 2 CPUs, 3 GiB; timeout {} s)",
        job.timeout.as_secs()
    );
    let started = Instant::now();
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(&qemu)))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let shown_cmd = shown.clone();
    // Milliseconds since `started` of the console's latest output.
    let last_output = Arc::new(AtomicU64::new(0));
    let heard = Arc::clone(&last_output);
    let console =
        std::thread::spawn(move || copy_console(stdout, &shown_cmd, &ready_tx, started, &heard));
    let deadline = started + job.timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        let silent = started
            .elapsed()
            .saturating_sub(Duration::from_millis(last_output.load(Ordering::Relaxed)));
        let frozen = job.silence.filter(|limit| silent >= *limit);
        if let Some(limit) = frozen {
            eprintln!(
                "xtask l1: L1's console silent for {} s: taking it as frozen",
                limit.as_secs()
            );
        }
        if Instant::now() >= deadline || frozen.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = console.join();
    let ready = ready_rx.try_recv().ok();
    let total = started.elapsed().as_secs_f64();
    let times = match ready {
        Some(at) => format!(
            "boot {:.1} s, command {:.1} s, total {total:.1} s",
            at.as_secs_f64(),
            total - at.as_secs_f64()
        ),
        None => format!("total {total:.1} s, never ready"),
    };
    let Some(status) = status else {
        eprintln!("xtask l1: L1 HUNG: killed ({times}); exit status {EXIT_HUNG}");
        return Ok(Outcome::Hung);
    };
    let code = std::fs::read_to_string(work.join("status"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match code {
        Some(code) => {
            eprintln!("xtask l1: L1 powered off; `{shown}` exited with {code} ({times})");
            Ok(Outcome::Exited(code))
        }
        None => {
            eprintln!(
                "xtask l1: L1 stopped ({status}) without running `{shown}` to the end \
                 ({times}); exit status {EXIT_NO_STATUS}"
            );
            Ok(Outcome::NoStatus)
        }
    }
}

/// Copies the serial console to our stdout, without the carriage returns the console adds
/// before each newline, and replaces L1's ready marker with our phase line (sending the time
/// it came at).
fn copy_console(
    mut from: impl Read,
    shown: &str,
    ready: &mpsc::Sender<Duration>,
    started: Instant,
    last_output: &AtomicU64,
) {
    let heard = || {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_output.store(ms, Ordering::Relaxed);
    };
    let mut out = std::io::stdout();
    // Until L1 is ready: whole lines, to find the marker.
    let mut reader = BufReader::new(&mut from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => heard(),
        }
        // The firmware clears the screen and resets the terminal: none of that reaches ours.
        let text = without_escapes(&String::from_utf8_lossy(&line));
        let text = text.trim_end();
        if text.ends_with(READY_MARKER) {
            let at = started.elapsed();
            let _ = ready.send(at);
            eprintln!(
                "xtask l1: L1 ready after {:.1} s (kvm_amd loaded); running `{shown}`",
                at.as_secs_f64()
            );
            break;
        }
        if !(text.is_empty() || text.starts_with("SeaBIOS") || text.starts_with("Booting from")) {
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }
    // Then everything as it comes.
    let mut pending_cr = false;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                heard();
                let _ = out.write_all(&strip_cr(&buf[..n], &mut pending_cr));
                let _ = out.flush();
            }
        }
    }
    if pending_cr {
        let _ = out.write_all(b"\r");
    }
}

/// `text` without terminal escape sequences (`ESC [ ... final` and two-byte `ESC x`).
fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
        } else if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// `data` without each `\r` that comes right before a `\n`; `pending` carries a `\r` that
/// ended the previous chunk.
fn strip_cr(data: &[u8], pending: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    for &b in data {
        if *pending && b != b'\n' {
            out.push(b'\r');
        }
        *pending = b == b'\r';
        if !*pending {
            out.push(b);
        }
    }
    out
}

/// Whether /dev/kvm runs a guest's user space here: hardware KVM (kvm_intel or kvm_amd), not
/// kvm_pvm, and openable.
pub(crate) fn kvm_is_real() -> bool {
    moat_host_probe::kvm_flavour().is_hardware() && moat_host_probe::kvm_usable()
}

/// The VM tests: every moat-vmm integration test, moat's vm_e2e and vm_snapshot, the shim's
/// pooled pod (containerd's `pooled_` tests) and the broker's VM session. Where KVM is real they
/// already ran with the workspace's tests; elsewhere their executables (built here) run inside
/// one L1, with `env` (what `cargo xtask test` gives every test) and the root image.
pub(crate) fn run_vm_tests(env: &[(&str, PathBuf)]) -> Result<()> {
    if kvm_is_real() {
        eprintln!("xtask test: /dev/kvm is hardware KVM: the VM tests ran directly above");
        return Ok(());
    }
    eprintln!(
        "xtask test: /dev/kvm cannot run a guest's user space here (kvm_pvm, or none): \
         running the VM tests inside L1"
    );
    run_vm_tests_in_l1(env)
}

/// `cargo xtask l1 --vm-tests`: only the VM tests, inside L1 whatever the host's KVM.
fn vm_tests_only() -> Result<()> {
    let kernel = crate::images::kernel()?;
    let gpu_kernel = crate::images::kernel_gpu()?;
    let initramfs = crate::images::initramfs()?;
    let oci = crate::images::oci()?;
    // The shim's pooled pod starts its containerd with the node's OTLP sink.
    let otlp_python = crate::setup::otlp_venv()?;
    run_vm_tests_in_l1(&[
        ("MOAT_OTLP_PYTHON", otlp_python),
        ("MOAT_LINUX_KERNEL", kernel.vmlinux),
        ("MOAT_LINUX_BZIMAGE", kernel.bzimage),
        ("MOAT_LINUX_INITRAMFS", initramfs),
        ("MOAT_LINUX_PCI_KERNEL", gpu_kernel.vmlinux),
        ("MOAT_OCI_IMAGE", oci),
    ])
}

/// Builds the VM tests and the images they boot here, then runs the tests inside one L1.
fn run_vm_tests_in_l1(env: &[(&str, PathBuf)]) -> Result<()> {
    // The full vm_e2e boots the root image; `images all` also names it in current.toml.
    crate::images::run(&["all".to_owned()])?;
    let probe = crate::vmm::probe_guest()?;
    // Built for the whole workspace, as `cargo xtask test` built them just before: the same
    // feature set, so nothing is compiled twice.
    run_cmd(crate::setup::cargo().current_dir(root()).args([
        "build",
        "--locked",
        "--workspace",
        "--bins",
    ]))?;
    // Integration tests only (vmm/tests/*.rs, moat's vm_e2e and vm_snapshot, the broker's session into a
    // VM workspace: broker_e2e's tests named vm_*, and a pod claimed from a pool of VMs through
    // containerd: the shim's tests named pooled_*): unit tests need no KVM and ran on the host.
    let tests: Vec<_> = test_executables(&["--workspace", "--tests"])?
        .into_iter()
        .filter_map(|(dir, name, exe)| {
            let filter = match name.as_str() {
                _ if dir.ends_with("vmm") => "",
                "vm_e2e" | "vm_snapshot" => "",
                "broker_e2e" => "vm_",
                "containerd" => "pooled_",
                _ => return None,
            };
            Some((dir, name, exe, filter))
        })
        .collect();
    let target = target_dir();
    let tmp = target.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let script_path = tmp.join("l1-vm-tests.sh");
    // Each binary's exit status, `done INDEX STATUS` a line, written through the read-write
    // share as it ends: what a crashed L1 finished survives it.
    let progress_path = tmp.join("l1-vm-tests.progress");
    if let Some((_, archive)) = env.iter().find(|(k, _)| *k == "MOAT_OCI_IMAGE") {
        prepare_image_cache(archive, &tmp)?;
    }
    let mut job_env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    job_env.extend(env.iter().map(|(k, v)| (OsString::from(k), v.into())));
    job_env.push(("MOAT_PROBE_GUEST".into(), probe.into()));
    // Inside L1 KVM is real, we are root with user namespaces: a VM test that would skip
    // fails instead (vmm/tests/common `skip`, vm_e2e `skip_full`).
    job_env.push(("MOAT_EXPECT_REAL_KVM".into(), "1".into()));
    // Every L1 has an edu device bound to vfio-pci (`VFIO_PRELUDE`): the real VFIO tests
    // (vmm/tests/vfio_host.rs) must run, not skip.
    job_env.push(("MOAT_EXPECT_VFIO".into(), "1".into()));
    // The SMP boot (vmm/tests/linux_boot.rs) runs here only: it is slow where guest kernel
    // mode is emulated (kvm_pvm).
    job_env.push((
        "MOAT_LINUX_SMP_KERNEL".into(),
        crate::images::kernel_smp()?.vmlinux.into(),
    ));
    let job = Job {
        argv: vec!["sh".into(), script_path.clone().into()],
        cwd: root(),
        env: job_env,
        // The tests' scratch directories (CARGO_TARGET_TMPDIR).
        rw: vec![tmp.clone()],
        timeout: Duration::from_secs(VM_TESTS_TIMEOUT_SECS),
        silence: Some(Duration::from_secs(VM_TESTS_SILENCE_SECS)),
    };

    // The emulated L1 itself is not reliable over many VM boots: it has frozen (both CPUs
    // spinning) and panicked ("corrupted stack end detected inside scheduler" in a vCPU
    // thread, CI 2026-12-06) while our code ran in user mode. So when L1 dies, a fresh one
    // runs what it did not finish, and reruns what failed in it: a sick L1's failures
    // (a guest stalled for 30 s there, just before the panic) say nothing of our code.
    let mut status: Vec<Option<i32>> = vec![None; tests.len()];
    let mut todo: Vec<usize> = (0..tests.len()).collect();
    // Binaries already rerun because a guest crashed or hung in them (once each).
    let mut rerun_for_crash: Vec<usize> = Vec::new();
    for boot_no in 1..=VM_TESTS_MAX_BOOTS {
        let mut script = String::new();
        for &i in &todo {
            let (dir, name, exe, filter) = &tests[i];
            let (dir, exe, progress) = (dir.display(), exe.display(), progress_path.display());
            let log = output_path(&tmp, i);
            let log = log.display();
            // The output goes to the console as it comes (the silence watchdog reads it) and
            // to a file through the share, which says afterwards how a failure looked.
            script.push_str(&format!(
                "echo \"xtask l1: test binary {name} {filter}\"\n\
                 {{ (cd '{dir}' && '{exe}' {filter}) 2>&1; echo \"done {i} $?\" >> '{progress}'; }} \
                 | tee '{log}'\n"
            ));
        }
        std::fs::write(&script_path, script)?;
        std::fs::write(&progress_path, "")?;
        let outcome = boot(&job)?;
        let ran = finished_binaries(&std::fs::read_to_string(&progress_path)?);
        for &(i, code) in &ran {
            if let Some(slot) = status.get_mut(i) {
                *slot = Some(code);
            }
        }
        if matches!(outcome, Outcome::Exited(_)) {
            todo.retain(|i| status[*i].is_none());
            // A binary that failed because a guest crashed or hung: once more in a fresh L1.
            let crashed = crash_reruns(&ran, &rerun_for_crash, |i| {
                std::fs::read_to_string(output_path(&tmp, i)).unwrap_or_default()
            });
            if crashed.is_empty() || boot_no == VM_TESTS_MAX_BOOTS {
                break;
            }
            let names: Vec<&str> = crashed.iter().map(|i| tests[*i].1.as_str()).collect();
            eprintln!(
                "xtask l1: a guest crashed (\"{GUEST_TRIPLE_FAULT}\") or hung (a run killed at \
                 its deadline) in {} above: the emulated L1 has corrupted its own kernel's \
                 stacks in vCPU threads before (docs/development.md), so a fresh L1 runs them \
                 once more and their second run is the verdict",
                names.join(" ")
            );
            rerun_for_crash.extend(&crashed);
            todo.extend(crashed);
            continue;
        }
        todo.retain(|i| status[*i] != Some(0));
        if boot_no < VM_TESTS_MAX_BOOTS && !todo.is_empty() {
            let names: Vec<&str> = todo.iter().map(|i| tests[*i].1.as_str()).collect();
            eprintln!(
                "xtask l1: L1 died ({outcome:?}) during the VM tests: a fresh L1 runs what it \
                 did not finish or failed: {}",
                names.join(" ")
            );
        }
    }
    let failed: Vec<&str> = (0..tests.len())
        .filter(|i| status[*i].is_some_and(|code| code != 0))
        .map(|i| tests[i].1.as_str())
        .collect();
    let never: Vec<&str> = todo
        .iter()
        .filter(|i| status[**i].is_none())
        .map(|i| tests[*i].1.as_str())
        .collect();
    if !never.is_empty() {
        bail!(
            "these VM test binaries never reported a status from L1 (at most \
             {VM_TESTS_MAX_BOOTS} L1 boots): {} (see above)",
            never.join(" ")
        );
    }
    if !failed.is_empty() {
        bail!("VM tests failed inside L1: {}", failed.join(" "));
    }
    eprintln!("xtask l1: all {} VM test binaries passed", tests.len());
    Ok(())
}

/// What `moat run --image` does first, done here on the host for the VM tests' image (the
/// tests' cache, `target/tmp/moat-image-cache`): inside L1 the same unpacking and mkfs run
/// emulated, minutes instead of seconds.
fn prepare_image_cache(archive: &Path, tmp: &Path) -> Result<()> {
    let cache = tmp.join("moat-image-cache");
    let unpacked = moat_image::unpack(archive, &cache, &mut |step| {
        eprintln!("xtask l1: image for the VM tests: {step}");
    })?;
    let (disk, made) = moat_image::ext4_disk(&unpacked)?;
    if made {
        eprintln!(
            "xtask l1: image for the VM tests: root disk {}",
            disk.display()
        );
    }
    Ok(())
}

/// What moat-vmm reports when a guest's vCPU shut down (a triple fault), as a failed VM test
/// prints it.
const GUEST_TRIPLE_FAULT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";
/// What a VM test prints when a run it started outlived its deadline and was killed
/// (`moat/tests/common/deadline.rs`): a guest that hung.
const RUN_KILLED_AT_DEADLINE: &str = " s, killed.";

/// Whether a failed binary's output shows a guest that crashed or hung, the ways the emulated
/// L1 has failed guests, rather than a wrong answer.
fn guest_crashed_or_hung(output: &str) -> bool {
    output.contains(GUEST_TRIPLE_FAULT)
        || (output.contains("still running after") && output.contains(RUN_KILLED_AT_DEADLINE))
}

/// Which of the binaries that ran (`ran`: index, status) failed with a guest that crashed or
/// hung in their output (`output(i)`) and were not rerun for one already.
fn crash_reruns(
    ran: &[(usize, i32)],
    already: &[usize],
    output: impl Fn(usize) -> String,
) -> Vec<usize> {
    ran.iter()
        .filter(|&&(i, code)| code != 0 && !already.contains(&i))
        .map(|&(i, _)| i)
        .filter(|&i| guest_crashed_or_hung(&output(i)))
        .collect()
}

/// Where the `i`th VM test binary's output is kept (through the read-write share).
fn output_path(tmp: &Path, i: usize) -> PathBuf {
    tmp.join(format!("l1-vm-tests.{i}.out"))
}

/// `(index, exit status)` of every `done INDEX STATUS` line of the VM tests' progress file.
fn finished_binaries(progress: &str) -> Vec<(usize, i32)> {
    progress
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("done ")?.split(' ');
            let index = words.next()?.parse().ok()?;
            let code = words.next()?.parse().ok()?;
            Some((index, code))
        })
        .collect()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `cargo test --no-run` with `select`: (package directory, target name, executable) of each
/// integration test it built.
fn test_executables(select: &[&str]) -> Result<Vec<(PathBuf, String, PathBuf)>> {
    let mut cmd = crate::setup::cargo();
    cmd.current_dir(root())
        .args(["test", "--locked", "--no-run", "--message-format=json"])
        .args(select)
        .stdout(Stdio::piped());
    eprintln!("xtask: {}", describe(&cmd));
    let out = cmd.output().context("cannot run cargo")?;
    if !out.status.success() {
        bail!("{} failed ({})", describe(&cmd), out.status);
    }
    let mut found = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || !msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        {
            continue;
        }
        let dir = Path::new(manifest)
            .parent()
            .context("manifest path")?
            .to_path_buf();
        let name = msg["target"]["name"].as_str().unwrap_or("?").to_owned();
        found.push((dir, name, PathBuf::from(exe)));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        let deps = |m: &str| -> Result<Vec<String>> {
            Ok(match m {
                "kvm_amd" => vec!["kvm".into(), "ccp".into()],
                "kvm" => vec!["irqbypass".into()],
                "vfio_pci" => vec!["vfio_pci_core".into(), "vfio".into()],
                "vfio_pci_core" => vec!["vfio".into(), "irqbypass".into()],
                _ => vec![],
            })
        };
        let order = load_order(&["kvm_amd", "vfio_pci"], &deps).unwrap();
        assert_eq!(
            order,
            [
                "irqbypass",
                "kvm",
                "ccp",
                "kvm_amd",
                "vfio",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
        let cyclic =
            |m: &str| -> Result<Vec<String>> { Ok(vec![if m == "a" { "b" } else { "a" }.into()]) };
        assert!(load_order(&["a"], &cyclic).is_err());
    }

    #[test]
    fn depends_is_read_from_modinfo_with_modprobe_names() {
        let ko = b"\x7fELF...\0license=GPL\0depends=kvm,vfio-pci-core\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["kvm", "vfio_pci_core"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
    }

    #[test]
    fn only_a_failed_binary_whose_guest_crashed_or_hung_is_rerun_and_only_once() {
        let output = |i: usize| match i {
            0 | 1 => format!("moat-vmm: GuestCrashed(\"vCPU 0: {GUEST_TRIPLE_FAULT}\")"),
            3 => "moat run -- true: still running after 182 s, killed.\n".to_owned(),
            _ => "assertion `left == right` failed".to_owned(),
        };
        // 0 failed with a triple fault; 1 printed one but passed; 2 failed with a wrong
        // answer; 3 failed with a hung run.
        let ran = [(0, 101), (1, 0), (2, 101), (3, 101)];
        assert_eq!(crash_reruns(&ran, &[], output), vec![0, 3]);
        assert!(crash_reruns(&ran, &[0, 3], output).is_empty());
    }

    #[test]
    fn only_whole_done_lines_count_as_finished_binaries() {
        let progress = "done 0 0\ndone 3 101\nstart 4\ndone x 0\ndone 5\ndone 2 0";
        assert_eq!(finished_binaries(progress), vec![(0, 0), (3, 101), (2, 0)]);
    }

    #[test]
    fn firmware_escapes_are_dropped() {
        assert_eq!(
            without_escapes("\x1bc\x1b[?7l\x1b[2Jmoat-l1: ready\r\n"),
            "moat-l1: ready\r\n"
        );
    }

    #[test]
    fn carriage_returns_before_newlines_go_even_across_chunks() {
        let mut pending = false;
        let mut out = strip_cr(b"a\r\nb\r", &mut pending);
        out.extend(strip_cr(b"\nc\rd\r", &mut pending));
        out.extend(strip_cr(b"e", &mut pending));
        assert_eq!(out, b"a\nb\nc\rd\re");
    }

    #[test]
    fn the_command_script_keeps_arguments_and_environment_intact() {
        let job = Job {
            argv: vec!["sh".into(), "-c".into(), "echo 'it''s'; exit 3".into()],
            cwd: PathBuf::from("/work/a b"),
            env: vec![
                ("GOOD".into(), "x'y z".into()),
                ("BASH_FUNC_f%%".into(), "() { :; }".into()),
            ],
            rw: Vec::new(),
            timeout: Duration::from_secs(1),
            silence: None,
        };
        let script = String::from_utf8(command_script(&job)).unwrap();
        let (env, rest) = script.split_once(VFIO_PRELUDE).unwrap();
        assert_eq!(env, "export GOOD='x'\\''y z'\n");
        assert_eq!(
            rest,
            "cd '/work/a b' || exit 125\n\
             exec 'sh' '-c' 'echo '\\''it'\\'''\\''s'\\''; exit 3'\n"
        );
    }
}
