//! Step 8 (last): the seccomp filter.
//!
//! # Why a deny list
//!
//! The agent is arbitrary software (shells, compilers, language runtimes, package managers,
//! browsers), so an allowlist would have to cover nearly every system call and would break
//! agents in ways no test here would notice. The filter therefore allows by default and refuses
//! the known escape routes and the large, rarely needed kernel attack surfaces listed in
//! [`deny_rules`], each with `EPERM` (a clean error the agent can read, not a kill).
//! Landlock, dropped capabilities and `no_new_privs` carry the rest of the confinement; the
//! filter narrows the kernel surface they rely on.
//!
//! A deny list has one classic hole, other system call tables, so the filter starts with a
//! hand-written prefix that runs before the table:
//! - a non-native architecture (for example `int 0x80` i386 calls on x86_64) kills the process;
//! - x32 calls (numbers with bit 30 set, same audit arch as x86_64) are refused with `EPERM`;
//! - `clone3` is refused with `ENOSYS`: its flags live in memory that seccomp cannot read, and
//!   `ENOSYS` makes the C libraries fall back to `clone`, whose flags the table does check.
//!
//! Arguments are compared as 32-bit values (`Dword`), as the kernel reads them: `socket`'s
//! family and type are `int`, so a value with high bits set cannot slip past a 64-bit compare.

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::error::SandboxError;

/// How one argument is compared. A row matches when all of its comparisons hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// The argument equals the value.
    Eq(u32),
    /// The argument differs from the value.
    Ne(u32),
    /// Every bit of the mask is set in the argument.
    BitsSet(u32),
    /// `argument & mask == value`.
    MaskedEq {
        /// Bits compared.
        mask: u32,
        /// Expected value of those bits.
        value: u32,
    },
}

/// One comparison on one system call argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgCheck {
    /// Argument index, 0 to 5.
    pub index: u8,
    /// The comparison.
    pub cmp: Cmp,
}

/// One row of the rule table: a system call, the arguments that make it refused, the errno
/// returned, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyRule {
    /// System call name.
    pub syscall: &'static str,
    /// System call number on this architecture.
    pub nr: i64,
    /// Conditions, all of which must hold; empty means always refused.
    pub when: &'static [ArgCheck],
    /// The errno the call fails with.
    pub errno: i32,
    /// Why the agent must not make this call.
    pub reason: &'static str,
}

const fn arg(index: u8, cmp: Cmp) -> ArgCheck {
    ArgCheck { index, cmp }
}

const fn always(syscall: &'static str, nr: libc::c_long, reason: &'static str) -> DenyRule {
    DenyRule {
        syscall,
        nr,
        when: &[],
        errno: libc::EPERM,
        reason,
    }
}

const fn when(
    syscall: &'static str,
    nr: libc::c_long,
    when: &'static [ArgCheck],
    reason: &'static str,
) -> DenyRule {
    DenyRule {
        syscall,
        nr,
        when,
        errno: libc::EPERM,
        reason,
    }
}

const fn enosys(syscall: &'static str, nr: libc::c_long, reason: &'static str) -> DenyRule {
    DenyRule {
        syscall,
        nr,
        when: &[],
        errno: libc::ENOSYS,
        reason,
    }
}

// Constants written out because libc lacks some of them on musl or as `u32`.
const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const SOCK_TYPE_MASK: u32 = 0xf;
const SOCK_RAW: u32 = 3;
const NETLINK_ROUTE: u32 = 0;
const CLONE_NEWNS: u32 = 0x0002_0000;
const CLONE_NEWCGROUP: u32 = 0x0200_0000;
const CLONE_NEWUTS: u32 = 0x0400_0000;
const CLONE_NEWIPC: u32 = 0x0800_0000;
const CLONE_NEWUSER: u32 = 0x1000_0000;
const CLONE_NEWPID: u32 = 0x2000_0000;
const CLONE_NEWNET: u32 = 0x4000_0000;
const CLONE_NEWTIME: u32 = 0x0000_0080;
/// `PER_LINUX`: the default persona, no flags.
const PER_LINUX: u32 = 0x0000;
/// `PER_LINUX32`: 32-bit `uname` machine (what `linux32`/`setarch i686` set for 32-bit builds).
const PER_LINUX32: u32 = 0x0008;
const PERSONALITY_QUERY: u32 = 0xffff_ffff;
// System calls newer than some libc builds name, by their number (the same on every
// architecture since the unified table, 424 onwards).
/// `statmount` (Linux 6.8).
const SYS_STATMOUNT: libc::c_long = 457;
/// `listmount` (Linux 6.8).
const SYS_LISTMOUNT: libc::c_long = 458;
/// `open_tree_attr` (Linux 6.15).
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;
/// `memfd_secret` (Linux 5.14).
const SYS_MEMFD_SECRET: libc::c_long = 447;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
const TIOCSETD: u32 = 0x5423;

