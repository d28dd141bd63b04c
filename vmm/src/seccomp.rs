//! Per-thread seccomp filters: every thread role gets its own allow-list, installed by the
//! thread itself before it touches guest data (vCPU threads before their first KVM_RUN, device
//! threads before they accept their first activation, the main thread once the machine runs).
//! Anything else kills the process with SIGSYS.
//!
//! Each allowed syscall carries a one-line reason. Filters stack: a thread created after its
//! parent installed a filter inherits it, so device threads are created by the main thread at
//! start-up, before any filter exists.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `ioctl(vcpu, KVM_RUN)`.
const KVM_RUN: u64 = 0xae80;
/// `ioctl(vcpu, KVM_GET_REGS)`: `_IOR(KVMIO, 0x81, struct kvm_regs)` (144 bytes).
const KVM_GET_REGS: u64 = 0x8090_ae81;
/// `ioctl(vcpu, KVM_KVMCLOCK_CTRL)`: `_IO(KVMIO, 0xad)`.
const KVM_KVMCLOCK_CTRL: u64 = 0xaead;
/// `ioctl(fd, TCGETS)`: `tcgetattr`.
const TCGETS: u64 = 0x5401;
/// `ioctl(fd, TCSETS)`: `tcsetattr(TCSANOW)`.
const TCSETS: u64 = 0x5402;
/// `ioctl(fd, FIONBIO)`.
const FIONBIO: u64 = 0x5421;
/// `ioctl(vm, KVM_SET_GSI_ROUTING)`: `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)` (8 bytes).
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
/// `ioctl(vm, KVM_IRQFD)`: `_IOW(KVMIO, 0x76, struct kvm_irqfd)` (32 bytes).
const KVM_IRQFD: u64 = 0x4020_ae76;
/// `ioctl(vm, KVM_SET_USER_MEMORY_REGION)`: `_IOW(KVMIO, 0x46, ...)` (32 bytes).
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
/// `ioctl(device, VFIO_DEVICE_SET_IRQS)`: `_IO(VFIO_TYPE, VFIO_BASE + 10)`.
const VFIO_DEVICE_SET_IRQS: u64 = 0x3b6e;
/// `ioctl(device, VFIO_DEVICE_RESET)`: `_IO(VFIO_TYPE, VFIO_BASE + 11)`.
const VFIO_DEVICE_RESET: u64 = 0x3b6f;

/// `_IOC(dir, KVMIO, nr, size)` as the kernel's ioctl.h builds it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    dir << 30 | (size as u64) << 16 | 0xae << 8 | nr
}
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;

/// The vCPU ioctls a snapshot reads its state with (`KVM_GET_REGS` is allowed anyway), and
/// the one a paused vCPU tells its guest with.
const KVM_VCPU_SNAPSHOT: [(u64, &str); 9] = [
    (
        KVM_KVMCLOCK_CTRL,
        "KVM_KVMCLOCK_CTRL: telling a paused guest's kvmclock the host stopped it",
    ),
    (
        kvm_ioc(IOC_READ, 0x83, size_of::<kvm_bindings::kvm_sregs>()),
        "KVM_GET_SREGS: a snapshot's special registers",
    ),
    (
        kvm_ioc(IOC_READ_WRITE, 0x88, size_of::<kvm_bindings::kvm_msrs>()),
        "KVM_GET_MSRS: a snapshot's MSRs",
    ),
    (
        kvm_ioc(IOC_READ, 0x8e, size_of::<kvm_bindings::kvm_lapic_state>()),
        "KVM_GET_LAPIC: a snapshot's local APIC",
    ),
    (
        kvm_ioc(IOC_READ, 0x98, size_of::<kvm_bindings::kvm_mp_state>()),
        "KVM_GET_MP_STATE: a snapshot's run state",
    ),
    (
        kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_bindings::kvm_vcpu_events>()),
        "KVM_GET_VCPU_EVENTS: a snapshot's pending events",
    ),
    (
        kvm_ioc(IOC_READ, 0xa1, size_of::<kvm_bindings::kvm_debugregs>()),
        "KVM_GET_DEBUGREGS: a snapshot's debug registers",
    ),
    (
        kvm_ioc(IOC_READ, 0xa4, size_of::<kvm_bindings::kvm_xsave>()),
        "KVM_GET_XSAVE: a snapshot's FPU, SSE and AVX state",
    ),
    (
        kvm_ioc(IOC_READ, 0xa6, size_of::<kvm_bindings::kvm_xcrs>()),
        "KVM_GET_XCRS: a snapshot's XCR0",
    ),
];

