//! The raw system calls the jail needs, each wrapped once. This module and `kvm` are the only
//! places in the VMM that hold `unsafe`; every block states the invariant it relies on.

use std::ffi::CString;
use std::io;
use std::path::Path;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Marks every descriptor from 3 up close-on-exec and closes them: nothing inherited survives.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; called at start-up before this process has
    // opened anything of its own above 2, so no live Rust object owns one of them.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `unshare(flags)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes no pointers; it only changes this process's namespaces.
    check(unsafe { libc::unshare(flags) })
}

/// What `fork` returned.
#[derive(Debug)]
pub enum Fork {
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// `fork()`. The caller must be single-threaded (checked: it refuses otherwise).
pub fn fork() -> io::Result<Fork> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(
            "fork refused: the process has more than one thread",
        ));
    }
    // SAFETY: the process is single-threaded (checked above), so the child gets a consistent
    // copy of every lock and allocator state.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        p => Ok(Fork::Parent(p)),
    }
}

/// Waits for `pid`; returns its exit code, or 128 + the signal that killed it.
pub fn wait(pid: libc::pid_t) -> io::Result<i32> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            return Ok(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(128 + libc::WTERMSIG(status));
        }
    }
}

/// Asks the kernel to kill this process with SIGKILL when its parent dies.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number, no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
}

/// Makes this process non-dumpable (no core dumps, no ptrace by same-uid processes).
pub fn not_dumpable() -> io::Result<()> {
    set_dumpable(false)
}

/// Sets or clears the dumpable flag (which also decides who owns `/proc/self/*`).
pub fn set_dumpable(on: bool) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0 or 1) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(on)) })
}

/// `mount(source, target, NULL, flags, NULL)`.
pub fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let src = source.map(cstr).transpose()?;
    let tgt = cstr(target)?;
    let src_ptr = src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: both strings are NUL-terminated and outlive the call; fstype and data are NULL,
    // which mount(2) accepts for bind, remount and propagation changes.
    check(unsafe {
        libc::mount(
            src_ptr,
            tgt.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// `pivot_root(new_root, put_old)`.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let n = cstr(new_root)?;
    let o = cstr(put_old)?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `umount2(target, MNT_DETACH)`.
pub fn detach(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: the string is NUL-terminated and outlives the call.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) })
}

/// Sets the UTS namespace's host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Sets a resource limit (soft and hard) to `value`, or to the current hard limit if that is
/// lower: a limit is only ever lowered (raising one needs privilege the VMM may lack).
pub fn lower_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid, writable rlimit for the duration of the call.
    check(unsafe { libc::getrlimit(resource, &mut cur) })?;
    let value = value.min(cur.rlim_max);
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(resource, &lim) })
}

/// The effective uid and gid.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Drops every supplementary group.
pub fn clear_groups() -> io::Result<()> {
    // SAFETY: a zero-length list with a NULL pointer is valid for setgroups.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
}

/// Switches real, effective and saved gid, then uid.
pub fn switch_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// Empties the capability bounding set (needs CAP_SETPCAP in the current user namespace, so
/// call it before the uid switch).
pub fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes integers only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            // EINVAL: past the kernel's last capability.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Removes every environment variable.
pub fn clear_env() {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        // SAFETY: called while the process is single-threaded (the jail runs before any thread
        // is spawned), so no other thread can be reading the environment.
        unsafe { std::env::remove_var(k) };
    }
}
