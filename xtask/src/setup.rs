//! What moat's development needs from the system, in one place.
//!
//! Every xtask verb names the jobs it is about to do ([`Job`]); [`ensure`] checks what those
//! jobs need (Debian packages, programs, the pinned toolchain's rustup targets and components,
//! the Python venv and Node packages the tests use) and installs what is missing:
//!
//! - as root: `apt-get update` once, then one `apt-get install`, each package announced with
//!   the reason it is needed; then the rustup targets, the venvs and the Node packages;
//! - as anyone else: nothing is changed when a system package is missing; xtask stops with the
//!   exact command to run as root (rustup, venvs and npm need no privilege and are installed).
//!
//! The tests themselves never install anything: `cargo xtask test` runs this first, and a test
//! that still finds a program missing fails at once naming it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run_cmd};

/// One job an xtask verb does; each needs some of [`NEEDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// `cargo xtask images kernel`: Debian's kernel source, built with make.
    Kernel,
    /// `cargo xtask images initramfs`: guest-init as a static musl binary.
    Initramfs,
    /// `cargo xtask images rootfs`: the Debian root image of the VM.
    RootImage,
    /// `cargo test --workspace`: the programs the end-to-end tests run for real.
    Tests,
    /// `moat run --backend vm`: the home disk is made with mkfs.ext4.
    VmWorkspace,
    /// `cargo xtask bench`: the peers the egress proxy is measured beside.
    Bench,
    /// `cargo xtask check`: the CI checks beyond fmt and clippy.
    Check,
    /// `cargo xtask l1`: QEMU's emulator booting a Debian L1 with real KVM inside.
    L1,
}