/// The VM ioctls a snapshot reads the in-kernel devices with (on the API thread).
const KVM_VM_SNAPSHOT: [(u64, &str); 3] = [
    (
        kvm_ioc(IOC_READ_WRITE, 0x62, size_of::<kvm_bindings::kvm_irqchip>()),
        "KVM_GET_IRQCHIP: a snapshot's PICs and IOAPIC",
    ),
    (
        kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_bindings::kvm_pit_state2>()),
        "KVM_GET_PIT2: a snapshot's PIT",
    ),
    (
        kvm_ioc(IOC_READ, 0x7c, size_of::<kvm_bindings::kvm_clock_data>()),
        "KVM_GET_CLOCK: a snapshot's kvmclock",
    ),
];

/// What a VM needs beyond the base filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// PCI devices are passed through (VFIO, or the tests' fake one).
    pub passthrough: bool,
    /// The control socket may pause and snapshot the VM: vCPU threads read their own state.
    pub snapshot: bool,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rules do not compile.
    #[error("cannot build the seccomp filter for {0:?}")]
    Build(Role, #[source] seccompiler::BackendError),
    /// The filter does not translate to BPF.
    #[error("cannot compile the seccomp filter for {0:?}")]
    Compile(Role, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for {0:?}")]
    Install(Role, #[source] seccompiler::Error),
}

/// Thread roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The main thread once the VM runs: waits for an exit reason, cleans up, exits.
    Main,
    /// A vCPU thread: KVM_RUN and device register emulation.
    Vcpu,
    /// The vsock device thread: its event loop, Unix sockets.
    Vsock,
    /// A block device thread: positioned reads and writes on its disk.
    Block,
    /// The rng device thread: reads from the entropy file it was given.
    Rng,
    /// The console input thread: reads stdin, or a descriptor handed over the control
    /// socket, into COM1's receive FIFO.
    SerialIn,
    /// The control socket's thread: pause, resume, snapshot.
    Api,
}

impl Role {
    /// Every role, for tests.
    pub const ALL: [Role; 7] = [
        Role::Main,
        Role::Vcpu,
        Role::Vsock,
        Role::Block,
        Role::Rng,
        Role::SerialIn,
        Role::Api,
    ];
}

/// A syscall, the conditions on it (empty: any arguments) and why it is allowed.
type Allow = (i64, Vec<SeccompRule>, &'static str);

fn any(nr: i64, why: &'static str) -> Allow {
    (nr, Vec::new(), why)
}

fn arg_eq(
    nr: i64,
    arg: u8,
    value: u64,
    why: &'static str,
) -> Result<Allow, seccompiler::BackendError> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
    Ok((nr, vec![SeccompRule::new(vec![cond])?], why))
}

/// `mprotect(addr, len, prot)` unless `prot` has `PROT_EXEC`: glibc's malloc grows a thread's
/// arena (every thread that allocates gets one) by `mprotect`ing more of the arena's reserved
/// heap read-write, so any thread may need it once a guest keeps it busy (the block thread did
/// as soon as a real guest mounted and read its disks). Nothing in the VMM makes memory
/// executable, so that stays forbidden.
fn mprotect_without_exec() -> Result<Allow, seccompiler::BackendError> {
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    let cond = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(prot_exec),
        0,
    )?;
    Ok((
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![cond])?],
        "the allocator: glibc grows malloc arenas with mprotect (never PROT_EXEC)",
    ))
}

