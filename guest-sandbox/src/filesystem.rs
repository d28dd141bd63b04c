//! Step 7: Landlock.
//!
//! The ruleset is built before `fork` (paths are opened then), at the best ABI the kernel
//! offers up to the newest one this crate has vetted ([`NEWEST_VETTED_ABI`]). In the child it
//! is only enforced.
//!
//! Filesystem: every access right of that ABI is handled, so anything not granted below is
//! refused with `EACCES`. Writable paths get read, write and execute rights; readable paths
//! read and execute; device paths read, write and device ioctls.
//!
//! Scopes (ABI 6): the agent may neither signal processes outside its Landlock domain
//! (guest-init, the netstack) nor connect to abstract Unix sockets created outside it.
//!
//! Network: not restricted with Landlock, on purpose. Landlock only knows TCP ports, not
//! destinations; the agent must reach any port through the TUN, and egress policy is decided
//! on the host by the egress proxy. Restricting `connect` would duplicate that policy badly,
//! and restricting `bind` would break development servers on loopback, while the workspace's
//! network namespace holds nothing but the TUN and loopback.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, make_bitflags,
};

use crate::error::SandboxError;

/// The newest Landlock ABI whose rights this crate grants deliberately. A newer kernel is
/// used at this ABI until the table below is reviewed for the new rights.
pub const NEWEST_VETTED_ABI: u32 = 9;

/// Rights of a readable path: read files, list directories, execute.
pub(crate) fn readable_rights(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & make_bitflags!(AccessFs::{Execute | ReadFile | ReadDir})
}

/// Rights of a writable path: everything except creating device nodes and device ioctls.
pub(crate) fn writable_rights(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & !make_bitflags!(AccessFs::{MakeChar | MakeBlock | IoctlDev})
}

/// Rights of a device path (`/dev/null`, `/dev/tty`, `/dev/pts`): read, write, truncate
/// (`> /dev/null` opens with `O_TRUNC`) and device ioctls (terminal modes).
pub(crate) fn device_rights(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & make_bitflags!(AccessFs::{ReadFile | WriteFile | Truncate | IoctlDev})
}

/// How completely Landlock is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Every right of the chosen ABI is enforced.
    Full,
    /// The kernel enforced only part of the ruleset.
    Partial,
}

/// What the Landlock step enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LandlockReport {
    /// The kernel's Landlock ABI.
    pub kernel_abi: u32,
    /// The ABI the ruleset was built for: the kernel's, capped at [`NEWEST_VETTED_ABI`].
    pub abi: u32,
    /// Whether the ruleset was fully enforced.
    pub enforcement: Enforcement,
    /// Whether signals and abstract Unix sockets are scoped to the sandbox (ABI 6 and later).
    pub scoped: bool,
}

/// A Landlock ruleset ready to be enforced.
#[derive(Debug)]
pub(crate) struct Prepared {
    ruleset: RulesetCreated,
    kernel_abi: u32,
    abi: u32,
    scoped: bool,
    /// Device paths that do not exist and so got no rule.
    pub(crate) missing_devices: Vec<PathBuf>,
}

fn path_fd(path: &Path) -> Result<PathFd, SandboxError> {
    PathFd::new(path).map_err(|e| SandboxError::Path {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })
}

