//! `cargo xtask run-vm [-- command]`: build whatever is missing (moat, moat-vmm, the kernel,
//! the initramfs, the root image), then `moat run --backend vm` with the development policy:
//! an interactive shell in the workspace VM on this terminal, or `command` with its exit
//! status.

use anyhow::Result;

const HELP: &str = "usage: cargo xtask run-vm [-- COMMAND [ARGS...]]

Builds what the workspace VM needs and is missing (moat, moat-vmm, the guest kernel, the
initramfs, the Debian root image: about 10 minutes the first time, cached after), then runs
`moat run --backend vm` with the development policy (policy/dev): an interactive shell in
the VM on this terminal, or COMMAND, whose exit status becomes this command's.

Needs /dev/kvm with hardware virtualization (kvm_intel or kvm_amd). Where /dev/kvm is nested
PVM, run it inside an L1 with real KVM: cargo xtask l1 -- cargo xtask run-vm -- COMMAND";

pub(crate) fn run(args: &[String]) -> Result<()> {
    crate::run::launch(args, HELP, true, Some("vm"))
}
