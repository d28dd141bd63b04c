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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args([
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
    .env("MOAT_LOG", "warn");
    let out = common::deadline::output_within(
        &mut cmd,
        "moat run --backend vm (boot to /init)",
        common::deadline::RUN_DEADLINE,
        &String::new,
    );
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

/// `--backend auto` (the default) where KVM is real runs a VM, unless the run names an option
/// only the namespace backend takes (a Kubernetes pod's own root is `--rootfs`): then the
/// namespace backend, saying why, rather than a VM refusing the option.
#[test]
fn auto_runs_a_vm_where_kvm_is_real_unless_an_option_is_the_namespace_backends() {
    const NAME: &str =
        "auto_runs_a_vm_where_kvm_is_real_unless_an_option_is_the_namespace_backends";
    let Some(images) = vm_images(NAME) else {
        return;
    };
    let ws = Workspace::with_backend("auto", Some(images.clone()));
    let out = ws.output(ws.moat_run().args(["--", "true"]), "moat run (auto)");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("moat: backend vm (/dev/kvm has hardware virtualization)"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // The root image's tree, as a pod's container root would be.
    let current = std::fs::read_to_string(images.join("current.toml")).unwrap();
    let root = current
        .lines()
        .find_map(|l| l.strip_prefix("rootfs_dir = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("current.toml names the root image's tree");
    let out = ws.output(
        ws.moat_run()
            .arg("--rootfs")
            .arg(&root)
            .args(["--", "true"]),
        "moat run --rootfs (auto)",
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "moat: backend namespace (/dev/kvm has hardware virtualization, but --rootfs \
             is the namespace backend's)"
        ),
        "{stderr}"
    );
    // Its exit is not judged: inside L1 the host's root is read-only, where a namespace
    // workspace run as root records its uid range (/var/lib/moat); the namespace backend's
    // own tests run on the host.
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

/// Workspace services in the VM (inside L1, where KVM is real): the stand-in model server
/// runs as its own uid beside the agent, with a device the agent no longer sees (a stand-in:
/// the guest's /dev/kmsg, no GPU in L1); the agent's probe is refused everything but the port
/// and the policy's name, where the real OpenAI client (from the home disk) gets its
/// completion.
#[test]
fn a_vm_workspace_runs_a_model_server_beside_the_agent_out_of_its_reach() {
    use common::services::{
        HELLO_ANSWER, LOCAL_ROUTE, PORT, inference_dir, openai_chat, openai_python,
    };
    const NAME: &str = "a_vm_workspace_runs_a_model_server_beside_the_agent_out_of_its_reach";
    let Some(ws) = vm_workspace(NAME) else {
        return;
    };
    let mut ws = ws.with_rules(LOCAL_ROUTE);
    // The agent's openai client: the venv's packages on a home disk of the agent's.
    let python = openai_python();
    let site = python
        .parent()
        .unwrap()
        .join("../lib/python3.11/site-packages");
    let home = ws.dir.path().join("home-disk");
    std::fs::create_dir_all(&home).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(&site)
        .arg(home.join("site"))
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(&home)
        .status()
        .unwrap();
    assert!(st.success());
    let disk = ws.dir.path().join("home.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=1000:1000", "-d"])
        .arg(&home)
        .arg(&disk)
        .arg("512M")
        .status()
        .unwrap();
    assert!(st.success());
    // The server as `python3 -c` (nothing of ours is in the root image), after it says what
    // it sees: its uid and its device.
    let source = std::fs::read_to_string(inference_dir().join("server.py")).unwrap();
    let model = std::fs::read_to_string(inference_dir().join("model.json")).unwrap();
    let services = ws.dir.path().join("services.toml");
    std::fs::write(
        &services,
        format!(
            "[[service]]\nname = \"llm\"\nport = {PORT}\ndevices = [\"/dev/kmsg\"]\n\
             command = [\"sh\", \"-c\", '''{{ echo svc-uid=$(id -u); [ -c /dev/kmsg ] && \
             echo svc-device=yes; echo svc-pid=$$; }} >&2; exec python3 -c \"$0\" {PORT} \"$1\"''', \
             '''{source}''', '''{}''']\n",
            model.replace('\n', " ")
        ),
    )
    .unwrap();
    let probe = std::fs::read(inference_dir().join("probe.py")).unwrap();
    let hex: String = probe.iter().map(|b| format!("{b:02x}")).collect();
    let site_python = Path::new("/usr/bin/python3");
    let script = format!(
        "python3 -c \"exec(bytes.fromhex('{hex}').decode())\" llm '\"\"\"A minimal OpenAI'; \
         echo device_in_dev=$(test -e /dev/kmsg && echo yes || echo no); \
         export PYTHONPATH=$HOME/site; echo routed=$({}); echo port=$({})",
        openai_chat(site_python, "http://inference.local/v1"),
        openai_chat(site_python, &format!("http://127.0.0.1:{PORT}/v1")),
    );
    ws.args = vec![
        "--services".into(),
        services.into(),
        "--home-disk".into(),
        disk.into(),
    ];
    let out = ws.run(&script);
    let (console, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{console}{stderr}");
    assert!(console.contains("svc-uid=900"), "{console}");
    assert!(console.contains("svc-device=yes"), "{console}");
    assert!(
        console.contains("svc-pid=2"),
        "alone under its init: {console}"
    );
    assert!(console.contains("device_in_dev=no"), "{console}");
    assert!(
        console.contains(&format!("routed={HELLO_ANSWER}")),
        "{console}{stderr}"
    );
    assert!(
        console.contains(&format!("port={HELLO_ANSWER}")),
        "{console}"
    );
    let answer: serde_json::Value = console
        .lines()
        .find_map(|l| {
            serde_json::from_str(l.trim())
                .ok()
                .filter(|v: &serde_json::Value| v.is_object())
        })
        .unwrap_or_else(|| panic!("no probe answer in {console}"));
    eprintln!("the probe in the VM: {answer}");
    assert!(answer["pid"].is_u64(), "{answer}");
    for what in [
        "ptrace",
        "signal",
        "mem",
        "environ",
        "maps",
        "proc_root",
        "models_dir",
        "device",
        "services_dir",
    ] {
        assert_ne!(answer[what], "allowed", "the agent did {what}: {answer}");
        assert!(answer[what].is_string(), "{what}: {answer}");
    }
    let records: Vec<serde_json::Value> = ws
        .audit()
        .into_iter()
        .filter(|r| r["unmapped"]["moat"]["service"] == "llm")
        .collect();
    assert_eq!(records.len(), 2, "its launch and its end: {records:#?}");
}