/// The rule table common to every architecture.
#[rustfmt::skip]
static COMMON_RULES: &[DenyRule] = &[
    // --- sockets: only Unix, IPv4/IPv6 (to the TUN) and route netlink ---------------------------
    when("socket", libc::SYS_socket, &[
        arg(0, Cmp::Ne(AF_UNIX)), arg(0, Cmp::Ne(AF_INET)), arg(0, Cmp::Ne(AF_INET6)),
        arg(0, Cmp::Ne(AF_NETLINK)),
    ], "only Unix, IPv4, IPv6 and netlink families: AF_VSOCK would bypass the netstack to the host, AF_PACKET sniffs and forges frames, the rest is unused kernel surface"),
    when("socket", libc::SYS_socket, &[
        arg(0, Cmp::Ne(AF_NETLINK)), arg(1, Cmp::MaskedEq { mask: SOCK_TYPE_MASK, value: SOCK_RAW }),
    ], "SOCK_RAW (IPv4/IPv6) forges packets and bypasses TCP; netlink, conventionally SOCK_RAW, is ruled below"),
    when("socket", libc::SYS_socket, &[
        arg(0, Cmp::Eq(AF_NETLINK)), arg(2, Cmp::Ne(NETLINK_ROUTE)),
    ], "netlink other than NETLINK_ROUTE (audit, uevent, sock_diag, xfrm, netfilter...) leaks host state or reaches privileged subsystems"),
    when("socketpair", libc::SYS_socketpair, &[arg(0, Cmp::Ne(AF_UNIX))],
        "only Unix pairs exist; other families would create a socket of that family first"),
    // --- other processes ------------------------------------------------------------------------
    always("ptrace", libc::SYS_ptrace, "reads and writes other processes' memory and registers"),
    always("process_vm_readv", libc::SYS_process_vm_readv, "reads another process's memory"),
    always("process_vm_writev", libc::SYS_process_vm_writev, "writes another process's memory"),
    always("process_madvise", libc::SYS_process_madvise, "acts on another process's memory through a pidfd"),
    always("pidfd_getfd", libc::SYS_pidfd_getfd, "copies a file descriptor out of another process"),
    always("kcmp", libc::SYS_kcmp, "compares other processes' kernel objects (a kernel pointer ordering leak)"),
    // --- filesystem view ------------------------------------------------------------------------
    always("mount", libc::SYS_mount, "changes the filesystem view Landlock and the read-only root rely on"),
    always("umount2", libc::SYS_umount2, "uncovers what a mount hides"),
    always("pivot_root", libc::SYS_pivot_root, "changes the root of the mount namespace"),
    always("chroot", libc::SYS_chroot, "changes the root directory (a classic confusion of setuid tools)"),
    always("open_tree", libc::SYS_open_tree, "new mount API: clones mount trees"),
    always("move_mount", libc::SYS_move_mount, "new mount API: attaches mounts"),
    always("fsopen", libc::SYS_fsopen, "new mount API: creates filesystem contexts"),
    always("fsconfig", libc::SYS_fsconfig, "new mount API: configures filesystem contexts"),
    always("fsmount", libc::SYS_fsmount, "new mount API: creates mounts"),
    always("fspick", libc::SYS_fspick, "new mount API: reconfigures existing mounts"),
    always("mount_setattr", libc::SYS_mount_setattr, "changes mount attributes (read-only, idmapping)"),
    always("open_tree_attr", SYS_OPEN_TREE_ATTR, "new mount API: clones mount trees and sets their attributes (idmapping) in one call"),
    always("statmount", SYS_STATMOUNT, "describes mounts by id, of other mount namespaces too: the host's layout under the workspace, and new kernel surface agents do not need"),
    always("listmount", SYS_LISTMOUNT, "lists mounts by id, of other mount namespaces too: see statmount"),
    always("open_by_handle_at", libc::SYS_open_by_handle_at, "opens files by handle, bypassing path checks (the 'shocker' escape)"),
    always("name_to_handle_at", libc::SYS_name_to_handle_at, "produces handles for open_by_handle_at and leaks inode identities"),
    always("swapon", libc::SYS_swapon, "adds swap: system state, not the agent's"),
    always("swapoff", libc::SYS_swapoff, "removes swap: system state, not the agent's"),
    always("quotactl", libc::SYS_quotactl, "filesystem quota administration"),
    always("quotactl_fd", libc::SYS_quotactl_fd, "filesystem quota administration"),
    always("acct", libc::SYS_acct, "process accounting to an arbitrary file"),
    // --- namespaces -----------------------------------------------------------------------------
    always("setns", libc::SYS_setns, "joins another namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWNS))], "new mount namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWCGROUP))], "new cgroup namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWUTS))], "new UTS namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWIPC))], "new IPC namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWUSER))], "new user namespace: capabilities inside it reach much more kernel code"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWPID))], "new PID namespace"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWNET))], "new network namespace: netfilter and virtual devices with namespace capabilities"),
    when("unshare", libc::SYS_unshare, &[arg(0, Cmp::BitsSet(CLONE_NEWTIME))], "new time namespace"),
    // In clone's flags the 0x80 bit belongs to the exit signal, and clone cannot create a time
    // namespace, so CLONE_NEWTIME is checked for unshare only.
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWNS))], "new mount namespace"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWCGROUP))], "new cgroup namespace"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWUTS))], "new UTS namespace"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWIPC))], "new IPC namespace"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWUSER))], "new user namespace: capabilities inside it reach much more kernel code"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWPID))], "new PID namespace"),
    when("clone", libc::SYS_clone, &[arg(0, Cmp::BitsSet(CLONE_NEWNET))], "new network namespace: netfilter and virtual devices with namespace capabilities"),
    enosys("clone3", libc::SYS_clone3, "flags are in memory seccomp cannot read; ENOSYS makes libc fall back to clone, checked above"),
    // --- kernel code and kernel-wide state ------------------------------------------------------
    always("bpf", libc::SYS_bpf, "eBPF programs and maps: a large attack surface with a long CVE history"),
    always("perf_event_open", libc::SYS_perf_event_open, "performance counters and kernel tracing: attack surface and side channels"),
    always("kexec_load", libc::SYS_kexec_load, "replaces the running kernel"),
    always("kexec_file_load", libc::SYS_kexec_file_load, "replaces the running kernel"),
    always("init_module", libc::SYS_init_module, "loads kernel code"),
    always("finit_module", libc::SYS_finit_module, "loads kernel code"),
    always("delete_module", libc::SYS_delete_module, "unloads kernel code"),
    always("reboot", libc::SYS_reboot, "halts or reboots the workspace; guest-init owns the lifecycle"),
    always("syslog", libc::SYS_syslog, "reads the kernel log (kernel addresses, other processes' activity)"),
    always("settimeofday", libc::SYS_settimeofday, "the clock is system state"),
    always("clock_settime", libc::SYS_clock_settime, "the clock is system state"),
    always("clock_adjtime", libc::SYS_clock_adjtime, "the clock is system state"),
    always("sethostname", libc::SYS_sethostname, "the hostname belongs to guest-init"),
    always("setdomainname", libc::SYS_setdomainname, "the domain name belongs to guest-init"),
    always("vhangup", libc::SYS_vhangup, "hangs up the terminal of every session on it"),
    always("fanotify_init", libc::SYS_fanotify_init, "filesystem-wide event monitoring"),
    // --- kernel interfaces that are exploit primitives ------------------------------------------
    always("keyctl", libc::SYS_keyctl, "kernel keyrings: not fully namespaced, a long CVE history"),
    always("add_key", libc::SYS_add_key, "kernel keyrings: not fully namespaced, a long CVE history"),
    always("request_key", libc::SYS_request_key, "kernel keyrings; can also upcall to user space helpers"),
    always("memfd_secret", SYS_MEMFD_SECRET, "memory removed from the kernel's direct map: a hiding place for exploit payloads, locked memory outside the memory-accounting paths agents use"),
    always("userfaultfd", libc::SYS_userfaultfd, "stalls kernel page faults at will: a standard race-widening exploit primitive"),
    always("io_uring_setup", libc::SYS_io_uring_setup, "io_uring runs operations seccomp never sees and has a long CVE history"),
    always("io_uring_enter", libc::SYS_io_uring_enter, "io_uring: see io_uring_setup"),
    always("io_uring_register", libc::SYS_io_uring_register, "io_uring: see io_uring_setup"),
    when("personality", libc::SYS_personality, &[
        arg(0, Cmp::Ne(PER_LINUX)), arg(0, Cmp::Ne(PER_LINUX32)), arg(0, Cmp::Ne(PERSONALITY_QUERY)),
    ], "only PER_LINUX, PER_LINUX32 and the query: every flag weakens what the agent executes next (ADDR_NO_RANDOMIZE turns off ASLR, READ_IMPLIES_EXEC makes readable mappings executable, MMAP_PAGE_ZERO maps page zero, ADDR_COMPAT_LAYOUT and the ADDR_LIMIT_* flags shrink the layout's randomness, UNAME26 has leaked kernel stack), and other personas are foreign ABIs"),
    when("ioctl", libc::SYS_ioctl, &[arg(1, Cmp::Eq(TIOCSTI))],
        "TIOCSTI pushes input into the terminal, typing commands into whoever reads it next"),
    when("ioctl", libc::SYS_ioctl, &[arg(1, Cmp::Eq(TIOCLINUX))],
        "TIOCLINUX: virtual console selection and paste, the same injection on a console"),
    when("ioctl", libc::SYS_ioctl, &[arg(1, Cmp::Eq(TIOCSETD))],
        "TIOCSETD changes the line discipline, autoloading rarely used and often buggy kernel code"),
];

