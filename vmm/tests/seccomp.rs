//! Seccomp filters, proven on real threads: for every role an allowed call passes and a
//! disallowed one kills the process with SIGSYS. Each case runs in a child process (this test
//! binary re-executed for one test), because the filter cannot be removed once installed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use moat_vmm::seccomp::{Role, install, install_for};
use vmm_sys_util::eventfd::EventFd;

const CHILD: &str = "MOAT_SECCOMP_CHILD";

/// Runs test `name` again in a child with `CHILD` set; returns its exit code or signal.
fn in_child(name: &str) -> (Option<i32>, Option<i32>) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    (out.status.code(), out.status.signal())
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// An eventfd made before any filter is installed (making one is not allowed after).
fn shared_eventfd() -> &'static EventFd {
    static EVT: std::sync::OnceLock<EventFd> = std::sync::OnceLock::new();
    EVT.get_or_init(|| EventFd::new(0).unwrap())
}

/// In the child: confine this thread as `role`, run `call`, exit 0 if it survived.
fn child(role: Role, call: impl FnOnce()) {
    let evt = shared_eventfd();
    install(role).unwrap();
    evt.write(1).unwrap(); // every role may signal an eventfd
    call();
    std::process::exit(0);
}

macro_rules! case {
    ($name:ident, $role:expr, allowed, $call:expr) => {
        #[test]
        fn $name() {
            if is_child() {
                child($role, $call);
            }
            assert_eq!(
                in_child(stringify!($name)),
                (Some(0), None),
                "allowed call must pass"
            );
        }
    };
    ($name:ident, $role:expr, killed, $call:expr) => {
        #[test]
        fn $name() {
            if is_child() {
                child($role, $call);
            }
            assert_eq!(
                in_child(stringify!($name)),
                (None, Some(libc::SIGSYS)),
                "disallowed call must die with SIGSYS"
            );
        }
    };
}

fn open_a_file() {
    let _ = std::fs::File::open("/dev/null");
}

fn open_unix_socket() {
    let _ = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
}

fn open_inet_socket() {
    let _ = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
}

/// `mprotect` on a fresh anonymous page, with `prot` (raw libc: std has no mprotect).
#[allow(unsafe_code)]
fn mprotect(prot: libc::c_int) {
    // SAFETY: a private anonymous mapping of one page, changed and unmapped only here.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED);
        assert_eq!(libc::mprotect(page, 4096, prot), 0);
        libc::munmap(page, 4096);
    }
}

// glibc grows a thread's malloc arena with mprotect(PROT_READ | PROT_WRITE): the block thread
// was killed for it as soon as a real guest read its disks. Every role allocates.
case!(block_may_grow_a_malloc_arena, Role::Block, allowed, || {
    mprotect(libc::PROT_READ | libc::PROT_WRITE);
});
case!(vcpu_may_grow_a_malloc_arena, Role::Vcpu, allowed, || {
    mprotect(libc::PROT_READ | libc::PROT_WRITE);
});
case!(vsock_may_grow_a_malloc_arena, Role::Vsock, allowed, || {
    mprotect(libc::PROT_READ | libc::PROT_WRITE);
});
case!(main_may_grow_a_malloc_arena, Role::Main, allowed, || {
    mprotect(libc::PROT_READ | libc::PROT_WRITE);
});
case!(
    block_may_not_make_memory_executable,
    Role::Block,
    killed,
    || {
        mprotect(libc::PROT_READ | libc::PROT_EXEC);
    }
);
case!(
    vcpu_may_not_make_memory_executable,
    Role::Vcpu,
    killed,
    || {
        mprotect(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC);
    }
);

case!(main_may_signal_and_unlink, Role::Main, allowed, || {
    let _ = std::fs::remove_file("/nonexistent/moat-seccomp-test");
});
case!(main_may_not_open_files, Role::Main, killed, open_a_file);
case!(
    main_may_not_open_sockets,
    Role::Main,
    killed,
    open_unix_socket
);

case!(
    main_may_read_the_terminal_mode_to_restore_it,
    Role::Main,
    allowed,
    || {
        // TCGETS on stdin, as glibc's tcsetattr does after TCSETS.
        let _ = std::io::IsTerminal::is_terminal(&std::io::stdin());
    }
);

case!(
    serial_in_may_run_an_event_manager,
    Role::SerialIn,
    allowed,
    || {
        let em = event_manager::EventManager::<Box<dyn event_manager::MutEventSubscriber>>::new();
        assert!(em.is_ok());
    }
);
case!(
    serial_in_may_not_open_files,
    Role::SerialIn,
    killed,
    open_a_file
);
case!(serial_in_may_not_use_ioctls, Role::SerialIn, killed, || {
    let _ = std::io::IsTerminal::is_terminal(&std::io::stdin());
});
case!(
    serial_in_may_not_open_sockets,
    Role::SerialIn,
    killed,
    open_unix_socket
);

case!(vcpu_may_signal_eventfds, Role::Vcpu, allowed, || {});
case!(vcpu_may_not_open_files, Role::Vcpu, killed, open_a_file);
case!(vcpu_may_not_use_other_ioctls, Role::Vcpu, killed, || {
    // TCGETS on stdin: an ioctl that is not KVM_RUN.
    let _ = std::io::IsTerminal::is_terminal(&std::io::stdin());
});

case!(
    vsock_may_open_unix_sockets,
    Role::Vsock,
    allowed,
    open_unix_socket
);
case!(
    vsock_may_not_open_inet_sockets,
    Role::Vsock,
    killed,
    open_inet_socket
);
case!(vsock_may_not_open_files, Role::Vsock, killed, open_a_file);

