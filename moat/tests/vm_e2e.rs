//! The vm backend end to end: `moat run --backend vm` starts the egress proxy and the control
//! socket, and boots our kernel and initramfs (guest-init as /init) through moat-vmm with the
//! root image, a home disk, rng and vsock.
//!
//! Two levels, chosen by what the host's KVM can do:
//! - On nested PVM (our CI machines) guest user space cannot run: the test proves the host side
//!   and the boot up to `Run /init` (Linux's virtio drivers probing our devices), and that moat
//!   says plainly that guest-init never reported.
//! - Where KVM has hardware virtualization and the images are built (`cargo xtask images`), the
//!   full path: curl in the VM reaches an allowed host through netstack, vsock, VMM and egress
//!   proxy; a denied host fails; writing outside home fails; the exit status comes back; the
//!   audit log shows it all.
//!
//! Each test prints why it is skipped when it cannot run here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::vm::{KvmFlavour, kvm_flavour, kvm_usable, skip, vm_images, vmm_built};
use common::{Workspace, text};

/// A 16 MiB empty ext4 image: on nested PVM the kernel never gets as far as mounting it.
fn empty_ext4(path: &Path) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn on_nested_pvm_the_vm_backend_boots_our_kernel_and_initramfs_to_init() {
    const NAME: &str = "on_nested_pvm_the_vm_backend_boots_our_kernel_and_initramfs_to_init";
    if kvm_flavour() != KvmFlavour::NestedPvm || !kvm_usable() {
        return skip(
            NAME,
            "this host's /dev/kvm is not nested PVM (the full test runs instead)",
        );
    }
    let (Some(kernel), Some(initramfs)) = (
        std::env::var_os("MOAT_LINUX_KERNEL"),
        std::env::var_os("MOAT_LINUX_INITRAMFS"),
    ) else {
        return skip(
            NAME,
            "MOAT_LINUX_KERNEL and MOAT_LINUX_INITRAMFS are not set (`cargo xtask test` builds \
             both and sets them)",
        );
    };
    if !vmm_built() {
        return skip(
            NAME,
            "moat-vmm is not built beside moat (cargo build -p moat-vmm)",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    empty_ext4(&rootfs);
    std::fs::write(
        dir.path().join("current.toml"),
        format!(
            "kernel = {:?}\ninitramfs = {:?}\nrootfs = {:?}\n",
            PathBuf::from(kernel),
            PathBuf::from(initramfs),
            rootfs
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "run",
            "--backend",
            "vm",
            "--boot-log",
            "--mem",
            "256",
            "--vcpus",
            "1",
        ])
        .arg("--audit")
        .arg(dir.path().join("audit.jsonl"))
        .arg("--audit-key")
        .arg(dir.path().join("audit.key"))
        .args(["--", "true"])
        .env("MOAT_IMAGES", dir.path())
        .env("MOAT_LOG", "warn")
        .output()
        .unwrap();
    let (serial, stderr) = (text(&out.stdout), text(&out.stderr));
    let to_init = serial
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .map(str::to_owned);
    eprintln!(
        "moat run --backend vm: {:.1} s wall, `{}`",
        started.elapsed().as_secs_f64(),
        to_init.as_deref().unwrap_or("no Run /init")
    );
    assert!(
        stderr.contains("backend vm (requested with --backend vm; /dev/kvm is nested PVM"),
        "{stderr}"
    );
    // Linux's own drivers found our devices: the root image and the home disk (2 GiB), vsock.
    let disk = |name: &str| {
        serial
            .lines()
            .find(|l| l.contains("virtio_blk virtio") && l.contains(name))
            .map(str::to_owned)
    };
    assert!(
        disk("[vda] 32768 512-byte").is_some(),
        "no root disk in:\n{serial}"
    );
    assert!(
        disk("[vdb] 4194304 512-byte").is_some(),
        "no home disk in:\n{serial}"
    );
    assert!(
        serial.contains("NET: Registered PF_VSOCK protocol family"),
        "{serial}"
    );
    assert!(to_init.is_some(), "the kernel never ran /init:\n{serial}");
    // On this host the first syscall of /init faults, so guest-init never reports: moat says so.
    assert!(
        stderr.contains("stopped before guest-init reported an outcome"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(125), "{stderr}");
}

#[test]
fn full_path_through_the_vm_where_kvm_is_real() {
    const NAME: &str = "full_path_through_the_vm_where_kvm_is_real";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    let ws = Workspace::with_backend("vm", Some(images));
    let started = Instant::now();
    let out = ws.run(&format!(
        "curl -sS {}; echo allowed=$?; curl -sS {} ; echo denied=$?; \
         touch /etc/moat-e2e; echo etc=$?; touch ~/made-inside; echo home=$?; exit 7",
        ws.url("allowed.test", "/hello"),
        ws.url("denied.test", "/hello"),
    ));
    eprintln!(
        "moat run --backend vm (boot, script, poweroff): {:.2} s wall",
        started.elapsed().as_secs_f64()
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("hello from upstream"), "{stdout}\n{stderr}");
    for want in ["allowed=0", "etc=1", "home=0"] {
        assert!(stdout.contains(want), "no {want} in:\n{stdout}\n{stderr}");
    }
    assert!(!stdout.contains("denied=0"), "{stdout}");
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    let audit = ws.audit();
    let opened = audit
        .iter()
        .find(|r| r["class_uid"] == 4001 && r["activity_id"] == 1)
        .expect("an allowed flow in the audit log");
    assert_eq!(opened["dst_endpoint"]["hostname"], "allowed.test");
    assert!(
        ws.reasons().contains(&"no_rule".to_owned()),
        "the denied flow is audited: {:?}",
        ws.reasons()
    );
    assert!(
        audit.iter().any(|r| r["class_uid"] == 1007),
        "guest-init's process events reach the audit log over vsock"
    );
}

/// A VM workspace for scenario `name`, or `None` (after saying why) where the full path
/// cannot run here; inside L1 (`MOAT_EXPECT_REAL_KVM`) that is a failure instead.
fn vm_workspace(name: &str) -> Option<Workspace> {
    vm_images(name).map(|images| Workspace::with_backend("vm", Some(images)))
}

// The scenarios every backend passes (moat/tests/common/scenarios.rs), through the VM: the
// same scripts, programs from the root image, the same egress proxy and audit log.
macro_rules! vm_scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(ws) = vm_workspace(stringify!($name)) {
                    common::scenarios::$name(&ws);
                }
            }
        )*
    };
}
every_backend_scenario!(vm_scenarios);

/// A VM booting a root made from an OCI image (`moat run --backend vm --image`: unpacked, made
/// into an ext4 disk, cached): the agent's programs come from it and reach the network as from
/// the root image.
#[test]
fn a_vm_workspace_boots_its_root_from_an_oci_image() {
    let Some(images) = vm_images("a_vm_workspace_boots_its_root_from_an_oci_image") else {
        return;
    };
    let ws = Workspace::from_oci_image("vm", Some(images));
    common::scenarios::curl_reaches_an_allowed_host_through_the_whole_path(&ws);
    let out = ws.run("head -1 /etc/os-release");
    let stderr = common::text(&out.stderr);
    assert!(
        common::text(&out.stdout).contains("Debian GNU/Linux 12"),
        "{stderr}"
    );
    assert!(
        stderr.contains("moat: root disk ") && stderr.contains("root.ext4"),
        "the VM booted the image's disk: {stderr}"
    );
}