/// What every thread needs to live and die in a Rust process.
fn common() -> Result<Vec<Allow>, seccompiler::BackendError> {
    Ok(vec![
        any(libc::SYS_futex, "mutexes, channels, thread joins"),
        any(libc::SYS_read, "eventfds (and the rng's entropy file)"),
        any(
            libc::SYS_write,
            "eventfds, irqfds, logs on stderr, the serial console",
        ),
        any(libc::SYS_close, "dropping fds"),
        any(libc::SYS_mmap, "the allocator"),
        any(libc::SYS_munmap, "the allocator, thread exit"),
        any(libc::SYS_mremap, "the allocator"),
        any(libc::SYS_brk, "the allocator"),
        any(libc::SYS_madvise, "the allocator, thread exit"),
        any(libc::SYS_rt_sigreturn, "returning from a signal handler"),
        any(libc::SYS_rt_sigprocmask, "thread exit"),
        any(
            libc::SYS_sigaltstack,
            "thread exit tears down the signal stack",
        ),
        any(libc::SYS_sched_yield, "spin loops in std"),
        any(
            libc::SYS_clock_gettime,
            "timestamps when the vDSO is unavailable",
        ),
        any(libc::SYS_restart_syscall, "restarted futex waits"),
        any(libc::SYS_exit, "thread exit"),
        any(libc::SYS_exit_group, "process exit"),
        mprotect_without_exec()?,
    ])
}

/// `fcntl(fd, F_GETFD)`: std's debug builds check an fd is open before closing it.
fn fcntl_getfd() -> Result<Allow, seccompiler::BackendError> {
    arg_eq(
        libc::SYS_fcntl,
        1,
        u64::try_from(libc::F_GETFD).unwrap_or(1),
        "F_GETFD: std checks fds before closing them",
    )
}

/// What a device thread's event-manager loop needs.
fn event_loop() -> Vec<Allow> {
    vec![
        any(
            libc::SYS_epoll_create1,
            "each activation builds its own EventManager (an epoll set)",
        ),
        any(
            libc::SYS_epoll_ctl,
            "registering queue, kill and socket fds",
        ),
        any(libc::SYS_epoll_wait, "the device loop"),
        any(
            libc::SYS_epoll_pwait,
            "the device loop (libc may use pwait)",
        ),
        any(
            libc::SYS_getrandom,
            "hash map seeds: EventManager's fd and subscriber maps, vsock's connection table",
        ),
    ]
}

/// What a role needs on top when the VM has PCI passthrough devices (VFIO, or the fake one of
/// the tests). Only vCPU threads (which emulate the devices' registers) and the main thread
/// (which stops them) get any of it.
fn passthrough_rules(role: Role) -> Result<Vec<Allow>, seccompiler::BackendError> {
    Ok(match role {
        Role::Vcpu => vec![
            arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_SET_GSI_ROUTING,
                "KVM_SET_GSI_ROUTING: the guest (re)programs an MSI-X vector",
            )?,
            arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_IRQFD,
                "KVM_IRQFD: masking and unmasking an MSI-X vector detaches and attaches its irqfd",
            )?,
            arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_SET_USER_MEMORY_REGION,
                "KVM_SET_USER_MEMORY_REGION: the guest moves a BAR whose mmap is a memory slot",
            )?,
            arg_eq(
                libc::SYS_ioctl,
                1,
                VFIO_DEVICE_SET_IRQS,
                "VFIO_DEVICE_SET_IRQS: the guest enables or disables MSI-X",
            )?,
            any(
                libc::SYS_pread64,
                "configuration space and trapped BARs, read through the VFIO device fd",
            ),
            any(
                libc::SYS_pwrite64,
                "configuration space and trapped BARs, written through the VFIO device fd",
            ),
            any(
                libc::SYS_poll,
                "the MSI-X PBA: whether a masked vector's eventfd holds a signal",
            ),
        ],
        Role::Main => vec![
            arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_IRQFD,
                "KVM_IRQFD: detaching MSI-X irqfds when the VM stops",
            )?,
            arg_eq(
                libc::SYS_ioctl,
                1,
                VFIO_DEVICE_SET_IRQS,
                "VFIO_DEVICE_SET_IRQS: MSI-X off when the VM stops",
            )?,
            arg_eq(
                libc::SYS_ioctl,
                1,
                VFIO_DEVICE_RESET,
                "VFIO_DEVICE_RESET: passthrough devices are reset when the VM stops",
            )?,
        ],
        Role::Vsock | Role::Block | Role::Rng | Role::SerialIn | Role::Api => Vec::new(),
    })
}