/// How to tell whether a need is met.
#[derive(Clone, Copy, Debug)]
enum Check {
    /// A Debian package is installed.
    Package(&'static str),
    /// A program is on PATH (or at this absolute path).
    Program(&'static str),
    /// The system's python3 imports this module.
    PythonModule(&'static str),
    /// Node.js at this major version or later.
    NodeAtLeast(u32),
}

/// One thing the system must provide.
#[derive(Debug)]
struct Need {
    jobs: &'static [Job],
    check: Check,
    /// The Debian packages that provide it.
    packages: &'static [&'static str],
    why: &'static str,
    /// Install from bookworm-backports when this package is already installed from there
    /// (QEMU's packages must be of one version: our machines carry qemu-utils from backports).
    backports_beside: Option<&'static str>,
}

/// The Debian suite of the backports our machines' QEMU comes from.
const BACKPORTS: &str = "bookworm-backports";

use Job::{Bench, Check as CheckJob, Initramfs, Kernel, L1, RootImage, Tests, VmWorkspace};

const KERNEL_SOURCE: &str = crate::images::KERNEL_PACKAGE;

/// Everything moat's build, tests, images and benchmarks need from a Debian system.
const NEEDS: &[Need] = &[
    Need {
        jobs: &[Kernel],
        check: Check::Package(KERNEL_SOURCE),
        packages: &[KERNEL_SOURCE],
        why: "the guest kernel is built from Debian's kernel source",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("flex"),
        packages: &["flex"],
        why: "the kernel's config and build run flex and bison",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("bison"),
        packages: &["bison"],
        why: "the kernel's config and build run flex and bison",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Package("libelf-dev"),
        packages: &["libelf-dev"],
        why: "the kernel's objtool reads ELF with libelf",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("bc"),
        packages: &["bc"],
        why: "the kernel build computes constants with bc",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("xz"),
        packages: &["xz-utils"],
        why: "the kernel source comes as a .tar.xz",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("make"),
        packages: &["make"],
        why: "the kernel is built with make",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel, Tests],
        check: Check::Program("gcc"),
        packages: &["gcc"],
        why: "the kernel and C parts of crates are compiled with gcc",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("patch"),
        packages: &["patch"],
        why: "our kernel patches are applied with patch",
        backports_beside: None,
    },
    Need {
        jobs: &[Kernel],
        check: Check::Program("lz4"),
        packages: &["lz4"],
        why: "the kernel build compresses with lz4",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests, VmWorkspace, RootImage],
        check: Check::Program("mkfs.ext4"),
        packages: &["e2fsprogs"],
        why: "the VM's root image and home disk are ext4 file systems",
        backports_beside: None,
    },
    Need {
        jobs: &[RootImage],
        check: Check::Program("mmdebstrap"),
        packages: &["mmdebstrap"],
        why: "the workspace's root image (the VM's root disk, and the namespace backend's \
              root) is a Debian made by mmdebstrap",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::Program("curl"),
        packages: &["curl"],
        why: "the end-to-end tests run curl inside the workspace",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::Program("git"),
        packages: &["git"],
        why: "the end-to-end tests clone with git inside the workspace",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests, Bench],
        check: Check::Program("ctr"),
        packages: &["containerd"],
        why: "the containerd shim's tests start a containerd of their own and drive it with ctr",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests, Bench],
        check: Check::Package("containernetworking-plugins"),
        packages: &["containernetworking-plugins"],
        why: "containerd's CRI sets up every pod's network namespace through CNI: the shim's CRI \
              test and `cargo xtask bench k8s` give it a loopback-only network",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::Program("pgrep"),
        packages: &["procps"],
        why: "the end-to-end tests look at the workspace's processes with ps and pgrep",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::PythonModule("requests"),
        packages: &["python3", "python3-requests"],
        why: "the end-to-end tests run Python requests inside the workspace",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests, Bench, CheckJob],
        check: Check::PythonModule("ensurepip"),
        packages: &["python3-venv"],
        why: "the OCSF validator and the CRI client (tests), mitmproxy (bench) and the \
              Kubernetes manifest validator (check) live in Python venvs",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::NodeAtLeast(20),
        packages: &["nodejs", "npm"],
        why: "the broker tests sign in at a real OpenID Connect provider (Node 20 or later)",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::Program("/usr/sbin/sshd"),
        packages: &["openssh-server"],
        why: "SSH sessions into the workspace run OpenSSH's sshd",
        backports_beside: None,
    },
    Need {
        jobs: &[Tests],
        check: Check::Program("ssh"),
        packages: &["openssh-client"],
        why: "the broker tests connect with OpenSSH's ssh",
        backports_beside: None,
    },
    Need {
        jobs: &[Bench],
        check: Check::Program("nginx"),
        packages: &["nginx-light"],
        why: "the benchmarks' upstream is nginx",
        backports_beside: None,
    },
    Need {
        jobs: &[Bench],
        check: Check::Program("squid"),
        packages: &["squid-openssl"],
        why: "the egress proxy is measured beside squid",
        backports_beside: None,
    },
    Need {
        jobs: &[L1],
        check: Check::Program("qemu-system-x86_64"),
        packages: &["qemu-system-x86"],
        why: "the L1 with real KVM runs in QEMU's emulator",
        backports_beside: Some("qemu-utils"),
    },
    Need {
        jobs: &[L1],
        check: Check::Program("/bin/busybox"),
        packages: &["busybox-static"],
        why: "the L1's initramfs is a static busybox",
        backports_beside: None,
    },
    Need {
        jobs: &[L1],
        check: Check::Program("dpkg-deb"),
        packages: &["dpkg"],
        why: "the L1's Debian kernel package is unpacked with dpkg-deb",
        backports_beside: None,
    },
];

/// Rustup targets of the pinned toolchain, by job.
const TARGETS: &[(Job, &str, &str)] = &[
    (
        Initramfs,
        crate::images::GUEST_TARGET,
        "guest-init is a static musl binary",
    ),
    (
        Tests,
        "x86_64-unknown-none",
        "moat-vmm's probe guest is a no_std ELF",
    ),
    (
        Bench,
        "x86_64-unknown-none",
        "moat-vmm's probe guest is a no_std ELF",
    ),
];

/// Cargo subcommands installed from crates.io for `cargo xtask check` and `cargo xtask fuzz`,
/// pinned: (crate, version, why).
pub(crate) const CARGO_TOOLS: &[(&str, &str, &str)] = &[
    (
        "cargo-deny",
        "0.20.2",
        "licences, banned crates and sources",
    ),
    ("cargo-machete", "0.9.2", "dependencies nobody uses"),
    (
        "cargo-fuzz",
        "0.13.2",
        "building and running the fuzz targets",
    ),
];

/// The toolchain rust-toolchain.toml pins; every nested cargo runs with it.
pub(crate) fn toolchain() -> Result<String> {
    let path = root().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let parsed: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    parsed
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{} names no toolchain.channel", path.display()))
}