/// Rules for system calls that only x86_64 has.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
static ARCH_RULES: &[DenyRule] = &[
    always("iopl", libc::SYS_iopl, "raw I/O port access"),
    always("ioperm", libc::SYS_ioperm, "raw I/O port access"),
    always("modify_ldt", libc::SYS_modify_ldt, "per-process segment descriptors: a repeated source of kernel bugs, unused by agents"),
    always("uselib", libc::SYS_uselib, "obsolete a.out library loader"),
    always("lookup_dcookie", libc::SYS_lookup_dcookie, "kernel profiling interface (oprofile)"),
];

/// Rules for system calls that only x86_64 has.
#[cfg(not(target_arch = "x86_64"))]
static ARCH_RULES: &[DenyRule] = &[];

/// Every rule of the filter, in table order. The arch prefix (non-native architectures killed,
/// x32 refused) comes on top of these; see the module documentation.
pub fn deny_rules() -> impl Iterator<Item = &'static DenyRule> {
    COMMON_RULES.iter().chain(ARCH_RULES.iter())
}

// Classic BPF opcodes (linux/filter.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
// Offsets in struct seccomp_data.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
/// `__X32_SYSCALL_BIT`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xc000_00f3;

const fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn errno_ret(errno: i32) -> u32 {
    RET_ERRNO | (u32::try_from(errno).unwrap_or(1) & 0xffff)
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::SeccompCompile)
}

