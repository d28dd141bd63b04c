//! Thin wrappers over the raw system calls the sandbox needs: rlimits, credentials,
//! capabilities, `prctl` and the Landlock version query.
//!
//! This is the only module of the crate that may use `unsafe`. Every wrapper passes plain
//! integers, or pointers to locals that live for the whole call, and turns the C return
//! convention into an [`io::Result`]. None of them allocates, so [`crate::Sandbox::apply`] can
//! run between `fork` and `exec` of a multi-threaded parent.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Maps a `-1`-on-error return value to the thread's `errno`.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Maps a `-1`-on-error `syscall(2)` return value to the thread's `errno`.
fn check_long(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The resource argument type of `getrlimit`/`setrlimit`, which differs between glibc and musl.
#[cfg(target_env = "gnu")]
pub(crate) type Resource = libc::__rlimit_resource_t;
/// The resource argument type of `getrlimit`/`setrlimit`, which differs between glibc and musl.
#[cfg(not(target_env = "gnu"))]
pub(crate) type Resource = libc::c_int;

/// `getrlimit(2)`: the current (soft, hard) limit of `resource`.
pub(crate) fn getrlimit(resource: Resource) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` that outlives the call; the kernel writes at
    // most `size_of::<rlimit>()` bytes into it.
    check(unsafe { libc::getrlimit(resource, &mut lim) })?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// `setrlimit(2)`: sets the (soft, hard) limit of `resource`.
pub(crate) fn setrlimit(resource: Resource, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid `rlimit` that outlives the call; the kernel only reads it.
    check(unsafe { libc::setrlimit(resource, &lim) })?;
    Ok(())
}

// The id changes below are the raw system calls, which change the calling thread's
// credentials only, not glibc's wrappers, which also signal every other thread glibc knows of
// and wait for each (setxid): in a child made by a raw `clone` of a multi-threaded process
// (a workspace service, `moat-guest-init`'s `service` module) glibc still counts the parent's
// threads, which the child does not have, and would wait forever. The sandbox confines the
// thread that will execve, alone in its process, so the per-thread calls are the right ones.

/// `setgroups(0, NULL)`: clears the supplementary groups.
pub(crate) fn clear_groups() -> io::Result<()> {
    // SAFETY: a zero-length list with a null pointer is the documented way to clear the groups;
    // the kernel reads nothing through the pointer.
    check_long(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
    Ok(())
}

/// `getgroups(0, NULL)`: how many supplementary groups the thread has.
pub(crate) fn group_count() -> io::Result<usize> {
    // SAFETY: with a size of zero the kernel only returns the count and writes nothing.
    let n = check(unsafe { libc::getgroups(0, std::ptr::null_mut()) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `setresgid(2)` with the same id for real, effective and saved.
pub(crate) fn set_all_gids(gid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    Ok(())
}

/// `setresuid(2)` with the same id for real, effective and saved.
pub(crate) fn set_all_uids(uid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })?;
    Ok(())
}

/// `getresuid(2)`: (real, effective, saved) user ids.
pub(crate) fn uids() -> io::Result<(u32, u32, u32)> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are to distinct locals that outlive the call.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) })?;
    Ok((r, e, s))
}

/// `getresgid(2)`: (real, effective, saved) group ids.
pub(crate) fn gids() -> io::Result<(u32, u32, u32)> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are to distinct locals that outlive the call.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) })?;
    Ok((r, e, s))
}

/// `prctl(2)` with integer arguments only.
fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every option this crate passes (capability bounding set, ambient set, securebits,
    // no_new_privs) takes integer arguments only; unused arguments are zero as the man page asks.
    check(unsafe { libc::prctl(option, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) })
}

/// `PR_CAPBSET_READ`: whether `cap` is in the bounding set; `Err(EINVAL)` past the last cap.
pub(crate) fn bounding_has(cap: u32) -> io::Result<bool> {
    Ok(prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap))? == 1)
}

/// `PR_CAPBSET_DROP`: removes `cap` from the bounding set (needs `CAP_SETPCAP`).
pub(crate) fn bounding_drop(cap: u32) -> io::Result<()> {
    prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)).map(drop)
}

/// `PR_CAP_AMBIENT_CLEAR_ALL`: empties the ambient set (always permitted).
pub(crate) fn ambient_clear() -> io::Result<()> {
    // SAFETY: integer arguments only; PR_CAP_AMBIENT takes a sub-command and zeroes.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(drop)
}

/// `PR_CAP_AMBIENT_IS_SET`: whether `cap` is in the ambient set.
pub(crate) fn ambient_has(cap: u32) -> io::Result<bool> {
    // SAFETY: integer arguments only.
    let rc = check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            libc::c_ulong::from(cap),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    Ok(rc == 1)
}

/// `PR_SET_SECUREBITS` (needs `CAP_SETPCAP`).
pub(crate) fn set_securebits(bits: u32) -> io::Result<()> {
    prctl(libc::PR_SET_SECUREBITS, libc::c_ulong::from(bits)).map(drop)
}

/// `PR_GET_SECUREBITS`.
pub(crate) fn securebits() -> io::Result<u32> {
    prctl(libc::PR_GET_SECUREBITS, 0).map(|b| u32::try_from(b).unwrap_or(0))
}

/// `PR_SET_NO_NEW_PRIVS`: from now on `execve` never grants privileges (irreversible).
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map(drop)
}

/// `PR_GET_NO_NEW_PRIVS`.
pub(crate) fn no_new_privs() -> io::Result<bool> {
    Ok(prctl(libc::PR_GET_NO_NEW_PRIVS, 0)? == 1)
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAP_V3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapSets {
    pub(crate) effective: u64,
    pub(crate) permitted: u64,
    pub(crate) inheritable: u64,
}

/// `capget(2)` for the calling thread.
pub(crate) fn capget() -> io::Result<CapSets> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` is a valid v3 header and `data` has the two elements a v3 call writes;
    // both outlive the call.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// `capset(2)`: empties the effective, permitted and inheritable sets of the calling thread.
/// Dropping capabilities is always permitted.
pub(crate) fn capset_empty() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: `header` is a valid v3 header and `data` holds the two elements a v3 call reads;
    // both outlive the call.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })?;
    Ok(())
}