/// A cargo of the pinned toolchain, whatever rustup's default is, without the variables
/// `cargo run` gave xtask itself (cargo-machete, for one, reads CARGO_PKG_NAME as a sign that
/// it runs under `cargo run`, and then takes its own name for a path).
pub(crate) fn cargo() -> Command {
    let mut cmd = match (which("rustup"), toolchain()) {
        (Some(rustup), Ok(channel)) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", &channel, "cargo"]);
            cmd
        }
        // No rustup (a distribution's Rust): the cargo that built xtask.
        _ => Command::new(env!("CARGO")),
    };
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                &*key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

/// Finds a program on PATH (or checks an absolute path).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    if program.starts_with('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn met(check: Check) -> bool {
    match check {
        Check::Package(p) => package_installed(p),
        Check::Program(p) => which(p).is_some(),
        Check::PythonModule(m) => Command::new("/usr/bin/python3")
            .args(["-c", &format!("import {m}")])
            .output()
            .is_ok_and(|o| o.status.success()),
        Check::NodeAtLeast(major) => {
            node_major().is_some_and(|v| v >= major) && which("npm").is_some()
        }
    }
}

/// Whether xtask runs as root (effective uid 0, from /proc: no libc call needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn installed_targets(channel: &str) -> BTreeSet<String> {
    Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", channel])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Makes sure everything `jobs` need is installed (see the module's documentation).
pub(crate) fn ensure(jobs: &[Job]) -> Result<()> {
    let wanted = |needs: &[Job]| needs.iter().any(|j| jobs.contains(j));
    let missing: Vec<&Need> = NEEDS
        .iter()
        .filter(|n| wanted(n.jobs) && !met(n.check))
        .collect();
    // Each package once, in two groups: Debian's release, and backports where the machine's
    // own packages of that family came from there.
    let (mut packages, mut from_backports): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for need in &missing {
        let group = match need.backports_beside {
            Some(beside) if installed_from_backports(beside) => &mut from_backports,
            _ => &mut packages,
        };
        for p in need.packages {
            if !group.contains(p) {
                group.push(p);
            }
        }
    }
    let channel = toolchain()?;
    let rustup = which("rustup");
    let targets: BTreeSet<&str> = if rustup.is_some() {
        let have = installed_targets(&channel);
        TARGETS
            .iter()
            .filter(|(job, t, _)| jobs.contains(job) && !have.contains(*t))
            .map(|(_, t, _)| *t)
            .collect()
    } else {
        BTreeSet::new()
    };

    if !packages.is_empty() || !from_backports.is_empty() {
        if !is_root() {
            let mut commands = Vec::new();
            if !packages.is_empty() {
                commands.push(format!("sudo apt-get install -y {}", packages.join(" ")));
            }
            if !from_backports.is_empty() {
                commands.push(format!(
                    "sudo apt-get install -y -t {BACKPORTS} {} (with {BACKPORTS} among apt's \
                     sources)",
                    from_backports.join(" ")
                ));
            }
            let mut todo = commands.join(" && ");
            if !targets.is_empty() {
                let list: Vec<&str> = targets.iter().copied().collect();
                todo.push_str(&format!(
                    " && rustup target add --toolchain {channel} {}",
                    list.join(" ")
                ));
            }
            let whys: Vec<String> = missing
                .iter()
                .map(|n| format!("{} ({})", n.packages.join(", "), n.why))
                .collect();
            bail!(
                "this needs Debian packages that are not installed: {}. Nothing was changed; \
                 install them as root, then run this again: {todo}",
                whys.join("; ")
            );
        }
        for need in &missing {
            eprintln!(
                "xtask setup: installing {}: {}",
                need.packages.join(" "),
                need.why
            );
        }
        apt_install(&packages, &from_backports)?;
        let still: Vec<String> = missing
            .iter()
            .filter(|n| !met(n.check))
            .map(|n| describe_check(n.check))
            .collect();
        if !still.is_empty() {
            bail!(
                "after installing {} this machine still lacks {}: its Debian release may not \
                 provide them (Node 20 or later, for example, comes from nodejs.org or \
                 NodeSource on Debian 12)",
                [&packages[..], &from_backports[..]].concat().join(" "),
                still.join(", ")
            );
        }
    }
    if let Some(rustup) = rustup {
        for target in &targets {
            let why = TARGETS
                .iter()
                .find(|(_, t, _)| t == target)
                .map_or("", |(_, _, why)| *why);
            eprintln!("xtask setup: adding rustup target {target} to {channel}: {why}");
            run_cmd(Command::new(&rustup).args([
                "target",
                "add",
                "--toolchain",
                &channel,
                target,
            ]))?;
        }
    } else if jobs.iter().any(|j| matches!(j, Initramfs | Tests | Bench)) {
        eprintln!(
            "xtask setup: rustup is not installed; make sure your toolchain has the targets {} \
             and x86_64-unknown-none",
            crate::images::GUEST_TARGET
        );
    }
    if jobs.contains(&CheckJob) {
        for (krate, version, why) in CARGO_TOOLS {
            cargo_tool(krate, version, why)?;
        }
    }
    Ok(())
}

