//! The binary's refusals: bad flags and configs exit with code 2 before touching KVM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn vmm(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_kernel_exits_2() {
    let (code, err) = vmm(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no kernel given"), "{err}");
}

#[test]
fn unknown_config_field_exits_2() {
    let dir = std::env::temp_dir().join(format!("moat-vmm-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.toml");
    std::fs::write(&cfg, "kernel = \"/nonexistent\"\nmemory_size = 3\n").unwrap();
    let (code, err) = vmm(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn reserved_guest_cid_exits_2() {
    let (code, _) = vmm(&[
        "--kernel",
        "/k",
        "--vsock-uds",
        "/tmp/x.sock",
        "--vsock-cid",
        "2",
    ]);
    assert_eq!(code, Some(2));
}

#[test]
fn missing_kernel_file_exits_1() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot open kernel"), "{err}");
}

#[test]
fn a_malformed_gpu_address_exits_2() {
    let (code, err) = vmm(&["--kernel", "/k", "--gpu", "41:00"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a PCI address"), "{err}");
}

#[test]
fn a_gpu_missing_from_the_host_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("moat-vmm-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("k");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    let (code, err) = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--gpu",
        "00ff:1f:1f.7",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no PCI device 00ff:1f:1f.7 on this host"),
        "{err}"
    );
}
