//! `moat doctor`: can this host run workspace VMs, and pass the named GPUs through?
//!
//! Every check reads host facts gathered once ([`Facts`]) from a sysfs root, a proc root and a
//! dev root, so the decisions are unit-tested against fake trees. Each check prints what it
//! found and, when something is wrong, what to do about it. The exit status is non-zero when a
//! requested GPU cannot work; everything else is advice.
//!
//! The probes themselves (KVM flavour, Landlock ABI, IOMMU groups) are moat-host-probe's, the
//! same the VMM and `moat run` use; this module only judges what they find.

use std::path::PathBuf;
use std::process::ExitCode;

use moat_host_probe::KvmFlavour;
use moat_host_probe::pci::{self as sysfs, PciAddress};

/// Arguments of `moat doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// A GPU (PCI address, `0000:41:00.0`) to check for VFIO passthrough (repeatable).
    #[arg(long = "gpu", value_name = "PCI_ADDRESS")]
    gpu: Vec<PciAddress>,
    /// Guest memory the VM will have, in MiB (all of it is pinned for device DMA).
    #[arg(long, default_value_t = 4096)]
    mem: u64,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// A requested GPU cannot work.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do about it.
    pub fix: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, found: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            found: found.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// The host facts the checks decide from.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Root of sysfs (`/sys`).
    pub sys: PathBuf,
    /// Root of devfs (`/dev`).
    pub dev: PathBuf,
    /// `/proc/self/limits`, as text.
    pub limits: String,
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: u32,
}

impl Facts {
    /// This host's facts.
    pub fn gather() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            limits: std::fs::read_to_string("/proc/self/limits").unwrap_or_default(),
            landlock_abi: moat_host_probe::landlock_abi(),
        }
    }
}

/// The soft RLIMIT_MEMLOCK in bytes from `/proc/self/limits` text; `None` for unlimited.
pub fn memlock_limit(limits: &str) -> Option<Option<u64>> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let soft = line
        .trim_start_matches("Max locked memory")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(None);
    }
    soft.parse().ok().map(Some)
}

/// Hardware KVM, nested PVM, or none.
pub fn kvm_flavour(f: &Facts) -> Check {
    let name = "KVM";
    match moat_host_probe::kvm::kvm_flavour_at(&f.sys, &f.dev) {
        KvmFlavour::Absent => Check::new(
            name,
            Status::Warn,
            "no /dev/kvm: only the namespace backend runs",
        )
        .fix("enable VT-x/AMD-V in firmware and load kvm_intel or kvm_amd"),
        KvmFlavour::Intel => Check::new(
            name,
            Status::Ok,
            "hardware virtualisation (kvm_intel, VT-x)",
        ),
        KvmFlavour::Amd => Check::new(name, Status::Ok, "hardware virtualisation (kvm_amd, AMD-V)"),
        KvmFlavour::NestedPvm => Check::new(
            name,
            Status::Warn,
            "nested PVM (kvm_pvm): guest kernel code is emulated and guest user space cannot run",
        )
        .fix("run workspaces on a host with hardware KVM (bare metal, or a VM with nested VT-x)"),
        KvmFlavour::Unknown => Check::new(name, Status::Warn, "/dev/kvm present, flavour unknown"),
    }
}