case!(block_may_not_open_files, Role::Block, killed, open_a_file);
case!(
    block_may_not_open_sockets,
    Role::Block,
    killed,
    open_unix_socket
);
case!(block_may_poll, Role::Block, allowed, || {
    let _ = vmm_sys_util::epoll::Epoll::new().unwrap();
});

case!(rng_may_poll, Role::Rng, allowed, || {
    let _ = vmm_sys_util::epoll::Epoll::new().unwrap();
});
case!(rng_may_not_open_files, Role::Rng, killed, open_a_file);
#[test]
fn rng_may_not_write_files_it_holds() {
    use std::os::unix::fs::FileExt;
    if is_child() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        install(Role::Rng).unwrap();
        let _ = f.write_at(b"x", 0); // pwrite64: only the block role may
        std::process::exit(0);
    }
    assert_eq!(
        in_child("rng_may_not_write_files_it_holds"),
        (None, Some(libc::SIGSYS))
    );
}

#[test]
fn block_may_write_the_disk_it_holds() {
    use std::os::unix::fs::FileExt;
    if is_child() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        install(Role::Block).unwrap();
        f.write_at(b"x", 0).unwrap();
        std::process::exit(0);
    }
    assert_eq!(
        in_child("block_may_write_the_disk_it_holds"),
        (Some(0), None)
    );
}

#[test]
fn vcpu_may_run_kvm_run() {
    use kvm_ioctls::Kvm;
    if std::fs::metadata("/dev/kvm").is_err() {
        common::skip("/dev/kvm is missing; this case needs real KVM");
        return;
    }
    if is_child() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        install(Role::Vcpu).unwrap();
        // No memory: KVM_RUN fails or exits at once; either way the filter let it through.
        let _ = vcpu.run();
        std::process::exit(0);
    }
    assert_eq!(in_child("vcpu_may_run_kvm_run"), (Some(0), None));
}

/// In the child: confine this thread as `role` of a VM with PCI passthrough, run `call` with
/// a file opened before (standing in for a VFIO device fd).
fn passthrough_child(role: Role, call: impl FnOnce(&std::fs::File)) {
    let device = std::fs::File::open("/dev/null").unwrap();
    shared_eventfd();
    install_for(role, true).unwrap();
    call(&device);
    std::process::exit(0);
}

macro_rules! passthrough_case {
    ($name:ident, $role:expr, $expect:expr, $call:expr) => {
        #[test]
        fn $name() {
            if is_child() {
                passthrough_child($role, $call);
            }
            assert_eq!(in_child(stringify!($name)), $expect);
        }
    };
}

/// `poll` on an eventfd, as the MSI-X PBA read does.
fn poll_an_eventfd() {
    let _ = moat_vmm::vfio::sys::eventfd_is_signalled(shared_eventfd());
}

passthrough_case!(
    passthrough_vcpu_may_poll_msix_eventfds,
    Role::Vcpu,
    (Some(0), None),
    |_| poll_an_eventfd()
);
case!(
    vcpu_without_passthrough_may_not_poll,
    Role::Vcpu,
    killed,
    poll_an_eventfd
);
passthrough_case!(
    passthrough_vcpu_may_pread_a_device_fd,
    Role::Vcpu,
    (Some(0), None),
    |device| {
        let mut b = [0u8; 4];
        let _ = std::os::unix::fs::FileExt::read_at(device, &mut b, 0);
    }
);
passthrough_case!(
    passthrough_vcpu_may_not_open_files,
    Role::Vcpu,
    (None, Some(libc::SIGSYS)),
    |_| open_a_file()
);
passthrough_case!(
    passthrough_block_thread_gains_no_poll,
    Role::Block,
    (None, Some(libc::SIGSYS)),
    |_| poll_an_eventfd()
);

/// A thread to kick, started before the filter (threads inherit their creator's filter).
fn sleeper() -> &'static std::thread::JoinHandle<()> {
    static T: std::sync::OnceLock<std::thread::JoinHandle<()>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        moat_vmm::kvm::vcpu::install_kick_handler().unwrap();
        std::thread::spawn(|| {
            loop {
                std::thread::park();
            }
        })
    })
}

fn kick_before_and_after(role: Role) {
    use vmm_sys_util::signal::Killable;
    let t = sleeper();
    child(role, || {
        t.kill(moat_vmm::kvm::vcpu::kick_signal()).unwrap();
    });
}

#[test]
fn api_may_kick_a_vcpu_thread_out_of_kvm_run() {
    if is_child() {
        kick_before_and_after(Role::Api);
    }
    assert_eq!(
        in_child("api_may_kick_a_vcpu_thread_out_of_kvm_run"),
        (Some(0), None),
        "allowed call must pass"
    );
}

case!(api_may_size_a_snapshot_file, Role::Api, allowed, || {
    // ftruncate on a descriptor it was handed (stdout here: refused by the kernel, allowed
    // by the filter).
    let _ = ftruncate_stdout();
});
case!(api_may_not_open_files, Role::Api, killed, open_a_file);
case!(
    api_may_not_open_sockets,
    Role::Api,
    killed,
    open_unix_socket
);

fn ftruncate_stdout() -> i64 {
    #[allow(unsafe_code)]
    // SAFETY: ftruncate on stdout changes nothing it does not own; the result is ignored.
    unsafe {
        libc::syscall(libc::SYS_ftruncate, 1, 0)
    }
}
