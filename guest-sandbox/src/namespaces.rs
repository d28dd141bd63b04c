//! Step 2: the agent's own mount, IPC and UTS namespaces, and read-only mounts.
//!
//! In a fresh mount namespace whose mounts no longer propagate anywhere, each writable path is
//! bind-mounted onto itself (so it is a mount of its own), every mount is then made read-only
//! and nosuid recursively from `/`, and the writable binds get their write access back. This
//! is the mount-level half of "read-only root, writable home and /tmp"; Landlock (step 7) is
//! the other half, and either one alone already refuses writes outside the writable paths
//! (`EROFS` from the mounts, `EACCES` from Landlock).
//!
//! Hidden paths get an empty tmpfs over them, read-only, mode 000, after all that: what was
//! beneath (another process's files, devices) is not in the agent's mount namespace's view.
//!
//! `nodev` is not set: `/dev/null` and the terminals must keep working, and the agent can
//! create no device node (no `CAP_MKNOD`, and Landlock refuses `MakeChar`/`MakeBlock`).
//!
//! A PID namespace is not created here: it only applies to children of the caller, so it
//! belongs to the `clone` flags guest-init uses to create the agent's process.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;

use crate::error::SandboxError;
use crate::sys;

/// Which namespaces the agent gets for itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    /// A new mount namespace in which every mount is read-only and nosuid, except the
    /// writable paths.
    pub read_only_mounts: bool,
    /// A new IPC namespace: System V IPC and POSIX message queues of the agent alone.
    pub ipc: bool,
    /// A new UTS namespace: the hostname stays guest-init's.
    pub uts: bool,
}

impl Isolation {
    /// Every namespace this step can create (the default of [`crate::SandboxConfig::new`]).
    pub fn full() -> Self {
        Self {
            read_only_mounts: true,
            ipc: true,
            uts: true,
        }
    }

    /// No namespace and no mount change: for a caller that already did it.
    pub fn none() -> Self {
        Self {
            read_only_mounts: false,
            ipc: false,
            uts: false,
        }
    }
}

/// The isolation step, resolved before `fork`.
#[derive(Debug)]
pub(crate) struct Prepared {
    flags: libc::c_int,
    read_only_mounts: bool,
    writable: Vec<CString>,
    hidden: Vec<CString>,
}

/// Resolves the step: namespace flags, and the writable paths as C strings.
pub(crate) fn prepare(
    isolation: &Isolation,
    writable: &[PathBuf],
    hidden: &[PathBuf],
) -> Result<Prepared, SandboxError> {
    let mut flags = 0;
    if isolation.read_only_mounts {
        flags |= libc::CLONE_NEWNS;
    }
    if isolation.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if isolation.uts {
        flags |= libc::CLONE_NEWUTS;
    }
    let writable = writable
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| SandboxError::InvalidConfig("a writable path contains a NUL byte"))?;
    let hidden = hidden
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| SandboxError::InvalidConfig("a hidden path contains a NUL byte"))?;
    Ok(Prepared {
        flags,
        read_only_mounts: isolation.read_only_mounts,
        writable,
        hidden,
    })
}

impl Prepared {
    /// Enters the namespaces and remounts; returns whether any namespace was entered.
    pub(crate) fn apply(&self) -> Result<bool, SandboxError> {
        if self.flags == 0 {
            return Ok(false);
        }
        sys::unshare(self.flags).map_err(|e| SandboxError::Namespaces("unshare", e))?;
        if !self.read_only_mounts {
            return Ok(true);
        }
        sys::make_mounts_private()
            .map_err(|e| SandboxError::Namespaces("make mounts private", e))?;
        for path in &self.writable {
            sys::bind_onto_itself(path)
                .map_err(|e| SandboxError::Namespaces("bind a writable path", e))?;
        }
        sys::set_mount_attrs_recursive(c"/", sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID, 0)
            .map_err(|e| SandboxError::Namespaces("make the mounts read-only", e))?;
        for path in &self.writable {
            sys::set_mount_attrs_recursive(path, 0, sys::MOUNT_ATTR_RDONLY)
                .map_err(|e| SandboxError::Namespaces("make a writable path writable", e))?;
        }
        // Last, so nothing above can uncover them; the agent holds no capability afterwards to
        // unmount them. A path that does not exist has nothing to hide.
        for path in &self.hidden {
            match sys::hide_under_empty_tmpfs(path) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(SandboxError::Namespaces("hide a path", e)),
            }
        }
        Ok(true)
    }
}
