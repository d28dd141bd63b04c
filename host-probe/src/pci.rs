//! What the host's sysfs says about a PCI function: its IOMMU group, the group's other
//! members, and their drivers. moat-vmm refuses a group unless every member is bound to
//! vfio-pci and given to this VM (a device left to a host driver, or to another VM, could
//! DMA into the memory this VM's device can reach, since a group shares one IOMMU context).
//! `moat doctor` runs the same checks before a VM is started. Every function takes the sysfs
//! root, so tests run them against fake trees.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A host PCI function address, `DDDD:BB:DD.F` (the domain may be left out: 0000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

/// A malformed PCI address.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a PCI address (DDDD:BB:DD.F, hexadecimal)")]
pub struct BadAddress(pub String);

impl FromStr for PciAddress {
    type Err = BadAddress;
    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let bad = || BadAddress(s.to_owned());
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, v] if d.len() == 4 => (*d, *b, *v),
            [b, v] => ("0000", *b, *v),
            _ => return Err(bad()),
        };
        let hex8 = |t: &str| {
            (t.len() == 2)
                .then(|| u8::from_str_radix(t, 16).ok())
                .flatten()
        };
        let addr = Self {
            domain: u16::from_str_radix(domain, 16).map_err(|_| bad())?,
            bus: hex8(bus).ok_or_else(bad)?,
            device: hex8(device).filter(|d| *d < 32).ok_or_else(bad)?,
            function: (function.len() == 1)
                .then(|| u8::from_str_radix(function, 8).ok())
                .flatten()
                .ok_or_else(bad)?,
        };
        Ok(addr)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl<'de> serde::Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a group cannot be given to this VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The device does not exist on this host.
    #[error("no PCI device {0} on this host ({1} is missing)")]
    NoDevice(PciAddress, PathBuf),
    /// The device has no IOMMU group: the IOMMU is off or absent.
    #[error(
        "{0} has no IOMMU group: the IOMMU is off (intel_iommu=on / amd_iommu=on on the host \
         kernel command line) or absent"
    )]
    NoGroup(PciAddress),
    /// A member of the group is bound to another driver.
    #[error(
        "{member} (IOMMU group {group}, with {device}) is bound to {driver}, not vfio-pci: \
         bind it to vfio-pci"
    )]
    NotVfio {
        /// The device asked for.
        device: PciAddress,
        /// The group.
        group: u32,
        /// The offending member.
        member: String,
        /// Its driver, or "no driver".
        driver: String,
    },
    /// A member of the group is not given to this VM.
    #[error(
        "{member} shares IOMMU group {group} with {device} but is not passed to this VM: \
         pass every device of the group (--gpu {member}) or none"
    )]
    NotGiven {
        /// The device asked for.
        device: PciAddress,
        /// The group.
        group: u32,
        /// The member left out.
        member: String,
    },
    /// Sysfs could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, String),
}

/// An IOMMU group that may be passed through whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group number (`/dev/vfio/<id>`).
    pub id: u32,
    /// Its members' addresses as sysfs names them.
    pub members: Vec<String>,
}

/// The sysfs directory of `addr` under `root` (normally `/sys`).
pub fn device_dir(root: &Path, addr: &PciAddress) -> PathBuf {
    root.join("bus/pci/devices").join(addr.to_string())
}

/// The IOMMU group of `addr`.
pub fn group_of(root: &Path, addr: &PciAddress) -> Result<u32, Error> {
    let dir = device_dir(root, addr);
    if !dir.exists() {
        return Err(Error::NoDevice(*addr, dir));
    }
    let link = std::fs::read_link(dir.join("iommu_group")).map_err(|_| Error::NoGroup(*addr))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or(Error::NoGroup(*addr))
}

/// The driver bound to the device named `name` (a sysfs device name), if any.
pub fn driver_of(root: &Path, name: &str) -> Option<String> {
    let link = std::fs::read_link(root.join("bus/pci/devices").join(name).join("driver")).ok()?;
    link.file_name()?.to_str().map(str::to_owned)
}