fn describe_check(check: Check) -> String {
    match check {
        Check::Package(p) => format!("the package {p}"),
        Check::Program(p) => format!("the program {p}"),
        Check::PythonModule(m) => format!("python3's module {m}"),
        Check::NodeAtLeast(v) => format!("Node.js {v} or later with npm"),
    }
}

/// Whether `package` is installed at a version from Debian's backports.
fn installed_from_backports(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", package])
        .output()
        .is_ok_and(|o| {
            let out = String::from_utf8_lossy(&o.stdout);
            out.contains("install ok installed") && out.contains("~bpo")
        })
}

/// Adds Debian's bookworm-backports to apt's sources unless some source already has it.
fn ensure_backports_source() -> Result<bool> {
    let dir = Path::new("/etc/apt/sources.list.d");
    let mentions = |path: &Path| {
        std::fs::read_to_string(path).is_ok_and(|t| {
            t.lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains(BACKPORTS))
        })
    };
    let listed = mentions(Path::new("/etc/apt/sources.list"))
        || std::fs::read_dir(dir)
            .is_ok_and(|d| d.filter_map(Result::ok).any(|e| mentions(&e.path())));
    if listed {
        return Ok(false);
    }
    let path = dir.join("moat-backports.sources");
    eprintln!(
        "xtask setup: adding Debian's {BACKPORTS} to apt's sources ({}): this machine's QEMU \
         packages come from there, and QEMU's packages must be of one version",
        path.display()
    );
    std::fs::write(
        &path,
        format!(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {BACKPORTS}\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// `apt-get update` once, then one install of every missing package (and one from backports).
fn apt_install(packages: &[&str], from_backports: &[&str]) -> Result<()> {
    if !from_backports.is_empty() {
        ensure_backports_source()?;
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .args(["-q", "-o", "DPkg::Lock::Timeout=600"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_cmd(&mut apt(&["update"]))?;
    let install = ["install", "-y", "--no-install-recommends"];
    if !packages.is_empty() {
        run_cmd(apt(&install).args(packages))?;
    }
    if !from_backports.is_empty() {
        run_cmd(apt(&install).args(["-t", BACKPORTS]).args(from_backports))?;
    }
    Ok(())
}

/// Installs a cargo subcommand at its pinned version unless that version is there.
pub(crate) fn cargo_tool(krate: &str, version: &str, why: &str) -> Result<()> {
    let sub = krate.trim_start_matches("cargo-");
    let have = cargo()
        .args([sub, "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version));
    if have {
        return Ok(());
    }
    eprintln!("xtask setup: installing {krate} {version} from crates.io: {why}");
    run_cmd(cargo().args([
        "install",
        "--locked",
        "--quiet",
        krate,
        "--version",
        version,
    ]))
}

/// The OCSF validator the egress tests use (Python packages pinned in
/// audit/ocsf/requirements.txt), in `.venv-ocsf`; returns its python.
pub(crate) fn ocsf_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-ocsf",
        "audit/ocsf/requirements.txt",
        "python3",
        "the OCSF validator: the tests validate every audit record against the published schema",
    )
}

/// The OTLP receiver the audit export tests send to (the official `opentelemetry-proto`
/// definitions from PyPI, pinned in audit/otlp/requirements.txt), in `.venv-otlp`; returns its
/// python.
pub(crate) fn otlp_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-otlp",
        "audit/otlp/requirements.txt",
        "python3",
        "the OTLP receiver: audit export is tested against the official protobuf definitions",
    )
}

/// The MCP server and client the namespace end-to-end tests run (the Python `mcp` SDK, pinned
/// with its dependencies in moat/tests/mcp/requirements.txt), in `.venv-mcp`; returns its
/// python. Made from /usr/bin/python3 (the system's, also the root image's), never a python
/// under /root or /home: the workspace runs this venv under `--host-root`, where those are
/// masked.
pub(crate) fn mcp_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-mcp",
        "moat/tests/mcp/requirements.txt",
        "/usr/bin/python3",
        "the MCP SDK: MCP rules are tested with a real MCP server and client",
    )
}

/// The Kubernetes manifest validator `cargo xtask check` runs (kubernetes-validate and
/// jsonschema, pinned in deploy/kubernetes/check/requirements.txt), in `.venv-manifests`;
/// returns its python.
pub(crate) fn manifests_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-manifests",
        "deploy/kubernetes/check/requirements.txt",
        "python3",
        "the Kubernetes manifest validator: deploy/kubernetes is checked against pinned schemas",
    )
}

