//! Steps 3 to 5: capability bounding set and securebits, user and group ids, then every
//! remaining capability.
//!
//! The bounding set and the securebits can only be changed while `CAP_SETPCAP` is held, so
//! they go first, before the id change (step 4) drops it. Without `CAP_SETPCAP` (an already
//! unprivileged caller) they are left as they are and the report says so; `no_new_privs`
//! then keeps `execve` from granting anything the bounding set still allows.

use std::io;

use crate::error::SandboxError;
use crate::sys;

/// Capability number of `CAP_SETPCAP`.
const CAP_SETPCAP: u32 = 8;
/// Capability number of `CAP_SETUID`.
const CAP_SETUID: u32 = 7;
/// Capability numbers are below 64 (two 32-bit words in capability ABI v3).
const CAP_LIMIT: u32 = 64;

/// Securebits set and locked while still privileged:
/// - `SECBIT_NOROOT`: uid 0 gains no capabilities at `execve` (matters if the agent stays uid 0);
/// - `SECBIT_NO_SETUID_FIXUP_LOCKED`: the kernel keeps clearing capabilities on a uid change;
/// - `SECBIT_KEEP_CAPS_LOCKED`: capabilities cannot be kept across a uid change;
/// - `SECBIT_NO_CAP_AMBIENT_RAISE`: the ambient set can never be raised again;
///
/// and each of them locked (`*_LOCKED`) so the agent cannot undo it.
pub(crate) const SECUREBITS: u32 = (1 << 0) // SECBIT_NOROOT
    | (1 << 1) // SECBIT_NOROOT_LOCKED
    | (1 << 3) // SECBIT_NO_SETUID_FIXUP_LOCKED
    | (1 << 5) // SECBIT_KEEP_CAPS_LOCKED
    | (1 << 6) // SECBIT_NO_CAP_AMBIENT_RAISE
    | (1 << 7); // SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED

/// What step 3 did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BoundingOutcome {
    pub(crate) bounding_set_cleared: bool,
    pub(crate) securebits_locked: bool,
}

fn has_effective(cap: u32) -> Result<bool, SandboxError> {
    let sets = sys::capget().map_err(|e| SandboxError::Capabilities("capget", e))?;
    Ok(sets.effective & (1 << cap) != 0)
}

/// Whether every capability the kernel knows is absent from the bounding set.
fn bounding_set_empty() -> Result<bool, SandboxError> {
    for cap in 0..CAP_LIMIT {
        match sys::bounding_has(cap) {
            Ok(true) => return Ok(false),
            Ok(false) => {}
            // EINVAL: past the kernel's last capability.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(SandboxError::Capabilities("PR_CAPBSET_READ", e)),
        }
    }
    Ok(true)
}

/// Step 3: empties the bounding set and locks the securebits, where `CAP_SETPCAP` allows.
pub(crate) fn drop_bounding_set() -> Result<BoundingOutcome, SandboxError> {
    if !has_effective(CAP_SETPCAP)? {
        return Ok(BoundingOutcome {
            bounding_set_cleared: bounding_set_empty()?,
            securebits_locked: false,
        });
    }
    for cap in 0..CAP_LIMIT {
        match sys::bounding_drop(cap) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(SandboxError::Capabilities("PR_CAPBSET_DROP", e)),
        }
    }
    if !bounding_set_empty()? {
        return Err(SandboxError::Capabilities(
            "bounding set not empty after dropping",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    let bits = sys::securebits().map_err(|e| SandboxError::Capabilities("PR_GET_SECUREBITS", e))?;
    sys::set_securebits(bits | SECUREBITS)
        .map_err(|e| SandboxError::Capabilities("PR_SET_SECUREBITS", e))?;
    Ok(BoundingOutcome {
        bounding_set_cleared: true,
        securebits_locked: true,
    })
}

/// Step 4: drops to `uid`/`gid` with no supplementary groups, and checks that it stuck.
///
/// Returns whether the ids were changed (false when they already were the target ids).
pub(crate) fn drop_identity(uid: u32, gid: u32) -> Result<bool, SandboxError> {
    let current_uids = sys::uids().map_err(|e| SandboxError::Identity("getresuid", e))?;
    let current_gids = sys::gids().map_err(|e| SandboxError::Identity("getresgid", e))?;
    let groups = sys::group_count().map_err(|e| SandboxError::Identity("getgroups", e))?;
    if current_uids == (uid, uid, uid) && current_gids == (gid, gid, gid) && groups == 0 {
        return Ok(false);
    }
    if !has_effective(CAP_SETUID)? {
        return Err(SandboxError::Identity(
            "not privileged to change ids",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    // In a user namespace whose setgroups is "deny", clearing fails with EPERM; that is
    // fine when there is nothing to clear.
    match sys::clear_groups() {
        Ok(()) => {}
        Err(_) if groups == 0 => {}
        Err(e) => return Err(SandboxError::Identity("setgroups", e)),
    }
    sys::set_all_gids(gid).map_err(|e| SandboxError::Identity("setresgid", e))?;
    sys::set_all_uids(uid).map_err(|e| SandboxError::Identity("setresuid", e))?;

    let now_uids = sys::uids().map_err(|e| SandboxError::Identity("getresuid", e))?;
    let now_gids = sys::gids().map_err(|e| SandboxError::Identity("getresgid", e))?;
    let now_groups = sys::group_count().map_err(|e| SandboxError::Identity("getgroups", e))?;
    if now_uids != (uid, uid, uid) || now_gids != (gid, gid, gid) || now_groups != 0 {
        return Err(SandboxError::Identity(
            "ids did not change",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    // The kernel must refuse to give root back.
    if sys::set_all_uids(0).is_ok() {
        return Err(SandboxError::Identity(
            "uid 0 could be regained",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    Ok(true)
}

/// Step 5: empties the ambient, inheritable, permitted and effective sets and checks it.
/// Dropping is always permitted. moat-vmm's jail uses it too (re-exported at the crate root).
pub fn drop_capabilities() -> Result<(), SandboxError> {
    sys::ambient_clear().map_err(|e| SandboxError::Capabilities("PR_CAP_AMBIENT_CLEAR_ALL", e))?;
    sys::capset_empty().map_err(|e| SandboxError::Capabilities("capset", e))?;
    let sets = sys::capget().map_err(|e| SandboxError::Capabilities("capget", e))?;
    if sets != sys::CapSets::default() {
        return Err(SandboxError::Capabilities(
            "capabilities remain after capset",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    for cap in 0..CAP_LIMIT {
        match sys::ambient_has(cap) {
            Ok(false) => {}
            Ok(true) => {
                return Err(SandboxError::Capabilities(
                    "ambient capability remains",
                    io::Error::from_raw_os_error(libc::EPERM),
                ));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(SandboxError::Capabilities("PR_CAP_AMBIENT_IS_SET", e)),
        }
    }
    Ok(())
}