/// Builds the ruleset (before `fork`).
pub(crate) fn prepare(
    writable: &[PathBuf],
    readable: &[PathBuf],
    devices: &[PathBuf],
    min_abi: u32,
) -> Result<Prepared, SandboxError> {
    let kernel_abi = moat_host_probe::landlock_abi();
    if kernel_abi < min_abi.max(1) {
        return Err(SandboxError::LandlockUnavailable {
            found: kernel_abi,
            required: min_abi.max(1),
        });
    }
    let abi_number = kernel_abi.min(NEWEST_VETTED_ABI);
    let abi = ABI::from(i32::try_from(abi_number).unwrap_or(1));
    let scopes = Scope::from_all(abi);
    let scoped = !scopes.is_empty();

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(SandboxError::Landlock)?;
    if scoped {
        ruleset = ruleset.scope(scopes).map_err(SandboxError::Landlock)?;
    }
    let mut created = ruleset.create().map_err(SandboxError::Landlock)?;

    for path in readable {
        created = created
            .add_rule(PathBeneath::new(path_fd(path)?, readable_rights(abi)))
            .map_err(SandboxError::Landlock)?;
    }
    for path in writable {
        created = created
            .add_rule(PathBeneath::new(path_fd(path)?, writable_rights(abi)))
            .map_err(SandboxError::Landlock)?;
    }
    let mut missing_devices = Vec::new();
    for path in devices {
        if !path.exists() {
            missing_devices.push(path.clone());
            continue;
        }
        let fd = path_fd(path)?;
        // A device rule on a directory (`/dev/pts`) covers the devices beneath it; on a
        // single file only the rights that make sense for a file may be granted.
        let rights = if path.is_dir() {
            device_rights(abi)
        } else {
            device_rights(abi) & AccessFs::from_file(abi)
        };
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(SandboxError::Landlock)?;
    }
    Ok(Prepared {
        ruleset: created,
        kernel_abi,
        abi: abi_number,
        scoped,
        missing_devices,
    })
}

impl Prepared {
    /// Enforces the ruleset on the calling thread (after `fork`; no allocation).
    pub(crate) fn enforce(&self) -> Result<LandlockReport, SandboxError> {
        let ruleset = self
            .ruleset
            .try_clone()
            .map_err(SandboxError::LandlockDup)?;
        let status = ruleset.restrict_self().map_err(SandboxError::Landlock)?;
        let enforcement = match status.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::Full,
            RulesetStatus::PartiallyEnforced => Enforcement::Partial,
            RulesetStatus::NotEnforced => return Err(SandboxError::LandlockNotEnforced),
        };
        Ok(LandlockReport {
            kernel_abi: self.kernel_abi,
            abi: self.abi,
            enforcement,
            scoped: self.scoped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rights each kind of path gets at ABI 7 (this project's build machines), listed bit
    /// by bit so that a change in the crate or in `from_all` shows up here.
    #[test]
    fn rights_at_abi_7_are_exactly_these() {
        assert_eq!(
            readable_rights(ABI::V7),
            make_bitflags!(AccessFs::{Execute | ReadFile | ReadDir})
        );
        assert_eq!(
            writable_rights(ABI::V7),
            make_bitflags!(AccessFs::{
                Execute | ReadFile | ReadDir | WriteFile | RemoveDir | RemoveFile | MakeDir
                    | MakeReg | MakeSock | MakeFifo | MakeSym | Refer | Truncate
            })
        );
        assert_eq!(
            device_rights(ABI::V7),
            make_bitflags!(AccessFs::{ReadFile | WriteFile | Truncate | IoctlDev})
        );
    }

    #[test]
    fn abi_9_adds_unix_socket_connect_to_writable_paths_only() {
        assert!(writable_rights(ABI::V9).contains(AccessFs::ResolveUnix));
        assert!(!readable_rights(ABI::V9).contains(AccessFs::ResolveUnix));
        assert!(!device_rights(ABI::V9).contains(AccessFs::ResolveUnix));
    }

    #[test]
    fn readable_paths_never_get_a_write_right() {
        for abi in [ABI::V1, ABI::V3, ABI::V5, ABI::V7, ABI::V9] {
            assert_eq!(
                readable_rights(abi) & AccessFs::from_write(abi),
                BitFlags::EMPTY
            );
        }
    }

    #[test]
    fn no_path_may_create_device_nodes() {
        let devices = make_bitflags!(AccessFs::{MakeChar | MakeBlock});
        let granted = writable_rights(ABI::V9) | readable_rights(ABI::V9) | device_rights(ABI::V9);
        assert_eq!(granted & devices, BitFlags::EMPTY);
    }
}