/// The IOMMU: groups present, which kind, interrupt remapping.
pub fn iommu(f: &Facts, gpus_wanted: bool) -> Check {
    let name = "IOMMU";
    let groups = std::fs::read_dir(f.sys.join("kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    let units: Vec<String> = std::fs::read_dir(f.sys.join("class/iommu"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    if groups == 0 {
        let status = if gpus_wanted {
            Status::Fail
        } else {
            Status::Warn
        };
        return Check::new(name, status, "no IOMMU groups: the IOMMU is off or absent").fix(
            "enable VT-d / AMD-Vi in firmware and boot the host with intel_iommu=on (Intel) or \
             amd_iommu=on (AMD), plus iommu=pt",
        );
    }
    let kind = if units.iter().any(|u| u.starts_with("dmar")) {
        "Intel VT-d (DMAR)"
    } else if units.iter().any(|u| u.starts_with("ivhd")) {
        "AMD-Vi"
    } else {
        "unknown kind"
    };
    let mut found = format!("{groups} groups, {kind}");
    let unsafe_irq = std::fs::read_to_string(
        f.sys
            .join("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
    )
    .is_ok_and(|v| v.trim() == "Y");
    if unsafe_irq {
        found.push_str(", vfio allow_unsafe_interrupts=Y");
        return Check::new(name, Status::Warn, found).fix(
            "without interrupt remapping a device can forge interrupts into the host; use a \
             host whose IOMMU remaps interrupts and leave allow_unsafe_interrupts off",
        );
    }
    let no_ir: Vec<&String> = units
        .iter()
        .filter(|u| u.starts_with("dmar") && !intel_unit_remaps_interrupts(f, u))
        .collect();
    if !no_ir.is_empty() {
        found.push_str(", no interrupt remapping on ");
        found.push_str(
            &no_ir
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        );
        return Check::new(name, Status::Warn, found).fix(
            "VFIO refuses devices behind an IOMMU without interrupt remapping (and must not be \
             told otherwise): enable x2APIC / interrupt remapping in the firmware",
        );
    }
    Check::new(name, Status::Ok, found)
}

/// Whether Intel IOMMU unit `unit` supports interrupt remapping: bit 3 (IR) of its extended
/// capability register, which sysfs shows in hexadecimal.
fn intel_unit_remaps_interrupts(f: &Facts, unit: &str) -> bool {
    std::fs::read_to_string(
        f.sys
            .join("class/iommu")
            .join(unit)
            .join("intel-iommu/ecap"),
    )
    .ok()
    .and_then(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
    .is_some_and(|ecap| ecap & (1 << 3) != 0)
}

/// vfio-pci loaded and the container node present.
pub fn vfio(f: &Facts, gpus_wanted: bool) -> Check {
    let name = "VFIO";
    let driver = f.sys.join("bus/pci/drivers/vfio-pci").exists();
    let node = f.dev.join("vfio/vfio").exists();
    if driver && node {
        return Check::new(name, Status::Ok, "vfio-pci loaded, /dev/vfio/vfio present");
    }
    let status = if gpus_wanted {
        Status::Fail
    } else {
        Status::Warn
    };
    Check::new(
        name,
        status,
        "vfio-pci not loaded or /dev/vfio/vfio missing",
    )
    .fix("modprobe vfio-pci")
}

/// One GPU: present, bound to vfio-pci, its whole group passable, its group node present.
pub fn gpu(f: &Facts, addr: &PciAddress, all: &[PciAddress]) -> Check {
    let name = format!("GPU {addr}");
    let dir = sysfs::device_dir(&f.sys, addr);
    if !dir.exists() {
        return Check::new(name, Status::Fail, "no such PCI device on this host")
            .fix("check the address with lspci -D");
    }
    let driver = sysfs::driver_of(&f.sys, &addr.to_string());
    if driver.as_deref() != Some("vfio-pci") {
        let now = driver.unwrap_or_else(|| "no driver".to_owned());
        return Check::new(name, Status::Fail, format!("bound to {now}, not vfio-pci")).fix(
            format!(
                "echo vfio-pci > {d}/driver_override; echo {addr} > {d}/driver/unbind; \
                 echo {addr} > /sys/bus/pci/drivers_probe",
                d = dir.display()
            ),
        );
    }
    match sysfs::check_group(&f.sys, addr, all) {
        Ok(g) => {
            if f.dev.join("vfio").join(g.id.to_string()).exists() {
                let found = format!("bound to vfio-pci, IOMMU group {} whole", g.id);
                // `reset_method` (Linux 5.15+): how vfio-pci can reset the function.
                match std::fs::read_to_string(dir.join("reset_method")) {
                    Ok(m) if m.trim().is_empty() => {
                        Check::new(name, Status::Warn, format!("{found}, but no reset method")).fix(
                            "without a reset, state (including device memory) can pass from one \
                         VM to the next: give the GPU to one tenant and scrub it between them",
                        )
                    }
                    Ok(m) => {
                        Check::new(name, Status::Ok, format!("{found}, reset by {}", m.trim()))
                    }
                    Err(_) => Check::new(name, Status::Ok, found),
                }
            } else {
                Check::new(
                    name,
                    Status::Fail,
                    format!("IOMMU group {} has no /dev/vfio/{}", g.id, g.id),
                )
                .fix("modprobe vfio-pci, and check the group is viable")
            }
        }
        Err(e) => {
            let fix = match &e {
                sysfs::Error::NotGiven { member, .. } => {
                    format!("pass every device of the group: add --gpu {member}")
                }
                sysfs::Error::NotVfio { member, .. } => {
                    format!("bind {member} to vfio-pci as well (driver_override)")
                }
                _ => "enable the IOMMU (see above)".to_owned(),
            };
            Check::new(name, Status::Fail, e.to_string()).fix(fix)
        }
    }
}

/// RLIMIT_MEMLOCK against the guest RAM VFIO pins (the jailed VMM has no CAP_IPC_LOCK).
pub fn memlock(f: &Facts, mem_bytes: u64, gpus_wanted: bool) -> Check {
    let name = "memlock";
    let fix = "raise it to at least the guest's memory: ulimit -l unlimited, LimitMEMLOCK= in the \
               systemd unit, or memlock in /etc/security/limits.conf";
    match memlock_limit(&f.limits) {
        Some(None) => Check::new(name, Status::Ok, "unlimited"),
        Some(Some(limit)) if limit >= mem_bytes => Check::new(
            name,
            Status::Ok,
            format!(
                "{} MiB, enough for {} MiB of guest RAM",
                limit >> 20,
                mem_bytes >> 20
            ),
        ),
        Some(Some(limit)) if !gpus_wanted => Check::new(
            name,
            Status::Ok,
            format!("{} MiB (only matters with a GPU)", limit >> 20),
        ),
        Some(Some(limit)) => Check::new(
            name,
            Status::Fail,
            format!(
                "{} MiB, less than {} MiB of guest RAM (VFIO pins all guest RAM)",
                limit >> 20,
                mem_bytes >> 20
            ),
        )
        .fix(fix),
        None => Check::new(name, Status::Warn, "cannot read /proc/self/limits"),
    }
}

/// The Landlock ABI the VMM's jail gets.
pub fn landlock(f: &Facts) -> Check {
    let name = "Landlock";
    match f.landlock_abi {
        a if a >= 6 => Check::new(name, Status::Ok, format!("ABI {a}: files, TCP, scoping")),
        a if a >= 4 => Check::new(
            name,
            Status::Ok,
            format!("ABI {a}: files and TCP (no abstract-socket or signal scoping before 6)"),
        ),
        a if a >= 1 => Check::new(name, Status::Warn, format!("ABI {a}: files only"))
            .fix("a kernel of 6.7 or later adds TCP rules (ABI 4)"),
        _ => Check::new(
            name,
            Status::Warn,
            "not available: the jail relies on seccomp alone",
        )
        .fix("boot with lsm=...,landlock and a kernel with CONFIG_SECURITY_LANDLOCK"),
    }
}

/// Every check for a VM of `mem_bytes` with `gpus`.
pub fn checks(f: &Facts, gpus: &[PciAddress], mem_bytes: u64) -> Vec<Check> {
    let wanted = !gpus.is_empty();
    let mut out = vec![
        kvm_flavour(f),
        iommu(f, wanted),
        vfio(f, wanted),
        memlock(f, mem_bytes, wanted),
        landlock(f),
    ];
    out.extend(gpus.iter().map(|g| gpu(f, g, gpus)));
    out
}

/// Runs `moat doctor`.
pub(crate) fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = checks(&Facts::gather(), &args.gpu, args.mem << 20);
    for c in &report {
        let tag = match c.status {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{tag}] {}: {}", c.name, c.found);
        if let Some(fix) = &c.fix {
            println!("       fix: {fix}");
        }
    }
    let failed = report.iter().any(|c| c.status == Status::Fail);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_host_probe::pci::testing::add_device;

    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let t = Self { dir };
            for d in ["sys/module", "sys/kernel/iommu_groups", "dev"] {
                t.mkdir(d);
            }
            t
        }
        fn mkdir(&self, p: &str) {
            std::fs::create_dir_all(self.dir.path().join(p)).unwrap_or_else(|e| panic!("{e}"));
        }
        fn file(&self, p: &str, text: &str) {
            let path = self.dir.path().join(p);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
            }
            std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
        }
        fn facts(&self, limits: &str, landlock_abi: u32) -> Facts {
            Facts {
                sys: self.dir.path().join("sys"),
                dev: self.dir.path().join("dev"),
                limits: limits.to_owned(),
                landlock_abi,
            }
        }
        /// A host with VT-d, vfio-pci and /dev/vfio.
        fn vfio_host() -> Self {
            let t = Self::new();
            t.file("dev/kvm", "");
            t.mkdir("sys/module/kvm_intel");
            // A VT-d extended capability value with IR (bit 3) set.
            t.file("sys/class/iommu/dmar0/intel-iommu/ecap", "f0205ef\n");
            t.mkdir("sys/bus/pci/drivers/vfio-pci");
            t.file("dev/vfio/vfio", "");
            t
        }
    }

    const LIMITS_64M: &str = "Limit                     Soft Limit           Hard Limit           Units\n\
        Max locked memory         67108864             67108864             bytes\n";
    const LIMITS_UNLIMITED: &str =
        "Max locked memory         unlimited            unlimited            bytes\n";

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn memlock_is_read_from_proc_limits() {
        assert_eq!(memlock_limit(LIMITS_64M), Some(Some(64 << 20)));
        assert_eq!(memlock_limit(LIMITS_UNLIMITED), Some(None));
        assert_eq!(memlock_limit("garbage"), None);
    }

    #[test]
    fn nested_pvm_is_told_apart_from_hardware_kvm() {
        let t = Tree::new();
        t.file("dev/kvm", "");
        t.mkdir("sys/module/kvm_pvm");
        let c = kvm_flavour(&t.facts("", 7));
        assert_eq!(c.status, Status::Warn);
        assert!(c.found.contains("nested PVM"), "{c:?}");
        let t = Tree::new();
        t.file("dev/kvm", "");
        t.mkdir("sys/module/kvm_amd");
        assert_eq!(kvm_flavour(&t.facts("", 7)).status, Status::Ok);
    }

    #[test]
    fn no_iommu_fails_only_when_a_gpu_is_wanted() {
        let t = Tree::new();
        let f = t.facts("", 7);
        assert_eq!(iommu(&f, false).status, Status::Warn);
        let c = iommu(&f, true);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.is_some_and(|x| x.contains("intel_iommu=on")));
    }

    #[test]
    fn intel_iommu_groups_are_reported() {
        let t = Tree::vfio_host();
        add_device(
            &t.dir.path().join("sys"),
            "0000:41:00.0",
            3,
            Some("vfio-pci"),
        );
        let c = iommu(&t.facts("", 7), true);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.found, "1 groups, Intel VT-d (DMAR)");
    }

    #[test]
    fn an_intel_iommu_without_interrupt_remapping_is_a_warning() {
        let t = Tree::vfio_host();
        add_device(
            &t.dir.path().join("sys"),
            "0000:41:00.0",
            3,
            Some("vfio-pci"),
        );
        t.file("sys/class/iommu/dmar0/intel-iommu/ecap", "f0205e7\n");
        let c = iommu(&t.facts("", 7), true);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.found.ends_with("no interrupt remapping on dmar0"),
            "{c:?}"
        );
    }

    #[test]
    fn unsafe_interrupts_are_a_warning() {
        let t = Tree::vfio_host();
        add_device(
            &t.dir.path().join("sys"),
            "0000:41:00.0",
            3,
            Some("vfio-pci"),
        );
        t.file(
            "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
            "Y\n",
        );
        assert_eq!(iommu(&t.facts("", 7), true).status, Status::Warn);
    }

    #[test]
    fn a_gpu_on_its_vendor_driver_fails_with_the_rebind_steps() {
        let t = Tree::vfio_host();
        add_device(&t.dir.path().join("sys"), "0000:41:00.0", 3, Some("nvidia"));
        let a = addr("41:00.0");
        let c = gpu(&t.facts("", 7), &a, &[a]);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.found, "bound to nvidia, not vfio-pci");
        assert!(c.fix.is_some_and(|x| x.contains("driver_override")));
    }

    #[test]
    fn a_gpu_whose_audio_function_is_left_behind_fails_naming_it() {
        let t = Tree::vfio_host();
        let sys = t.dir.path().join("sys");
        add_device(&sys, "0000:41:00.0", 3, Some("vfio-pci"));
        add_device(&sys, "0000:41:00.1", 3, Some("vfio-pci"));
        t.file("dev/vfio/3", "");
        let a = addr("41:00.0");
        let c = gpu(&t.facts("", 7), &a, &[a]);
        assert_eq!(c.status, Status::Fail);
        assert!(c.found.contains("0000:41:00.1"), "{c:?}");
        assert!(c.fix.is_some_and(|x| x.contains("--gpu 0000:41:00.1")));
    }

    #[test]
    fn a_whole_group_on_vfio_pci_passes() {
        let t = Tree::vfio_host();
        let sys = t.dir.path().join("sys");
        add_device(&sys, "0000:41:00.0", 3, Some("vfio-pci"));
        add_device(&sys, "0000:41:00.1", 3, Some("vfio-pci"));
        t.file("dev/vfio/3", "");
        let all = [addr("41:00.0"), addr("41:00.1")];
        let report = checks(&t.facts(LIMITS_UNLIMITED, 6), &all, 8 << 30);
        assert!(report.iter().all(|c| c.status == Status::Ok), "{report:#?}");
    }

    #[test]
    fn a_gpu_without_a_reset_method_is_a_warning() {
        let t = Tree::vfio_host();
        add_device(
            &t.dir.path().join("sys"),
            "0000:41:00.0",
            3,
            Some("vfio-pci"),
        );
        t.file("dev/vfio/3", "");
        let a = addr("41:00.0");
        t.file("sys/bus/pci/devices/0000:41:00.0/reset_method", "\n");
        assert_eq!(gpu(&t.facts("", 7), &a, &[a]).status, Status::Warn);
        t.file("sys/bus/pci/devices/0000:41:00.0/reset_method", "flr bus\n");
        let c = gpu(&t.facts("", 7), &a, &[a]);
        assert_eq!(c.status, Status::Ok);
        assert!(c.found.ends_with("reset by flr bus"), "{c:?}");
    }

    #[test]
    fn a_memlock_limit_below_guest_ram_fails_with_a_gpu() {
        let t = Tree::new();
        let c = memlock(&t.facts(LIMITS_64M, 7), 4 << 30, true);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            memlock(&t.facts(LIMITS_64M, 7), 4 << 30, false).status,
            Status::Ok
        );
    }

    #[test]
    fn a_missing_gpu_fails() {
        let t = Tree::vfio_host();
        let a = addr("41:00.0");
        assert_eq!(gpu(&t.facts("", 7), &a, &[a]).status, Status::Fail);
    }

    #[test]
    fn landlock_abi_levels() {
        let t = Tree::new();
        assert_eq!(landlock(&t.facts("", 0)).status, Status::Warn);
        assert_eq!(landlock(&t.facts("", 3)).status, Status::Warn);
        assert_eq!(landlock(&t.facts("", 4)).status, Status::Ok);
    }
}