fn condition(check: &ArgCheck) -> Result<SeccompCondition, SandboxError> {
    let (op, value) = match check.cmp {
        Cmp::Eq(v) => (SeccompCmpOp::Eq, v),
        Cmp::Ne(v) => (SeccompCmpOp::Ne, v),
        Cmp::BitsSet(mask) => (SeccompCmpOp::MaskedEq(u64::from(mask)), mask),
        Cmp::MaskedEq { mask, value } => (SeccompCmpOp::MaskedEq(u64::from(mask)), value),
    };
    SeccompCondition::new(check.index, SeccompCmpArgLen::Dword, op, u64::from(value))
        .map_err(SandboxError::SeccompCompile)
}

/// Compiles the whole filter: the hand-written prefix followed by the table.
pub(crate) fn compile() -> Result<BpfProgram, SandboxError> {
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = BTreeSet::new();
    let mut prefix = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    prefix.extend([
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, errno_ret(libc::EPERM)),
    ]);
    for rule in deny_rules() {
        if rule.errno != libc::EPERM {
            // Rules with another errno are unconditional and live in the prefix.
            if !rule.when.is_empty() {
                return Err(SandboxError::InvalidConfig(
                    "a non-EPERM seccomp rule must be unconditional",
                ));
            }
            let nr = u32::try_from(rule.nr)
                .map_err(|_| SandboxError::InvalidConfig("system call number out of range"))?;
            prefix.extend([
                jump(BPF_JEQ_K, nr, 0, 1),
                stmt(BPF_RET_K, errno_ret(rule.errno)),
            ]);
            continue;
        }
        let chain = eperm.entry(rule.nr).or_default();
        let mixed = if rule.when.is_empty() {
            !unconditional.insert(rule.nr) || !chain.is_empty()
        } else {
            unconditional.contains(&rule.nr)
        };
        if mixed {
            return Err(SandboxError::InvalidConfig(
                "a seccomp rule is both conditional and unconditional, or listed twice",
            ));
        }
        if rule.when.is_empty() {
            continue;
        }
        let conditions = rule
            .when
            .iter()
            .map(condition)
            .collect::<Result<Vec<_>, _>>()?;
        chain.push(SeccompRule::new(conditions).map_err(SandboxError::SeccompCompile)?);
    }
    let filter = SeccompFilter::new(
        eperm,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        target_arch()?,
    )
    .map_err(SandboxError::SeccompCompile)?;
    let table: BpfProgram = filter.try_into().map_err(SandboxError::SeccompCompile)?;
    prefix.extend(table);
    Ok(prefix)
}