/// Checks that `addr`'s group can be passed to a VM that is given `given`: every member bound
/// to vfio-pci and in `given`. The first offending member is named in the refusal.
pub fn check_group(root: &Path, addr: &PciAddress, given: &[PciAddress]) -> Result<Group, Error> {
    let id = group_of(root, addr)?;
    let dir = root
        .join("kernel/iommu_groups")
        .join(id.to_string())
        .join("devices");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::Read(dir.clone(), e.to_string()))?;
    let mut members: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    members.sort();
    let given: Vec<String> = given.iter().map(ToString::to_string).collect();
    for m in &members {
        let driver = driver_of(root, m);
        if driver.as_deref() != Some("vfio-pci") {
            return Err(Error::NotVfio {
                device: *addr,
                group: id,
                member: m.clone(),
                driver: driver.unwrap_or_else(|| "no driver".to_owned()),
            });
        }
        if !given.contains(m) {
            return Err(Error::NotGiven {
                device: *addr,
                group: id,
                member: m.clone(),
            });
        }
    }
    Ok(Group { id, members })
}

#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    //! Fake sysfs trees.

    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// Adds PCI device `name` in IOMMU group `group` bound to `driver` (none if `None`).
    pub fn add_device(root: &Path, name: &str, group: u32, driver: Option<&str>) {
        let dev = root.join("bus/pci/devices").join(name);
        let grp = root.join("kernel/iommu_groups").join(group.to_string());
        let _ = std::fs::create_dir_all(&dev);
        let _ = std::fs::create_dir_all(grp.join("devices"));
        let _ = symlink(&grp, dev.join("iommu_group"));
        let _ = symlink(&dev, grp.join("devices").join(name));
        if let Some(d) = driver {
            let drv = root.join("bus/pci/drivers").join(d);
            let _ = std::fs::create_dir_all(&drv);
            let _ = symlink(&drv, dev.join("driver"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::add_device;
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-sysfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn addresses_parse_with_or_without_a_domain() {
        assert_eq!(addr("0000:41:00.1").to_string(), "0000:41:00.1");
        assert_eq!(addr("41:00.0").to_string(), "0000:41:00.0");
        for bad in [
            "41:00",
            "0000:41:20.0",
            "0000:41:00.8",
            "x:41:00.0",
            "4100.0",
            "",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_group_of_vfio_devices_all_given_is_viable() {
        let root = tree("viable");
        add_device(&root, "0000:41:00.0", 7, Some("vfio-pci"));
        add_device(&root, "0000:41:00.1", 7, Some("vfio-pci"));
        let given = [addr("41:00.0"), addr("41:00.1")];
        let g = check_group(&root, &given[0], &given);
        assert_eq!(
            g,
            Ok(Group {
                id: 7,
                members: vec!["0000:41:00.0".into(), "0000:41:00.1".into()]
            })
        );
    }

    #[test]
    fn a_member_on_a_host_driver_is_named() {
        let root = tree("hostdrv");
        add_device(&root, "0000:41:00.0", 7, Some("vfio-pci"));
        add_device(&root, "0000:41:00.1", 7, Some("snd_hda_intel"));
        let e = check_group(&root, &addr("41:00.0"), &[addr("41:00.0")]);
        assert!(
            matches!(&e, Err(Error::NotVfio { member, driver, .. })
                if member == "0000:41:00.1" && driver == "snd_hda_intel"),
            "{e:?}"
        );
    }

    #[test]
    fn a_member_not_given_to_this_vm_is_named() {
        let root = tree("notgiven");
        add_device(&root, "0000:41:00.0", 7, Some("vfio-pci"));
        add_device(&root, "0000:41:00.1", 7, Some("vfio-pci"));
        let e = check_group(&root, &addr("41:00.0"), &[addr("41:00.0")]);
        assert!(
            matches!(&e, Err(Error::NotGiven { member, .. }) if member == "0000:41:00.1"),
            "{e:?}"
        );
    }

    #[test]
    fn a_device_without_a_group_means_no_iommu() {
        let root = tree("nogroup");
        let _ = std::fs::create_dir_all(root.join("bus/pci/devices/0000:41:00.0"));
        assert_eq!(
            check_group(&root, &addr("41:00.0"), &[]),
            Err(Error::NoGroup(addr("41:00.0")))
        );
    }

    #[test]
    fn a_missing_device_is_refused() {
        let root = tree("missing");
        assert!(matches!(
            group_of(&root, &addr("41:00.0")),
            Err(Error::NoDevice(..))
        ));
    }
}
