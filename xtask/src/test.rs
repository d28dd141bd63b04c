//! `cargo xtask test`: set up what the tests need (system packages, rustup targets, the OCSF
//! validator's venv, the MCP SDK's, the CRI client's and the OpenAI client's venvs, the test
//! OpenID Connect provider: `setup.rs`), build or find the guest images, then run every test
//! in the workspace.

use anyhow::Result;

use crate::setup::{self, Job};
use crate::{root, run_cmd};

pub(crate) fn run(args: &[String]) -> Result<()> {
    setup::ensure(&[Job::Tests, Job::Kernel, Job::Initramfs, Job::RootImage])?;
    let python = setup::ocsf_venv()?;
    let mcp_python = setup::mcp_venv()?;
    let cri_python = setup::cri_venv()?;
    let openai_python = setup::openai_venv()?;
    let otlp_python = setup::otlp_venv()?;
    setup::oidc_provider()?;
    // The Linux boot tests (moat-vmm's, and the vm backend's) boot our kernel and initramfs:
    // built here, or found in the cache (the first build takes about 8 minutes on 2 cores).
    let kernel = crate::images::kernel()?;
    let gpu_kernel = crate::images::kernel_gpu()?;
    let initramfs = crate::images::initramfs()?;
    // The namespace backend's workspaces run on the root image (as a directory): built here,
    // or found in the cache, and named in current.toml where `moat run` finds it.
    crate::images::run(&["rootfs".to_owned()])?;
    // The same tree as an OCI archive: the workspaces started from an image (`--image`).
    let oci = crate::images::oci()?;
    let env = [
        ("MOAT_OCSF_PYTHON", python),
        ("MOAT_MCP_PYTHON", mcp_python),
        ("MOAT_CRI_PYTHON", cri_python),
        ("MOAT_OPENAI_PYTHON", openai_python),
        ("MOAT_OTLP_PYTHON", otlp_python),
        ("MOAT_LINUX_KERNEL", kernel.vmlinux),
        ("MOAT_LINUX_BZIMAGE", kernel.bzimage),
        ("MOAT_LINUX_INITRAMFS", initramfs),
        ("MOAT_LINUX_PCI_KERNEL", gpu_kernel.vmlinux),
        ("MOAT_OCI_IMAGE", oci),
    ];
    // Every test binary runs even when one fails: a failure never hides the rest, and the VM
    // tests in L1 run whatever happened on the host.
    let host = run_cmd(
        setup::cargo()
            .current_dir(root())
            .args(["test", "--workspace", "--locked", "--no-fail-fast"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v))),
    );
    // Where /dev/kvm cannot run a guest's user space, the VM tests run again inside L1.
    let vm = crate::l1::run_vm_tests(&env);
    match (host, vm) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(host), Err(vm)) => anyhow::bail!("{host:#}; and inside L1: {vm:#}"),
    }
}
