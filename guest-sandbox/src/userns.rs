//! Step 1a (optional): enter a user namespace, made beforehand, in which the caller's ids
//! appear as chosen ones.
//!
//! The namespace backend maps exactly one host id into the workspace (its root): there is no
//! other id to drop to. A program that behaves differently as uid 0 (OpenSSH's sshd does its
//! privilege separation, with `chroot` and a switch to the `sshd` user, only as root) is put in
//! a nested user namespace instead, in which the workspace's root appears as, say, uid 1000
//! (`1000 <creator's euid> 1`). Files stay owned by the same host id, so a person's SSH
//! session and the agent own the same files. The process holds every capability in that
//! namespace on entering it; the later steps drop them. Nothing is gained over the parent
//! namespace: those capabilities only reach what the nested namespace owns (the mount, IPC and
//! UTS namespaces of step 2).
//!
//! Why made beforehand, by a holder process: a namespace's maps are written through `/proc`,
//! whose files belong to root unless the process is dumpable, and guest-init's PID 1 is not
//! dumpable on purpose (its descriptors reach the host). So [`UserNamespace::create`] forks a
//! holder that closes every descriptor, becomes dumpable, unshares a user namespace, writes its
//! own maps (one line mapping its own effective id needs no privilege), becomes non-dumpable
//! again (its memory is a copy of its creator's), sends a descriptor of its namespace back over
//! a Unix socket (its creator could not open it through `/proc` any more), and is then killed.
//! Each confined process later only `setns`es into it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::error::SandboxError;
use crate::sys;

/// A user namespace held open, in which its creator's effective ids appear as the ids given
/// to [`UserNamespace::create`].
#[derive(Clone, Debug)]
pub struct UserNamespace(Arc<OwnedFd>);

impl PartialEq for UserNamespace {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for UserNamespace {}

impl UserNamespace {
    /// Makes a user namespace, child of the caller's, in which the caller's effective uid and
    /// gid appear as `uid` and `gid` (no other id is mapped; `setgroups` is denied in it).
    /// Safe to call from a multi-threaded process: the holder child makes system calls only.
    pub fn create(uid: u32, gid: u32) -> Result<Self, SandboxError> {
        if uid == 0 {
            return Err(SandboxError::InvalidConfig(
                "the uid in a nested user namespace must not be 0",
            ));
        }
        let step = |what| move |e| SandboxError::UserNamespace(what, e);
        let (euid, egid) = sys::effective_ids();
        let uid_map = format!("{uid} {euid} 1\n").into_bytes();
        let gid_map = format!("{gid} {egid} 1\n").into_bytes();
        let (ready_r, ready_w) = sys::socketpair().map_err(step("socketpair"))?;
        let ready_fd = ready_w.as_raw_fd();
        let pid = sys::fork_userns_holder(ready_fd, &uid_map, &gid_map).map_err(step("fork"))?;
        drop(ready_w);
        let held = match sys::recv_byte_and_fd(ready_r.as_raw_fd()) {
            Ok(Some((0, Some(ns)))) => Ok(ns),
            Ok(Some((0, None))) => Err(step("the holder's namespace")(
                std::io::Error::from_raw_os_error(libc::EBADF),
            )),
            Ok(Some((errno, _))) => Err(step("the holder's maps")(
                std::io::Error::from_raw_os_error(i32::from(errno)),
            )),
            Ok(None) => Err(step("the holder")(std::io::Error::from_raw_os_error(
                libc::ECHILD,
            ))),
            Err(e) => Err(step("the holder")(e)),
        };
        sys::kill_and_reap(pid);
        Ok(Self(Arc::new(held?)))
    }

    /// Enters the namespace (the calling thread must be the process's only one).
    pub(crate) fn enter(&self) -> Result<(), SandboxError> {
        sys::setns(self.0.as_raw_fd(), libc::CLONE_NEWUSER)
            .map_err(|e| SandboxError::UserNamespace("setns", e))
    }
}
