//! Test-only probes: the raw system calls the tests attempt after confinement, the sentinel
//! seccomp filter, and an allocation counter.
//!
//! The only `unsafe` of the test tree lives here. Every probe passes integers or null
//! pointers only: the sentinel (below) guarantees that the refused calls never reach the
//! kernel, and the allowed ones take no memory from us.
#![allow(unsafe_code)]

use std::collections::BTreeMap;

use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

/// The errno the sentinel filter answers with. Nothing else in these tests returns it.
pub const SENTINEL_ERRNO: i32 = libc::EHWPOISON;

/// Installs, BEFORE `confine`, a filter that answers `nr` with `EHWPOISON`, whatever the
/// arguments.
///
/// The kernel runs every stacked filter and keeps the highest-precedence action; between
/// two `SECCOMP_RET_ERRNO` results it keeps the data of the most recently installed filter
/// (Documentation/userspace-api/seccomp_filter.rst; `seccomp_run_filters` walks from the
/// newest filter and only replaces on a strictly higher precedence). `confine`'s filter is
/// installed after this one, so:
/// - if `confine` refuses the call, the probe sees `confine`'s errno (`EPERM`);
/// - if it does not, the probe sees `EHWPOISON`;
///
/// and in both cases the call never runs. That is what makes it safe to probe `AF_VSOCK`
/// (whose sockets on these hosts lead to infrastructure that is not ours), `reboot`,
/// `kexec_load` or `clone(CLONE_NEWUSER)` on the host, and what tells a refusal by
/// `confine`'s filter apart from an `EPERM` for missing capabilities.
pub fn install_sentinel(nr: i64) -> Result<(), String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let rules = BTreeMap::from([(nr, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(SENTINEL_ERRNO.unsigned_abs()),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(|e| format!("{e:?}"))?;
    seccompiler::apply_filter(&program).map_err(|e| e.to_string())
}

/// `syscall(nr, args...)`: `Ok(return value)` or `Err(errno)`.
pub fn raw_syscall(nr: i64, args: [u64; 6]) -> Result<i64, i32> {
    // SAFETY: the tests pass integers and null pointers only (see the module docs); the
    // kernel validates every pointer argument and no Rust-owned memory is handed over.
    let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if rc == -1 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

/// `socket(family, type, protocol)`, closing the socket again on success.
pub fn socket(family: i32, ty: i32, protocol: i32) -> Result<(), i32> {
    let to_u64 = |v: i32| u64::from(v.cast_unsigned());
    let fd = raw_syscall(
        libc::SYS_socket,
        [to_u64(family), to_u64(ty), to_u64(protocol), 0, 0, 0],
    )?;
    close(fd);
    Ok(())
}

/// `socketpair(family, SOCK_STREAM, 0, NULL)` is enough to probe the filter, but an allowed
/// call needs a real array: this one passes it and closes both ends.
pub fn socketpair(family: i32) -> Result<(), i32> {
    let mut fds = [-1_i32; 2];
    // SAFETY: `fds` is a valid two-element array that outlives the call.
    let rc = unsafe { libc::socketpair(family, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    fds.iter().for_each(|fd| close(i64::from(*fd)));
    Ok(())
}

/// Closes a descriptor returned by a probe.
fn close(fd: i64) {
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: `fd` was just returned to this probe by the kernel and is not used again.
        unsafe { libc::close(fd) };
    }
}

/// `kill(pid, 0)`: only checks whether a signal could be sent.
pub fn kill_probe(pid: u32) -> Result<(), i32> {
    let pid = i32::try_from(pid).map_err(|_| libc::EINVAL)?;
    // SAFETY: integer arguments; signal 0 sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc == -1 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// `setresuid(0, 0, 0)`.
pub fn become_root() -> Result<(), i32> {
    // The raw system call, for the calling thread alone, as the sandbox changes the ids (see
    // its `sys` module): glibc's wrapper would also ask the harness's other threads, which
    // were never confined, and abort when their answers differ.
    // SAFETY: integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) };
    if rc == -1 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// i386 `getpid` through `int 0x80`, a non-native system call table on x86_64.
#[cfg(target_arch = "x86_64")]
pub fn i386_getpid() -> i64 {
    let ret: i64;
    // SAFETY: `int 0x80` with eax = 20 is the i386 getpid, which takes no arguments and
    // touches no memory. The compat entry may zero r8-r15 on return, so they are declared
    // clobbered; rbx, rcx, rdx, rsi, rdi and rbp are preserved by the kernel.
    unsafe {
        std::arch::asm!(
            "int 0x80",
            inlateout("rax") 20_i64 => ret,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
    ret
}

/// The kernel's Landlock ABI version (0 without Landlock).
pub fn landlock_abi() -> u32 {
    moat_host_probe::landlock_abi()
}

/// Counts the allocations of the current thread, to prove that `Sandbox::apply` makes none.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: every method forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local `Cell` without destructor, which never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout, as the caller's contract requires.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (see `alloc`).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: `ptr` was allocated by `System` with this layout (see `alloc`).
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

pub fn allocations() -> usize {
    ALLOCATIONS.with(std::cell::Cell::get)
}
