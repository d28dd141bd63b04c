//! `cargo xtask test`: make sure the test tools and the guest images exist, then run every
//! test in the workspace.
//!
//! The egress tests validate audit records with a published OCSF validator (Python packages
//! pinned in egress/tests/ocsf/requirements.txt), installed into `.venv-ocsf` at the root. The
//! broker's end-to-end tests sign in at a real OIDC provider, installed from npm into
//! broker/tests/oidc/node_modules.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::{root, run_cmd};

/// Creates `.venv-ocsf` with the pinned validator if it is missing or stale; returns its python.
pub(crate) fn ocsf_venv() -> Result<PathBuf> {
    let root = root();
    let venv = root.join(".venv-ocsf");
    let python = venv.join("bin/python");
    let reqs = root.join("egress/tests/ocsf/requirements.txt");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&reqs)?;
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing the OCSF validator into {}",
        venv.display()
    );
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(
        Command::new(&python)
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
    Ok(python)
}

/// Installs the broker tests' OpenID Connect provider (npm, pinned by its package-lock.json)
/// into broker/tests/oidc/node_modules if it is missing.
pub(crate) fn oidc_provider() -> Result<()> {
    let dir = root().join("broker/tests/oidc");
    if dir.join("node_modules/oidc-provider").exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the test OIDC provider into {}",
        dir.display()
    );
    run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir),
    )
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let python = ocsf_venv()?;
    oidc_provider()?;
    // The Linux boot tests (moat-vmm's, and the vm backend's) boot our kernel and initramfs:
    // built here, or found in the cache (the first build takes about 8 minutes on 2 cores).
    let kernel = crate::images::kernel()?;
    let gpu_kernel = crate::images::kernel_gpu()?;
    let initramfs = crate::images::initramfs()?;
    let env = [
        ("MOAT_OCSF_PYTHON", python),
        ("MOAT_LINUX_KERNEL", kernel.vmlinux),
        ("MOAT_LINUX_BZIMAGE", kernel.bzimage),
        ("MOAT_LINUX_INITRAMFS", initramfs),
        ("MOAT_LINUX_PCI_KERNEL", gpu_kernel.vmlinux),
    ];
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(root())
            .args(["test", "--workspace", "--locked"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v))),
    )?;
    // Where /dev/kvm cannot run a guest's user space, the VM tests run again inside L1.
    crate::l1::run_vm_tests(&env)
}