/// What a vCPU thread needs on top when the VM can be snapshotted: reading its own state.
fn snapshot_rules(role: Role) -> Result<Vec<Allow>, seccompiler::BackendError> {
    let mut rules = Vec::new();
    if role == Role::Vcpu {
        for (nr, why) in KVM_VCPU_SNAPSHOT {
            rules.push(arg_eq(libc::SYS_ioctl, 1, nr, why)?);
        }
    }
    Ok(rules)
}

/// The control socket's thread.
fn api_rules() -> Result<Vec<Allow>, seccompiler::BackendError> {
    let mut rules = vec![
        any(libc::SYS_accept4, "control clients on --api-sock"),
        any(
            libc::SYS_recvmsg,
            "requests, and the snapshot files' descriptors (SCM_RIGHTS)",
        ),
        any(libc::SYS_sendto, "answers"),
        any(libc::SYS_setsockopt, "a read timeout on each client"),
        any(libc::SYS_getpid, "pthread_kill names the process"),
        any(
            libc::SYS_tgkill,
            "kicking vCPU threads out of KVM_RUN to pause",
        ),
        any(libc::SYS_pwrite64, "guest memory into the memory file"),
        any(libc::SYS_ftruncate, "sizing the snapshot files"),
        any(libc::SYS_lseek, "rewinding the state file"),
        any(libc::SYS_fsync, "the snapshot is on disk before OK"),
        arg_eq(
            libc::SYS_fcntl,
            1,
            u64::try_from(libc::F_DUPFD_CLOEXEC).unwrap_or(0),
            "resuming a device hands it duplicates of its queue eventfds",
        )?,
    ];
    for (nr, why) in KVM_VM_SNAPSHOT {
        rules.push(arg_eq(libc::SYS_ioctl, 1, nr, why)?);
    }
    Ok(rules)
}

fn role_rules(role: Role, extras: Extras) -> Result<Vec<Allow>, seccompiler::BackendError> {
    let mut rules = common()?;
    if extras.passthrough {
        rules.extend(passthrough_rules(role)?);
    }
    if extras.snapshot {
        rules.extend(snapshot_rules(role)?);
    }
    if role != Role::Vsock {
        rules.push(fcntl_getfd()?);
    }
    match role {
        Role::Main => {
            rules.push(any(libc::SYS_unlink, "removing the vsock socket at exit"));
            rules.push(any(
                libc::SYS_lseek,
                "--stats re-reads /proc/self files opened earlier",
            ));
            rules.push(arg_eq(
                libc::SYS_ioctl,
                1,
                TCSETS,
                "TCSETS: restoring the host terminal's mode at exit (raw console only)",
            )?);
            rules.push(arg_eq(
                libc::SYS_ioctl,
                1,
                TCGETS,
                "TCGETS: glibc's tcsetattr reads the mode back to check it",
            )?);
        }
        Role::Vcpu => {
            rules.push(arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_RUN,
                "KVM_RUN (and KVM_GET_REGS below), nothing else",
            )?);
            rules.push(arg_eq(
                libc::SYS_ioctl,
                1,
                KVM_GET_REGS,
                "KVM_GET_REGS: the guest RIP in a crash report",
            )?);
            rules.push(arg_eq(
                libc::SYS_fcntl,
                1,
                u64::try_from(libc::F_DUPFD_CLOEXEC).unwrap_or(0),
                "DRIVER_OK: the transport hands the device duplicates of its queue eventfds",
            )?);
        }
        Role::Vsock => {
            rules.extend(event_loop());
            rules.push(arg_eq(
                libc::SYS_socket,
                0,
                u64::try_from(libc::AF_UNIX).unwrap_or(1),
                "Unix sockets only: guest connections to <uds>_P",
            )?);
            rules.push(any(libc::SYS_connect, "connecting to <uds>_P"));
            rules.push(any(libc::SYS_accept4, "host clients on <uds>"));
            rules.push(any(libc::SYS_shutdown, "half-closing host streams"));
            rules.push(any(libc::SYS_sendto, "writing host streams"));
            rules.push(any(libc::SYS_recvfrom, "reading host streams"));
            rules.push(any(libc::SYS_sendmsg, "writing host streams"));
            rules.push(any(libc::SYS_recvmsg, "reading host streams"));
            rules.push(arg_eq(
                libc::SYS_ioctl,
                1,
                FIONBIO,
                "making sockets non-blocking",
            )?);
            rules.push(any(
                libc::SYS_fcntl,
                "duplicating the listener, socket flags",
            ));
        }
        Role::Block => {
            rules.extend(event_loop());
            rules.push(any(libc::SYS_pread64, "reading the disk"));
            rules.push(any(libc::SYS_pwrite64, "writing the disk"));
            rules.push(any(libc::SYS_fdatasync, "FLUSH"));
        }
        Role::Rng => {
            rules.extend(event_loop());
        }
        Role::SerialIn => {
            // read (stdin, its eventfd) and write (COM1's irqfd) are in `common`.
            rules.extend(event_loop());
        }
        Role::Api => rules.extend(api_rules()?),
    }
    Ok(rules)
}