/// The CRI client the shim's CRI test and `cargo xtask bench k8s` speak to containerd with
/// (grpcio and grpcio-tools, pinned in shim/tests/cri/requirements.txt), in `.venv-cri`;
/// returns its python.
pub(crate) fn cri_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-cri",
        "shim/tests/cri/requirements.txt",
        "python3",
        "a CRI client: the shim is tested through containerd's CRI, the kubelet's path",
    )
}

/// The agent's OpenAI client in the local inference tests (the `openai` package, pinned with
/// its dependencies in moat/tests/inference/requirements.txt), in `.venv-openai`; returns its
/// python. Made from /usr/bin/python3 for the same reason as [`mcp_venv`].
pub(crate) fn openai_venv() -> Result<PathBuf> {
    pinned_venv(
        ".venv-openai",
        "moat/tests/inference/requirements.txt",
        "/usr/bin/python3",
        "the openai client: local inference is tested with the real OpenAI client",
    )
}

/// The venv `dir` (under the repository) made by `python` with the pinned `requirements`
/// installed, redone only when the requirements file changed (a stamp in the venv holds the
/// one installed); returns the venv's python.
fn pinned_venv(dir: &str, requirements: &str, python: &str, what: &str) -> Result<PathBuf> {
    let root = root();
    let venv = root.join(dir);
    let venv_python = venv.join("bin/python");
    let reqs = root.join(requirements);
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&reqs)?;
    if venv_python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(venv_python);
    }
    eprintln!("xtask setup: installing {what}, into {}", venv.display());
    run_cmd(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    run_cmd(
        Command::new(&venv_python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&reqs),
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(venv_python)
}

/// The broker tests' OpenID Connect provider (npm, pinned by its package-lock.json), in
/// broker/tests/oidc/node_modules.
pub(crate) fn oidc_provider() -> Result<()> {
    let dir = root().join("broker/tests/oidc");
    let lock = std::fs::read(dir.join("package-lock.json"))?;
    let stamp = dir.join("node_modules/.moat-installed-lock");
    if std::fs::read(&stamp).ok().as_deref() == Some(&lock[..]) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing the test OpenID Connect provider into {}: the broker tests \
         sign in at a real provider",
        dir.display()
    );
    run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir),
    )?;
    std::fs::write(&stamp, lock)?;
    Ok(())
}

/// mitmproxy from PyPI in `.venv-bench` (the interception benchmark's peer); returns mitmdump.
pub(crate) fn mitmdump() -> Result<PathBuf> {
    let venv = root().join(".venv-bench");
    let bin = venv.join("bin/mitmdump");
    if !bin.exists() {
        eprintln!(
            "xtask setup: installing mitmproxy into {}: interception is measured beside it",
            venv.display()
        );
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_cmd(Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "mitmproxy",
        ]))?;
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_that_needs_a_package_names_why() {
        for need in NEEDS {
            assert!(!need.packages.is_empty(), "{need:?}");
            assert!(!need.jobs.is_empty(), "{need:?}");
            assert!(need.why.len() > 10, "{need:?}");
        }
    }

    #[test]
    fn the_pinned_toolchain_is_read_from_rust_toolchain_toml() {
        let channel = toolchain().unwrap();
        let text = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
        assert!(
            text.contains(&format!("channel = \"{channel}\"")),
            "{channel}"
        );
    }

    #[test]
    fn which_finds_absolute_and_path_programs() {
        assert!(which("sh").is_some());
        assert!(which("/bin/sh").is_some());
        assert!(which("moat-no-such-program").is_none());
        assert!(which("/nonexistent/moat").is_none());
    }
}
