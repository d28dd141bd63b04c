//! Which KVM this host has. `kvm_intel` and `kvm_amd` use hardware virtualisation; `kvm_pvm` is
//! nested PVM (a guest kernel under a host without VT-x/AMD-V in a cloud VM), where guest
//! kernel code is emulated and a Linux guest's user space cannot run, and which needs CPUID and
//! kernel command-line workarounds (moat-vmm's `cpuid.rs`). The loaded module is what tells
//! them apart: `/sys/module/<name>`.

use std::path::Path;

/// What provides `/dev/kvm` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// No `/dev/kvm`.
    Absent,
    /// Hardware virtualisation, Intel VT-x (`kvm_intel`).
    Intel,
    /// Hardware virtualisation, AMD-V (`kvm_amd`).
    Amd,
    /// Nested PVM (`kvm_pvm`): a guest's kernel boots, its user space cannot run. Wins over a
    /// hardware module loaded beside it, as `/dev/kvm` is then PVM's.
    NestedPvm,
    /// `/dev/kvm` exists, but none of the modules above is loaded.
    Unknown,
}

impl KvmFlavour {
    /// Whether a guest's user space runs: hardware virtualisation.
    pub fn is_hardware(self) -> bool {
        matches!(self, Self::Intel | Self::Amd)
    }
}

/// This host's KVM flavour (`/sys`, `/dev`).
pub fn kvm_flavour() -> KvmFlavour {
    kvm_flavour_at(Path::new("/sys"), Path::new("/dev"))
}

/// The KVM flavour of the host whose sysfs is at `sys` and devfs at `dev`.
pub fn kvm_flavour_at(sys: &Path, dev: &Path) -> KvmFlavour {
    let module = |m: &str| sys.join("module").join(m).exists();
    if !dev.join("kvm").exists() {
        KvmFlavour::Absent
    } else if module("kvm_pvm") {
        KvmFlavour::NestedPvm
    } else if module("kvm_intel") {
        KvmFlavour::Intel
    } else if module("kvm_amd") {
        KvmFlavour::Amd
    } else {
        KvmFlavour::Unknown
    }
}

/// Whether this user may open `/dev/kvm` for reading and writing, as a VMM must.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaded_module_names_the_flavour_and_pvm_wins() {
        let root = std::env::temp_dir().join(format!("moat-kvm-flavour-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(sys.join("module")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        let flavour = || kvm_flavour_at(&sys, &dev);
        std::fs::create_dir_all(sys.join("module/kvm_amd")).unwrap();
        assert_eq!(flavour(), KvmFlavour::Absent);
        std::fs::write(dev.join("kvm"), "").unwrap();
        assert_eq!(flavour(), KvmFlavour::Amd);
        assert!(flavour().is_hardware());
        std::fs::create_dir_all(sys.join("module/kvm_pvm")).unwrap();
        assert_eq!(flavour(), KvmFlavour::NestedPvm);
        assert!(!flavour().is_hardware());
        std::fs::remove_dir(sys.join("module/kvm_pvm")).unwrap();
        std::fs::remove_dir(sys.join("module/kvm_amd")).unwrap();
        assert_eq!(flavour(), KvmFlavour::Unknown);
        std::fs::create_dir_all(sys.join("module/kvm_intel")).unwrap();
        assert_eq!(flavour(), KvmFlavour::Intel);
        let _ = std::fs::remove_dir_all(&root);
    }
}