/// The documented allow-list of `role`: (syscall number, reason).
pub fn allow_list(role: Role) -> Vec<(i64, &'static str)> {
    allow_list_for(role, false)
}

/// The allow-list of `role` in a VM with (`passthrough`) or without PCI passthrough.
pub fn allow_list_for(role: Role, passthrough: bool) -> Vec<(i64, &'static str)> {
    allow_list_with(
        role,
        Extras {
            passthrough,
            snapshot: false,
        },
    )
}

/// The allow-list of `role` in a VM that needs `extras`.
pub fn allow_list_with(role: Role, extras: Extras) -> Vec<(i64, &'static str)> {
    role_rules(role, extras)
        .map(|r| r.into_iter().map(|(nr, _, why)| (nr, why)).collect())
        .unwrap_or_default()
}

/// The compiled filter of `role`.
pub fn filter(role: Role) -> Result<BpfProgram, Error> {
    filter_for(role, false)
}

/// The compiled filter of `role`, with the passthrough additions when `passthrough`.
pub fn filter_for(role: Role, passthrough: bool) -> Result<BpfProgram, Error> {
    filter_with(
        role,
        Extras {
            passthrough,
            snapshot: false,
        },
    )
}

/// The compiled filter of `role` in a VM that needs `extras`.
pub fn filter_with(role: Role, extras: Extras) -> Result<BpfProgram, Error> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, rules, _) in role_rules(role, extras).map_err(|e| Error::Build(role, e))? {
        map.entry(nr).or_default().extend(rules);
    }
    let f = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Build(role, e))?;
    f.try_into().map_err(|e| Error::Compile(role, e))
}

/// Installs `role`'s filter on the calling thread.
pub fn install(role: Role) -> Result<(), Error> {
    install_for(role, false)
}

/// Installs `role`'s filter, with the passthrough additions when the VM has PCI devices.
pub fn install_for(role: Role, passthrough: bool) -> Result<(), Error> {
    let prog = filter_for(role, passthrough)?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Install(role, e))
}

