//! `moat-guest-init`: `/init` of the workspace VM's initramfs (a static musl binary, built by
//! `cargo xtask images initramfs`). The namespace backend does not use this binary: it runs
//! the same library as `moat __guest-init`.

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "moat-guest-init is PID 1 of a moat workspace VM and runs nowhere else \
             (the namespace backend is `moat run --backend namespace`)"
        );
        std::process::exit(2);
    }
    moat_guest_init::run_vm()
}