/// Installs the compiled filter on the calling thread (no allocation).
pub(crate) fn install(program: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(program).map_err(SandboxError::SeccompInstall)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every system call an agent could escape by (sockets, tracing, mounts, kernel code, keys,
    /// ...) must have a rule.
    #[test]
    fn every_named_escape_route_has_a_rule() {
        let required = [
            "socket",
            "socketpair",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "bpf",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "perf_event_open",
            "unshare",
            "setns",
            "clone",
            "clone3",
            "open_by_handle_at",
            "name_to_handle_at",
            "swapon",
            "swapoff",
            "reboot",
            "acct",
            "quotactl",
            "personality",
            "syslog",
            "open_tree_attr",
            "statmount",
            "listmount",
            "memfd_secret",
        ];
        let missing: Vec<_> = required
            .iter()
            .filter(|name| !deny_rules().any(|r| r.syscall == **name))
            .collect();
        assert!(missing.is_empty(), "no rule for {missing:?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_only_escape_routes_have_a_rule() {
        for name in ["iopl", "ioperm", "lookup_dcookie"] {
            assert!(deny_rules().any(|r| r.syscall == name), "{name}");
        }
    }

    #[test]
    fn every_rule_has_a_reason_and_a_clean_errno() {
        for rule in deny_rules() {
            assert!(rule.reason.len() > 10, "{}", rule.syscall);
            assert!(
                [libc::EPERM, libc::ENOSYS].contains(&rule.errno),
                "{}",
                rule.syscall
            );
            assert!(rule.when.iter().all(|c| c.index < 6), "{}", rule.syscall);
        }
    }

    #[test]
    fn the_filter_compiles_and_starts_with_the_arch_check() {
        let program = compile().expect("compile");
        assert!(program.len() < 4096);
        assert_eq!(program[0], stmt(BPF_LD_W_ABS, DATA_ARCH));
        assert_eq!(program[1], jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0));
        assert_eq!(program[2], stmt(BPF_RET_K, RET_KILL_PROCESS));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_prefix_refuses_x32_before_the_table() {
        let program = compile().expect("compile");
        assert_eq!(program[3], stmt(BPF_LD_W_ABS, DATA_NR));
        assert_eq!(program[4], jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
        assert_eq!(program[5], stmt(BPF_RET_K, RET_ERRNO | 1));
    }
}