/// Installs `role`'s filter in a VM that needs `extras`.
pub fn install_with(role: Role, extras: Extras) -> Result<(), Error> {
    let prog = filter_with(role, extras)?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Install(role, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in Role::ALL {
            assert!(filter(role).is_ok(), "{role:?}");
            assert!(filter_for(role, true).is_ok(), "{role:?} with passthrough");
        }
    }

    /// `_IOW(type, nr, size)` and `_IO(type, nr)` as the kernel's ioctl.h builds them.
    fn iow(ty: u64, nr: u64, size: usize) -> u64 {
        1 << 30 | (size as u64) << 16 | ty << 8 | nr
    }

    #[test]
    fn passthrough_ioctl_numbers_match_the_kernel_structures() {
        use std::mem::size_of;
        assert_eq!(
            KVM_SET_GSI_ROUTING,
            iow(0xae, 0x6a, size_of::<kvm_bindings::kvm_irq_routing>())
        );
        assert_eq!(
            KVM_IRQFD,
            iow(0xae, 0x76, size_of::<kvm_bindings::kvm_irqfd>())
        );
        assert_eq!(
            KVM_SET_USER_MEMORY_REGION,
            iow(
                0xae,
                0x46,
                size_of::<kvm_bindings::kvm_userspace_memory_region>()
            )
        );
        assert_eq!(VFIO_DEVICE_SET_IRQS, u64::from(b';') << 8 | (100 + 10));
        assert_eq!(VFIO_DEVICE_RESET, u64::from(b';') << 8 | (100 + 11));
    }

    #[test]
    fn only_vcpu_and_main_threads_gain_anything_with_passthrough() {
        for role in Role::ALL {
            let gained = allow_list_for(role, true).len() - allow_list(role).len();
            let expected = matches!(role, Role::Vcpu | Role::Main);
            assert_eq!(gained > 0, expected, "{role:?}");
        }
    }

    #[test]
    fn passthrough_never_opens_files() {
        for role in Role::ALL {
            for nr in [libc::SYS_open, libc::SYS_openat] {
                assert!(!allow_list_for(role, true).iter().any(|(n, _)| *n == nr));
            }
        }
    }

    #[test]
    fn snapshot_ioctl_numbers_match_the_kernel_structures() {
        // The constants as the kernel's headers print them (x86_64).
        let vcpu: Vec<u64> = KVM_VCPU_SNAPSHOT.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            vcpu,
            [
                0xaead,      // KVM_KVMCLOCK_CTRL
                0x8138_ae83, // KVM_GET_SREGS
                0xc008_ae88, // KVM_GET_MSRS
                0x8400_ae8e, // KVM_GET_LAPIC
                0x8004_ae98, // KVM_GET_MP_STATE
                0x8040_ae9f, // KVM_GET_VCPU_EVENTS
                0x8080_aea1, // KVM_GET_DEBUGREGS
                0x9000_aea4, // KVM_GET_XSAVE
                0x8188_aea6, // KVM_GET_XCRS
            ]
        );
        let vm: Vec<u64> = KVM_VM_SNAPSHOT.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            vm,
            [
                0xc208_ae62, // KVM_GET_IRQCHIP
                0x8070_ae9f, // KVM_GET_PIT2
                0x8030_ae7c, // KVM_GET_CLOCK
            ]
        );
    }

    #[test]
    fn only_vcpu_threads_gain_anything_with_snapshots() {
        let snap = Extras {
            passthrough: false,
            snapshot: true,
        };
        for role in Role::ALL {
            let gained = allow_list_with(role, snap).len() - allow_list(role).len();
            assert_eq!(gained > 0, role == Role::Vcpu, "{role:?}");
        }
    }

    #[test]
    fn the_api_thread_writes_only_through_descriptors_it_was_handed() {
        let api = allow_list(Role::Api);
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_unlink,
            libc::SYS_execve,
        ] {
            assert!(!api.iter().any(|(n, _)| *n == nr), "{nr}");
        }
    }

    #[test]
    fn every_allowed_syscall_has_a_reason() {
        for role in Role::ALL {
            assert!(allow_list(role).iter().all(|(_, why)| !why.is_empty()));
        }
    }

    #[test]
    fn only_the_vsock_thread_may_open_sockets() {
        for role in Role::ALL {
            let has = allow_list(role)
                .iter()
                .any(|(nr, _)| *nr == libc::SYS_socket);
            assert_eq!(has, role == Role::Vsock, "{role:?}");
        }
    }

    #[test]
    fn no_role_may_open_files_or_exec() {
        for role in Role::ALL {
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_fork,
            ] {
                assert!(
                    !allow_list(role).iter().any(|(n, _)| *n == nr),
                    "{role:?} {nr}"
                );
            }
        }
    }
}