/// `unshare(2)` with the given `CLONE_NEW*` flags.
pub(crate) fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: integer argument only.
    check(unsafe { libc::unshare(flags) })?;
    Ok(())
}

/// `mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)`: no mount event propagates out of (or
/// into) the calling thread's mount namespace from now on.
pub(crate) fn make_mounts_private() -> io::Result<()> {
    // SAFETY: the target is a static NUL-terminated string; source, type and data are null,
    // which a propagation change ignores.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// `mount(path, path, NULL, MS_BIND | MS_REC, NULL)`: makes `path` a mount point of its own.
pub(crate) fn bind_onto_itself(path: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated string borrowed for the whole call; type and data
    // are null, which a bind mount ignores.
    check(unsafe {
        libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Mounts an empty tmpfs, read-only, mode 000, nosuid, nodev and noexec, over `path`.
pub(crate) fn hide_under_empty_tmpfs(path: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string borrowed for the whole call.
    check(unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            path.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=000,size=4k".as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// `MOUNT_ATTR_RDONLY`.
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` (`MOUNT_ATTR_SIZE_VER0`).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(AT_FDCWD, path, AT_RECURSIVE, {set, clear})` on the mount at `path` and
/// every mount beneath it.
pub(crate) fn set_mount_attrs_recursive(
    path: &std::ffi::CStr,
    set: u64,
    clear: u64,
) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` is a valid VER0 `mount_attr` whose size is
    // passed; both outlive the call and the kernel only reads them.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Writes all of `data` to the file at `path` (opened write-only, close-on-exec), as one
/// `write(2)`: the kernel takes `/proc/<pid>/{uid_map,gid_map,setgroups}` in a single write
/// only.
pub(crate) fn write_proc_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated string borrowed for the whole call.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: `data` is a live slice of `data.len()` readable bytes for the whole call.
    let written = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let result = match usize::try_from(written) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Err(_) => Err(io::Error::last_os_error()),
    };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result
}

/// `geteuid(2)` and `getegid(2)`.
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: no arguments; these calls cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints that outlives the call.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just returned by socketpair(2) and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The size of a descriptor in a control message.
const FD_SIZE: u32 = 4;

/// Room for one descriptor in a control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct OneFdControl([u8; 24]);

/// Sends `byte` on the Unix socket `sock`, with `fd` attached (SCM_RIGHTS) when given. No
/// allocation: safe in a child forked from a multi-threaded process.
fn send_byte_and_fd(sock: libc::c_int, byte: u8, fd: Option<libc::c_int>) -> io::Result<()> {
    let mut data = byte;
    let mut iov = libc::iovec {
        iov_base: std::ptr::addr_of_mut!(data).cast(),
        iov_len: 1,
    };
    let mut control = OneFdControl([0; 24]);
    // SAFETY: an all-zero msghdr is valid (no name, no control) before the fields below are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        let (space, len) = unsafe { (libc::CMSG_SPACE(FD_SIZE), libc::CMSG_LEN(FD_SIZE)) };
        // The field types differ between C libraries (size_t in glibc, socklen_t in musl).
        let invalid = |_| io::Error::from_raw_os_error(libc::EINVAL);
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space.try_into().map_err(invalid)?;
        let len = len.try_into().map_err(invalid)?;
        // SAFETY: the control buffer is aligned for cmsghdr and large enough for one header and
        // one descriptor (CMSG_SPACE(4) is 24 on 64-bit Linux); CMSG_FIRSTHDR points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        }
    }
    // SAFETY: `msg` points at live locals for the whole call.
    check_long(unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } as libc::c_long)?;
    Ok(())
}

/// Receives one byte from the Unix socket `sock`, and the descriptor sent with it if any.
/// `None` at end of file.
pub(crate) fn recv_byte_and_fd(sock: libc::c_int) -> io::Result<Option<(u8, Option<OwnedFd>)>> {
    let mut data = 0u8;
    let mut iov = libc::iovec {
        iov_base: std::ptr::addr_of_mut!(data).cast(),
        iov_len: 1,
    };
    let mut control = OneFdControl([0; 24]);
    // SAFETY: an all-zero msghdr is valid before the fields below are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size (the buffer's: one descriptor).
    let space = unsafe { libc::CMSG_SPACE(FD_SIZE) };
    msg.msg_controllen = space
        .try_into()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = loop {
        // SAFETY: `msg` points at live locals for the whole call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: the kernel filled `control` and set msg_controllen; CMSG_FIRSTHDR/NXTHDR walk it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("a control message was truncated"));
    }
    Ok(Some((data, fd)))
}

/// Forks the holder of a nested user namespace ([`crate::UserNamespace::create`]) and returns
/// its pid. The holder keeps only `ready` (a Unix socket) open, becomes dumpable (so that it
/// may write its own maps through `/proc`), unshares a user namespace, writes `setgroups`
/// "deny", `uid_map` and `gid_map`, becomes non-dumpable again, and sends 0 with a descriptor
/// of its namespace (or an errno, alone) as one byte on `ready`; then waits to be killed.
///
/// The child makes system calls only (no allocation, no lock), so this may be called from a
/// multi-threaded process.
pub(crate) fn fork_userns_holder(
    ready: libc::c_int,
    uid_map: &[u8],
    gid_map: &[u8],
) -> io::Result<libc::pid_t> {
    // SAFETY: the child runs `userns_holder`, which only makes system calls and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => userns_holder(ready, uid_map, gid_map),
        p if p < 0 => Err(io::Error::last_os_error()),
        p => Ok(p),
    }
}

fn userns_holder(ready: libc::c_int, uid_map: &[u8], gid_map: &[u8]) -> ! {
    let fd = u32::try_from(ready).unwrap_or(0);
    let result = (|| {
        // Nothing of the parent's stays open here while this process is dumpable.
        if fd > 0 {
            close_range(0, fd - 1)?;
        }
        close_range(fd + 1, u32::MAX)?;
        set_dumpable(true)?;
        unshare(libc::CLONE_NEWUSER)?;
        write_proc_file(c"/proc/self/setgroups", b"deny")?;
        write_proc_file(c"/proc/self/uid_map", uid_map)?;
        write_proc_file(c"/proc/self/gid_map", gid_map)?;
        // Dumpable only for as long as writing its own maps needs: from here on nothing in
        // the workspace (the agent may run as the same host id) may ptrace it or read its
        // memory (a copy of its creator's) or environment through /proc. Its creator could
        // no longer open /proc/<pid>/ns/user (its memory belongs to the host's user
        // namespace, where it holds no CAP_SYS_PTRACE): the holder sends the namespace itself.
        set_dumpable(false)?;
        open_read(c"/proc/self/ns/user")
    })();
    let sent = match &result {
        Ok(ns) => send_byte_and_fd(ready, 0, Some(std::os::fd::AsRawFd::as_raw_fd(ns))),
        Err(e) => send_byte_and_fd(
            ready,
            u8::try_from(e.raw_os_error().unwrap_or(libc::EIO))
                .unwrap_or(u8::MAX)
                .max(1),
            None,
        ),
    };
    if sent.is_err() || result.is_err() {
        exit_now(1);
    }
    loop {
        // SAFETY: no arguments; returns only when a signal was handled.
        unsafe { libc::pause() };
    }
}

/// `close_range(first, last, 0)`: closes every descriptor in the range.
pub(crate) fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) })?;
    Ok(())
}

/// `prctl(PR_SET_DUMPABLE, dumpable)`.
pub(crate) fn set_dumpable(dumpable: bool) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_DUMPABLE,
            libc::c_ulong::from(dumpable),
            0,
            0,
            0,
        )
    })?;
    Ok(())
}

/// `_exit(2)`.
fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: ends the process without running anything else.
    unsafe { libc::_exit(code) }
}

/// `kill(pid, SIGKILL)` and `waitpid(pid)`.
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: integer arguments; `status` is a live, writable local.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// Opens `path` read-only, close-on-exec.
pub(crate) fn open_read(path: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a NUL-terminated string borrowed for the whole call.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setns(fd, nstype)`.
pub(crate) fn setns(fd: libc::c_int, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setns(fd, nstype) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;

    /// Run by [`the_user_namespace_holder_is_not_dumpable_once_its_maps_are_written`] as
    /// another uid: exits 0 if the holder, ready, is not dumpable (its /proc/<pid>/environ then
    /// belongs to root instead of its own uid).
    #[test]
    #[ignore = "run by the_user_namespace_holder_is_not_dumpable_once_its_maps_are_written"]
    fn holder_check_as_this_uid() {
        let (euid, egid) = effective_ids();
        let (ready_r, ready_w) = socketpair().unwrap();
        let uid_map = format!("1000 {euid} 1\n").into_bytes();
        let gid_map = format!("1000 {egid} 1\n").into_bytes();
        let pid = fork_userns_holder(ready_w.as_raw_fd(), &uid_map, &gid_map).unwrap();
        drop(ready_w);
        let (byte, ns) = recv_byte_and_fd(ready_r.as_raw_fd()).unwrap().unwrap();
        assert_eq!(byte, 0);
        assert!(ns.is_some(), "the holder sent its namespace");
        let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
            .unwrap()
            .uid();
        kill_and_reap(pid);
        assert_eq!(
            owner, 0,
            "the holder is dumpable: its /proc is its uid's ({euid})"
        );
    }

    #[test]
    fn the_user_namespace_holder_is_not_dumpable_once_its_maps_are_written() {
        // A dumpable process's /proc/<pid>/environ belongs to its own uid; a non-dumpable one's to root:
        // visible only from a uid other than root, so the check runs as one.
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "sys::tests::holder_check_as_this_uid",
            "--ignored",
            "--nocapture",
        ]);
        if effective_ids().0 == 0 {
            cmd.uid(65534).gid(65534);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "the check failed: {text}"
        );
    }
}
