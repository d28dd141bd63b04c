//! Every confinement rule proven in a child process.
//!
//! Each test re-runs this test binary as a child (`probe_child`, selected with an environment
//! variable). The child confines itself with `moat_guest_sandbox::confine` and then attempts
//! one operation; its exit code is the errno it got (0: the operation succeeded). The parent
//! asserts that errno: `EPERM` for a seccomp refusal, `EACCES` for a Landlock filesystem
//! refusal, 0 for what must keep working.
//!
//! Seccomp probes install a sentinel filter first (see `support::install_sentinel`): a probe
//! whose rule is missing sees `EHWPOISON` instead of `EPERM`, and no refused call (AF_VSOCK
//! included) ever reaches the host kernel.
//!
//! Run with `cargo test -p moat-guest-sandbox` (as root, like CI: the tests drop to uid 65534
//! and check the capability bounding set).
#![allow(clippy::expect_used)]

mod support;

use std::io::Write as _;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_guest_sandbox::{
    Cmp, Isolation, Sandbox, SandboxConfig, SandboxError, UserNamespace, confine, deny_rules,
};

const PROBE_ENV: &str = "MOAT_SANDBOX_PROBE";
const WRITABLE_ENV: &str = "MOAT_SANDBOX_WRITABLE";
const SCRIPT_ENV: &str = "MOAT_SANDBOX_SCRIPT";

/// Exit codes of the child that are not errnos.
const CONFINE_FAILED: i32 = 200;
const SETUP_FAILED: i32 = 201;
const BAD_PROBE: i32 = 202;
/// Printed by the child once its probe ran, so that a child that never reached the probe
/// (and exited 0 from the test harness) cannot pass for "the operation succeeded".
const PROBE_RAN: &str = "moat-probe-ran";

const AF_VSOCK: i32 = 40;
const NETLINK_SOCK_DIAG: i32 = 4;
const NETLINK_AUDIT: i32 = 9;
const NETLINK_KOBJECT_UEVENT: i32 = 15;
const X32_GETPID: i64 = 0x4000_0000 + 39;

// ---------------------------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "the child half of the other tests; they run it in a separate process"]
fn probe_child() {
    let Ok(probe) = std::env::var(PROBE_ENV) else {
        return;
    };
    let writable = std::env::var(WRITABLE_ENV).map(PathBuf::from).ok();
    let code = run_probe(&probe, writable.as_deref());
    println!("\n{PROBE_RAN}");
    std::io::stdout().flush().ok();
    std::process::exit(code);
}

fn errno_code(result: Result<impl Sized, i32>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(errno) => errno,
    }
}

fn io_code<T>(result: std::io::Result<T>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(BAD_PROBE),
    }
}

/// The child's configuration: the default one, with the writable directory of the test (and
/// `/dev/shm`), `/` readable, and namespaces only when the probe asks (`ro+` prefix), so that
/// the Landlock probes prove Landlock alone.
fn child_config(writable: Option<&Path>, isolate: bool) -> SandboxConfig {
    let shm = Path::new("/dev/shm");
    let mut cfg = SandboxConfig::new(
        writable
            .into_iter()
            .chain(shm.is_dir().then_some(shm))
            .map(Path::to_path_buf)
            .collect(),
        vec![PathBuf::from("/")],
    );
    if !isolate {
        cfg.isolation = Isolation::none();
    }
    cfg
}

fn confine_child(cfg: &SandboxConfig) -> Result<(), i32> {
    confine(cfg).map(drop).map_err(|e| {
        eprintln!("confine failed: {e}: {:?}", std::error::Error::source(&e));
        CONFINE_FAILED
    })
}

fn parse<T: std::str::FromStr>(field: Option<&str>) -> Result<T, i32> {
    field.and_then(|f| f.parse().ok()).ok_or(BAD_PROBE)
}

fn parse_hex(field: Option<&str>) -> Result<u64, i32> {
    let field = field.ok_or(BAD_PROBE)?;
    u64::from_str_radix(field.trim_start_matches("0x"), 16).map_err(|_| BAD_PROBE)
}

fn sentinel(nr: i64) -> Result<(), i32> {
    support::install_sentinel(nr).map_err(|e| {
        eprintln!("sentinel failed: {e}");
        SETUP_FAILED
    })
}

fn print_file(path: &str) -> Result<(), i32> {
    let text = std::fs::read_to_string(path).map_err(|_| SETUP_FAILED)?;
    println!("<<<BEGIN\n{text}END>>>");
    Ok(())
}

/// Runs one probe: `kind:arg:arg...`. Returns the exit code.
fn run_probe(probe: &str, writable: Option<&Path>) -> i32 {
    match try_probe(probe, writable) {
        Ok(code) | Err(code) => code,
    }
}

fn try_probe(probe: &str, writable: Option<&Path>) -> Result<i32, i32> {
    let (isolate, probe) = match probe.strip_prefix("ro+") {
        Some(rest) => (true, rest),
        None => (false, probe),
    };
    let mut fields = probe.split(':');
    let kind = fields.next().ok_or(BAD_PROBE)?;
    let cfg = child_config(writable, isolate);
    match kind {
        // Any system call with zero arguments, behind the sentinel.
        "syscall" => {
            let nr: i64 = parse(fields.next())?;
            sentinel(nr)?;
            confine_child(&cfg)?;
            Ok(errno_code(support::raw_syscall(nr, [0; 6])))
        }
        // syscall:nr with hex arguments, behind the sentinel.
        "args" => {
            let nr: i64 = parse(fields.next())?;
            let mut args = [0_u64; 6];
            for (slot, field) in args.iter_mut().zip(fields) {
                *slot = parse_hex(Some(field))?;
            }
            sentinel(nr)?;
            confine_child(&cfg)?;
            Ok(errno_code(support::raw_syscall(nr, args)))
        }
        // socket:family:type:protocol:sentinel(0|1)
        "socket" => {
            let family: i32 = parse(fields.next())?;
            let ty: i32 = parse(fields.next())?;
            let protocol: i32 = parse(fields.next())?;
            if parse::<u8>(fields.next())? == 1 {
                sentinel(libc::SYS_socket)?;
            }
            confine_child(&cfg)?;
            Ok(errno_code(support::socket(family, ty, protocol)))
        }
        // socketpair:family:sentinel(0|1)
        "socketpair" => {
            let family: i32 = parse(fields.next())?;
            if parse::<u8>(fields.next())? == 1 {
                sentinel(libc::SYS_socketpair)?;
            }
            confine_child(&cfg)?;
            Ok(errno_code(support::socketpair(family)))
        }
        // Allowed calls, without a sentinel: they really run.
        "unshare_fs" => {
            confine_child(&cfg)?;
            let flags = u64::from(libc::CLONE_FS.cast_unsigned());
            Ok(errno_code(support::raw_syscall(
                libc::SYS_unshare,
                [flags, 0, 0, 0, 0, 0],
            )))
        }
        "personality_query" => {
            confine_child(&cfg)?;
            Ok(errno_code(support::raw_syscall(
                libc::SYS_personality,
                [0xffff_ffff, 0, 0, 0, 0, 0],
            )))
        }
        "i386" => {
            confine_child(&cfg)?;
            let pid = support::i386_getpid();
            Ok(if pid > 0 { 0 } else { BAD_PROBE })
        }
        "write" => {
            let path = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            Ok(io_code(std::fs::write(path, b"moat")))
        }
        "open_existing_for_write" => {
            let path = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            Ok(io_code(std::fs::OpenOptions::new().write(true).open(path)))
        }
        "chmod" => {
            use std::os::unix::fs::PermissionsExt as _;
            let path = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            let mode = std::fs::Permissions::from_mode(0o777);
            Ok(io_code(std::fs::set_permissions(path, mode)))
        }
        "mkdir" => {
            let path = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            Ok(io_code(std::fs::create_dir(path)))
        }
        "read" => {
            let path = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            Ok(io_code(std::fs::read(path)))
        }
        "dev_null" => {
            confine_child(&cfg)?;
            Ok(io_code(std::fs::write("/dev/null", b"moat")))
        }
        "tcp_connect" => {
            let port: u16 = parse(fields.next())?;
            confine_child(&cfg)?;
            Ok(io_code(std::net::TcpStream::connect(("127.0.0.1", port))))
        }
        "abstract_connect" => {
            let name = fields.next().ok_or(BAD_PROBE)?;
            let addr = SocketAddr::from_abstract_name(name).map_err(|_| BAD_PROBE)?;
            confine_child(&cfg)?;
            Ok(io_code(UnixStream::connect_addr(&addr)))
        }
        "signal_parent" => {
            confine_child(&cfg)?;
            Ok(errno_code(support::kill_probe(
                std::os::unix::process::parent_id(),
            )))
        }
        "status" => {
            confine_child(&cfg)?;
            print_file("/proc/thread-self/status")?;
            Ok(0)
        }
        "mountinfo" => {
            confine_child(&cfg)?;
            print_file("/proc/thread-self/mountinfo")?;
            Ok(0)
        }
        "namespaces" => {
            confine_child(&cfg)?;
            let links: Vec<String> = ["mnt", "ipc", "uts"]
                .iter()
                .map(|ns| {
                    std::fs::read_link(format!("/proc/thread-self/ns/{ns}"))
                        .map(|l| l.display().to_string())
                        .unwrap_or_default()
                })
                .collect();
            println!("<<<BEGIN\n{}\nEND>>>", links.join("\n"));
            Ok(0)
        }
        "limits" => {
            confine_child(&cfg)?;
            print_file("/proc/self/limits")?;
            Ok(0)
        }
        "report" => {
            let report = confine(&cfg).map_err(|_| CONFINE_FAILED)?;
            println!("<<<BEGIN\n{report:?}\nEND>>>");
            Ok(0)
        }
        // A real shell: fork, exec (glibc tries clone3 first and falls back to clone),
        // redirections, and a write refused by Landlock.
        "shell" => {
            let dir = writable.ok_or(BAD_PROBE)?;
            let outside = fields.next().ok_or(BAD_PROBE)?;
            confine_child(&cfg)?;
            let script = format!(
                "echo agent > '{}/file' && cat /etc/hostname > /dev/null && \
                 ! (echo x > '{outside}') 2>/dev/null && test \"$(cat '{}/file')\" = agent",
                dir.display(),
                dir.display()
            );
            let status = Command::new("/bin/sh").arg("-c").arg(script).status();
            Ok(match status {
                Ok(status) => status.code().unwrap_or(BAD_PROBE),
                Err(e) => e.raw_os_error().unwrap_or(BAD_PROBE),
            })
        }
        // A shell script from the environment (so it may contain colons).
        "script" => {
            let script = std::env::var(SCRIPT_ENV).map_err(|_| BAD_PROBE)?;
            confine_child(&cfg)?;
            let status = Command::new("/bin/sh").arg("-c").arg(script).status();
            Ok(match status {
                Ok(status) => status.code().unwrap_or(BAD_PROBE),
                Err(e) => e.raw_os_error().unwrap_or(BAD_PROBE),
            })
        }
        "thread" => {
            confine_child(&cfg)?;
            Ok(match std::thread::spawn(|| 7).join() {
                Ok(7) => 0,
                _ => BAD_PROBE,
            })
        }
        "apply_allocations" => {
            let mut cfg = cfg;
            cfg.uid_gid = Some((65_534, 65_534));
            let start = support::allocations();
            let sandbox = Sandbox::new(&cfg).map_err(|_| CONFINE_FAILED)?;
            let built = support::allocations();
            let result = sandbox.apply();
            let applied = support::allocations();
            result.map_err(|_| CONFINE_FAILED)?;
            println!("<<<BEGIN\n{} {}\nEND>>>", built - start, applied - built);
            Ok(0)
        }
        "drop_user" => {
            let mut cfg = cfg;
            cfg.uid_gid = Some((65_534, 65_534));
            confine_child(&cfg)?;
            print_file("/proc/thread-self/status")?;
            Ok(errno_code(support::become_root()))
        }
        // A nested user namespace, in which this process is uid/gid 1000. setns
        // (CLONE_NEWUSER) needs a single-threaded caller, and this probe runs on a thread of
        // the test harness: so it is applied the way guest-init applies it, between fork and
        // exec, to `cat` of the status and the uid map.
        "own_user_namespace" => {
            use std::os::unix::process::CommandExt as _;
            let mut cfg = cfg;
            // As in guest-init's PID 1: not dumpable (the holder must make itself so).
            // SAFETY: integer arguments only.
            #[allow(unsafe_code)]
            if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
                return Err(SETUP_FAILED);
            }
            cfg.user_namespace = Some(UserNamespace::create(1000, 1000).map_err(|e| {
                eprintln!(
                    "cannot make the namespace: {e}: {:?}",
                    std::error::Error::source(&e)
                );
                SETUP_FAILED
            })?);
            let sandbox = Sandbox::new(&cfg).map_err(|_| CONFINE_FAILED)?;
            let mut cat = Command::new("/bin/cat");
            cat.args(["/proc/self/status", "/proc/self/uid_map"]);
            // SAFETY: `apply` only makes system calls on its success path and builds its error
            // without allocating; this child runs nothing else before exec.
            #[allow(unsafe_code)]
            unsafe {
                cat.pre_exec(move || {
                    sandbox
                        .apply()
                        .map(drop)
                        .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
                });
            }
            let out = cat.output().map_err(|_| CONFINE_FAILED)?;
            let text = String::from_utf8_lossy(&out.stdout);
            // The uid map is the last line.
            let (status, map) = text.trim_end().rsplit_once('\n').unwrap_or(("", ""));
            println!("<<<BEGIN\n{status}\nUidMap:\t{map}\nEND>>>");
            Ok(out.status.code().unwrap_or(BAD_PROBE))
        }
        _ => Err(BAD_PROBE),
    }
}

// ---------------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------------

/// How the child ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    /// Kept for the failure messages (`{out:?}`).
    #[allow(dead_code)]
    stderr: String,
}

impl Outcome {
    /// Whether the child reached the end of its probe.
    fn ran(&self) -> bool {
        self.stdout.lines().any(|l| l == PROBE_RAN)
    }

    /// The text the child printed between the markers.
    fn printed(&self) -> &str {
        let start = self.stdout.find("<<<BEGIN\n").map_or(0, |i| i + 9);
        let end = self.stdout.find("END>>>").unwrap_or(self.stdout.len());
        self.stdout.get(start..end).unwrap_or("")
    }

    /// The value of a `Key:\tvalue` line of a /proc status file.
    fn status_field(&self, key: &str) -> String {
        self.printed()
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }
}

fn run_child(probe: &str, writable: Option<&Path>) -> Outcome {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "probe_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(PROBE_ENV, probe);
    if let Some(dir) = writable {
        cmd.env(WRITABLE_ENV, dir);
    }
    let out = cmd.output().expect("run the probe child");
    Outcome {
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a probe with a fresh writable directory and returns its exit code.
fn probe(probe: &str) -> i32 {
    let dir = tempfile::tempdir().expect("tempdir");
    probe_in(probe, dir.path())
}

fn probe_in(probe: &str, writable: &Path) -> i32 {
    check_outcome(run_child(probe, Some(writable)))
}

/// Runs a shell script in a confined child and returns its exit code.
fn script(probe: &str, script: &str) -> i32 {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "probe_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, probe)
        .env(WRITABLE_ENV, dir.path())
        .env(SCRIPT_ENV, script)
        .output()
        .expect("run the probe child");
    check_outcome(Outcome {
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn check_outcome(out: Outcome) -> i32 {
    assert_ne!(out.code, Some(CONFINE_FAILED), "confine failed: {out:?}");
    assert_ne!(out.code, Some(SETUP_FAILED), "probe setup failed: {out:?}");
    assert_ne!(out.code, Some(BAD_PROBE), "bad probe: {out:?}");
    assert!(out.ran(), "the probe did not run: {out:?}");
    out.code.unwrap_or_else(|| panic!("child killed: {out:?}"))
}

fn hex(v: u32) -> String {
    format!("{v:x}")
}

// --- seccomp: the AF_VSOCK safety net and the socket rules -----------------------------------

#[test]
fn af_vsock_socket_is_refused_with_eperm_behind_the_safety_net() {
    // The sentinel answers EHWPOISON if confine's rule were missing: no vsock socket is ever
    // created on this host.
    let code = probe(&format!("socket:{AF_VSOCK}:{}:0:1", libc::SOCK_STREAM));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn af_packet_socket_is_refused() {
    let code = probe(&format!(
        "socket:{}:{}:0:1",
        libc::AF_PACKET,
        libc::SOCK_RAW
    ));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn raw_ipv4_socket_is_refused() {
    let ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
    let code = probe(&format!(
        "socket:{}:{ty}:{}:1",
        libc::AF_INET,
        libc::IPPROTO_ICMP
    ));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn raw_ipv6_socket_is_refused() {
    let ty = libc::SOCK_RAW | libc::SOCK_NONBLOCK;
    let code = probe(&format!(
        "socket:{}:{ty}:{}:1",
        libc::AF_INET6,
        libc::IPPROTO_RAW
    ));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn netlink_other_than_route_is_refused() {
    let refused: Vec<_> = [NETLINK_SOCK_DIAG, NETLINK_AUDIT, NETLINK_KOBJECT_UEVENT]
        .into_iter()
        .map(|proto| {
            let code = probe(&format!(
                "socket:{}:{}:{proto}:1",
                libc::AF_NETLINK,
                libc::SOCK_RAW
            ));
            (proto, code)
        })
        .collect();
    assert_eq!(
        refused,
        [
            (NETLINK_SOCK_DIAG, libc::EPERM),
            (NETLINK_AUDIT, libc::EPERM),
            (NETLINK_KOBJECT_UEVENT, libc::EPERM)
        ]
    );
}

#[test]
fn socketpair_outside_unix_is_refused() {
    assert_eq!(
        probe(&format!("socketpair:{}:1", libc::AF_INET)),
        libc::EPERM
    );
}

#[test]
fn unix_socketpair_still_works() {
    assert_eq!(probe(&format!("socketpair:{}:0", libc::AF_UNIX)), 0);
}

#[test]
fn tcp_udp_unix_and_route_netlink_sockets_still_work() {
    let allowed = [
        (libc::AF_INET, libc::SOCK_STREAM, 0),
        (libc::AF_INET6, libc::SOCK_STREAM, 0),
        (libc::AF_INET, libc::SOCK_DGRAM, 0),
        (libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0),
        (libc::AF_UNIX, libc::SOCK_STREAM, 0),
        (
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        ),
        (libc::AF_NETLINK, libc::SOCK_DGRAM, libc::NETLINK_ROUTE),
    ];
    let codes: Vec<_> = allowed
        .iter()
        .map(|(f, t, p)| probe(&format!("socket:{f}:{t}:{p}:0")))
        .collect();
    assert_eq!(codes, vec![0; allowed.len()]);
}

#[test]
fn tcp_connect_to_loopback_still_works() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    assert_eq!(probe(&format!("tcp_connect:{port}")), 0);
}

// --- seccomp: every unconditional rule, every conditional row ----------------------------------

#[test]
fn every_unconditional_rule_refuses_its_syscall() {
    let results: Vec<_> = deny_rules()
        .filter(|rule| rule.when.is_empty())
        .map(|rule| {
            let code = probe(&format!("syscall:{}", rule.nr));
            (rule.syscall, code, rule.errno)
        })
        .collect();
    let wrong: Vec<_> = results
        .iter()
        .filter(|(_, got, want)| got != want)
        .collect();
    assert!(wrong.is_empty(), "(syscall, got, expected): {wrong:?}");
    assert!(results.len() > 40, "{} unconditional rules", results.len());
}

/// Arguments for a conditional row: each comparison made to hold.
fn matching_args(checks: &[moat_guest_sandbox::ArgCheck]) -> [u32; 6] {
    let mut args = [0_u32; 6];
    for check in checks {
        let slot = &mut args[usize::from(check.index)];
        match check.cmp {
            Cmp::Eq(v) => *slot = v,
            Cmp::BitsSet(mask) => *slot |= mask,
            Cmp::MaskedEq { mask, value } => *slot = (*slot & !mask) | value,
            Cmp::Ne(_) => {}
        }
    }
    // Ne comparisons: pick a value that differs from every excluded one.
    for check in checks {
        if let Cmp::Ne(excluded) = check.cmp {
            let slot = &mut args[usize::from(check.index)];
            let taken: Vec<u32> = checks
                .iter()
                .filter(|c| c.index == check.index)
                .filter_map(|c| match c.cmp {
                    Cmp::Ne(v) => Some(v),
                    _ => None,
                })
                .collect();
            if *slot == excluded || taken.contains(slot) {
                *slot = (1..).find(|v| !taken.contains(v)).unwrap_or(99);
            }
        }
    }
    args
}

#[test]
fn every_conditional_rule_refuses_matching_arguments() {
    let results: Vec<_> = deny_rules()
        .filter(|rule| !rule.when.is_empty())
        .map(|rule| {
            let args = matching_args(rule.when);
            let fields: Vec<_> = args.iter().map(|a| hex(*a)).collect();
            let code = probe(&format!("args:{}:{}", rule.nr, fields.join(":")));
            (rule.syscall, rule.reason, code)
        })
        .collect();
    let wrong: Vec<_> = results
        .iter()
        .filter(|(_, _, code)| *code != libc::EPERM)
        .collect();
    assert!(wrong.is_empty(), "(syscall, rule, errno): {wrong:?}");
}

#[test]
fn unshare_without_namespace_flags_still_works() {
    assert_eq!(probe("unshare_fs"), 0);
}

#[test]
fn personality_query_still_works() {
    assert_eq!(probe("personality_query"), 0);
}

#[test]
fn personality_without_aslr_is_refused() {
    let code = probe(&format!(
        "args:{}:{}",
        libc::SYS_personality,
        hex(0x0004_0000)
    ));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn personality_with_any_flag_or_foreign_persona_is_refused() {
    for persona in [
        0x0004_0000_u32, // ADDR_NO_RANDOMIZE
        0x0040_0000,     // READ_IMPLIES_EXEC
        0x0010_0000,     // MMAP_PAGE_ZERO
        0x0020_0000,     // ADDR_COMPAT_LAYOUT
        0x0080_0000,     // ADDR_LIMIT_32BIT
        0x0800_0000,     // ADDR_LIMIT_3GB
        0x0002_0000,     // UNAME26
        0x0002_0008,     // UNAME26 | PER_LINUX32
        0x0000_0001,     // PER_SVR4's persona number
    ] {
        let code = probe(&format!("args:{}:{}", libc::SYS_personality, hex(persona)));
        assert_eq!(code, libc::EPERM, "persona {persona:#x}");
    }
}

#[test]
fn personality_linux_and_linux32_pass_the_filter() {
    // The sentinel filter under the sandbox's answers what the sandbox let through.
    for persona in [0_u32, 0x0008] {
        let code = probe(&format!("args:{}:{}", libc::SYS_personality, hex(persona)));
        assert_eq!(code, support::SENTINEL_ERRNO, "persona {persona:#x}");
    }
}

#[test]
fn clone_with_new_user_namespace_is_refused() {
    let flags = 0x1000_0000 | u32::try_from(libc::SIGCHLD).unwrap_or(17);
    let code = probe(&format!("args:{}:{}", libc::SYS_clone, hex(flags)));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn clone3_answers_enosys_so_libc_falls_back_to_clone() {
    assert_eq!(
        probe(&format!("syscall:{}", libc::SYS_clone3)),
        libc::ENOSYS
    );
}

#[test]
fn ioctl_tiocsti_is_refused() {
    let code = probe(&format!("args:{}:0:{}", libc::SYS_ioctl, hex(0x5412)));
    assert_eq!(code, libc::EPERM);
}

#[test]
fn x32_syscalls_are_refused() {
    assert_eq!(probe(&format!("syscall:{X32_GETPID}")), libc::EPERM);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn i386_syscalls_kill_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("i386", Some(dir.path()));
    assert_eq!(out.signal, Some(libc::SIGSYS), "{out:?}");
}

// --- Landlock ---------------------------------------------------------------------------------

#[test]
fn writing_inside_a_writable_dir_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    assert_eq!(
        probe_in(&format!("write:{}", file.display()), dir.path()),
        0
    );
}

#[test]
fn writing_outside_the_writable_dirs_fails_with_eacces() {
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    assert_eq!(probe(&format!("write:{}", file.display())), libc::EACCES);
}

#[test]
fn opening_an_existing_file_outside_for_writing_fails_with_eacces() {
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let code = probe(&format!("open_existing_for_write:{}", file.display()));
    assert_eq!(code, libc::EACCES);
}

#[test]
fn creating_a_directory_outside_fails_with_eacces() {
    let outside = tempfile::tempdir().expect("tempdir");
    let sub = outside.path().join("sub");
    assert_eq!(probe(&format!("mkdir:{}", sub.display())), libc::EACCES);
}

#[test]
fn reading_the_readable_root_works() {
    assert_eq!(probe("read:/etc/hostname"), 0);
}

#[test]
fn writing_dev_null_works() {
    assert_eq!(probe("dev_null"), 0);
}

/// A `sleep` at our uid with no capabilities at all, so that only Landlock can stand between
/// it and the agent (with capabilities it would be protected by the capability check).
struct CaplessSleeper(std::process::Child);

impl CaplessSleeper {
    fn start() -> Self {
        let child = Command::new("setpriv")
            .args(["--bounding-set=-all", "--inh-caps=-all", "sleep", "30"])
            .env("MOAT_SECRET", "placeholder")
            .spawn()
            .expect("setpriv (util-linux) runs sleep");
        Self(child)
    }
}

impl Drop for CaplessSleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reading_the_environment_of_a_process_outside_is_refused() {
    // Landlock forbids ptrace-mode access across domains: guest-init's environment (and any
    // secret in it) is out of the agent's reach even at the same uid.
    let sleeper = CaplessSleeper::start();
    // Wait until setpriv has exec'd sleep (its comm changes).
    let comm = format!("/proc/{}/comm", sleeper.0.id());
    for _ in 0..200 {
        if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let environ = format!("/proc/{}/environ", sleeper.0.id());
    assert_eq!(probe(&format!("read:{environ}")), libc::EACCES);
}

#[test]
fn signalling_a_process_outside_the_sandbox_is_refused() {
    // Landlock scope (ABI 6): the parent test process is outside the child's domain.
    assert_eq!(probe("signal_parent"), libc::EPERM);
}

#[test]
fn connecting_to_an_abstract_socket_outside_is_refused() {
    let name = format!("moat-sandbox-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(&name).expect("name");
    let _listener = UnixListener::bind_addr(&addr).expect("bind abstract");
    assert_eq!(probe(&format!("abstract_connect:{name}")), libc::EPERM);
}

// --- namespaces and read-only mounts ---------------------------------------------------------

/// The mount options of `/` in a mountinfo table.
fn root_mount_options(mountinfo: &str) -> String {
    mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(4) == Some(&"/"))
        .filter_map(|f| f.get(5).map(|o| (*o).to_owned()))
        .next_back()
        .unwrap_or_default()
}

#[test]
fn read_only_mounts_refuse_writes_outside_with_erofs() {
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    assert_eq!(probe(&format!("ro+write:{}", file.display())), libc::EROFS);
}

#[test]
fn read_only_mounts_keep_the_writable_paths_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    assert_eq!(
        probe_in(&format!("ro+write:{}", file.display()), dir.path()),
        0
    );
    assert_eq!(std::fs::read(&file).expect("written file"), b"moat");
}

#[test]
fn chmod_outside_is_refused_by_the_read_only_mounts() {
    // Landlock (ABI 7) does not cover chmod, chown, utimes or xattrs: the mounts do.
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    assert_eq!(probe(&format!("ro+chmod:{}", file.display())), libc::EROFS);
}

#[test]
fn read_only_mounts_keep_dev_null_writable() {
    assert_eq!(probe("ro+dev_null"), 0);
}

#[test]
fn the_root_is_read_only_for_the_agent_and_unchanged_for_everyone_else() {
    let ours = || std::fs::read_to_string("/proc/self/mountinfo").expect("our mountinfo");
    let before = root_mount_options(&ours());
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("ro+mountinfo", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let agent = root_mount_options(out.printed());
    assert!(agent.split(',').any(|o| o == "ro"), "agent's / is {agent}");
    assert!(
        agent.split(',').any(|o| o == "nosuid"),
        "agent's / is {agent}"
    );
    assert_eq!(root_mount_options(&ours()), before);
}

#[test]
fn the_agent_gets_its_own_mount_ipc_and_uts_namespaces() {
    let ours: Vec<String> = ["mnt", "ipc", "uts"]
        .iter()
        .map(|ns| {
            std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("ro+namespaces", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let agent: Vec<&str> = out.printed().lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(agent.len(), 3, "{out:?}");
    let shared: Vec<_> = agent
        .iter()
        .filter(|ns| ours.contains(&(**ns).to_owned()))
        .collect();
    assert!(
        shared.is_empty(),
        "namespaces shared with the parent: {shared:?}"
    );
}

#[test]
fn a_shell_runs_with_full_isolation() {
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    assert_eq!(probe(&format!("ro+shell:{}", file.display())), 0);
    assert!(!file.exists());
}

// --- capabilities, no_new_privs, ids, rlimits ------------------------------------------------

#[test]
fn every_capability_is_dropped_and_no_new_privs_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("status", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let zero = "0000000000000000";
    let fields: Vec<_> = [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ]
    .into_iter()
    .map(|k| (k, out.status_field(k)))
    .collect();
    assert_eq!(
        fields,
        [
            ("CapInh", zero.to_owned()),
            ("CapPrm", zero.to_owned()),
            ("CapEff", zero.to_owned()),
            ("CapBnd", zero.to_owned()),
            ("CapAmb", zero.to_owned()),
            ("NoNewPrivs", "1".to_owned()),
            ("Seccomp", "2".to_owned()),
        ]
    );
}

#[test]
fn dropping_to_an_unprivileged_user_sticks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("drop_user", Some(dir.path()));
    assert!(out.ran(), "{out:?}");
    assert_eq!(
        out.code,
        Some(libc::EPERM),
        "setresuid(0) must fail: {out:?}"
    );
    assert_eq!(
        (
            out.status_field("Uid"),
            out.status_field("Gid"),
            out.status_field("Groups")
        ),
        (
            "65534 65534 65534 65534".to_owned(),
            "65534 65534 65534 65534".to_owned(),
            String::new()
        )
    );
}

#[test]
fn a_nested_user_namespace_shows_the_caller_as_the_chosen_uid_with_nothing_gained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("ro+own_user_namespace", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    // SAFETY: no arguments; cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    let zero = "0000000000000000".to_owned();
    assert_eq!(
        (
            out.status_field("Uid"),
            out.status_field("Gid"),
            out.status_field("UidMap"),
            out.status_field("CapEff"),
            out.status_field("CapBnd"),
            out.status_field("NoNewPrivs"),
            out.status_field("Seccomp"),
        ),
        (
            "1000 1000 1000 1000".to_owned(),
            "1000 1000 1000 1000".to_owned(),
            format!("1000 {euid} 1"),
            zero.clone(),
            zero,
            "1".to_owned(),
            "2".to_owned(),
        )
    );
}

#[test]
fn a_nested_user_namespace_refuses_uid_0_and_an_id_change_beside_it() {
    assert!(matches!(
        UserNamespace::create(0, 0),
        Err(SandboxError::InvalidConfig(_))
    ));
    let mut cfg = child_config(None, true);
    cfg.user_namespace = Some(UserNamespace::create(1000, 1000).expect("a nested namespace"));
    cfg.uid_gid = Some((1000, 1000));
    assert!(matches!(
        Sandbox::new(&cfg),
        Err(SandboxError::InvalidConfig(_))
    ));
}

#[test]
fn default_rlimits_are_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("limits", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let ours = std::fs::read_to_string("/proc/self/limits").expect("our limits");
    // Limits only go down: the expected value is the default, or our hard limit if lower.
    let expected = |name: &str, default: u64| {
        let hard = limit_fields(&ours, name)
            .get(1)
            .and_then(|h| h.parse::<u64>().ok());
        let value = hard.map_or(default, |h| h.min(default));
        format!("{value} {value}")
    };
    let got = |name: &str| limit_fields(out.printed(), name).join(" ");
    let names = [
        ("Max core file size", 0),
        ("Max processes", 4096),
        ("Max open files", 65_536),
        ("Max locked memory", 8 << 20),
        ("Max file size", 16 << 30),
        ("Max msgqueue size", 800 << 10),
    ];
    let got: Vec<_> = names.iter().map(|(n, _)| got(n)).collect();
    let want: Vec<_> = names.iter().map(|(n, d)| expected(n, *d)).collect();
    assert_eq!(got, want);
}

/// The soft and hard fields of one line of a /proc limits file.
fn limit_fields<'a>(limits: &'a str, name: &str) -> Vec<&'a str> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|rest| rest.split_whitespace().take(2).collect())
        .unwrap_or_default()
}

// --- the agent's own work still runs --------------------------------------------------------

#[test]
fn a_shell_runs_writes_home_and_is_refused_outside() {
    let outside = tempfile::tempdir().expect("tempdir");
    let file = outside.path().join("file");
    assert_eq!(probe(&format!("shell:{}", file.display())), 0);
    assert!(!file.exists());
}

#[test]
fn a_terminal_works_with_full_isolation() {
    // `script` allocates a pseudo-terminal (/dev/ptmx, /dev/pts) and `stty` changes its modes
    // with ioctls: the device rule's IoctlDev right, under read-only mounts.
    let code = script(
        "ro+script",
        "script -qec 'tty && stty -echo && stty echo' /dev/null",
    );
    assert_eq!(code, 0);
}

#[test]
fn git_and_python_multiprocessing_work_with_full_isolation() {
    let code = script(
        "ro+script",
        "cd \"$MOAT_SANDBOX_WRITABLE\" && export HOME=\"$PWD\" && git init -q repo && \
         git -C repo -c user.email=a@example.com -c user.name=agent commit -q --allow-empty -m x && \
         python3 -c 'import multiprocessing as m; assert m.Pool(2).map(abs, [-1, -2]) == [1, 2]'",
    );
    assert_eq!(code, 0);
}

#[test]
fn threads_can_still_be_created() {
    assert_eq!(probe("thread"), 0);
}

#[test]
fn the_report_names_the_landlock_abi_and_full_enforcement() {
    let kernel_abi = support::landlock_abi();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("report", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let report = out.printed();
    let abi = kernel_abi.min(moat_guest_sandbox::NEWEST_VETTED_ABI);
    let expected = [
        format!("kernel_abi: {kernel_abi}, abi: {abi}, enforcement: Full"),
        "bounding_set_cleared: true".to_owned(),
        "securebits_locked: true".to_owned(),
        "rlimits_set: 6".to_owned(),
        format!("seccomp_rules: {}", deny_rules().count()),
    ];
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !report.contains(e.as_str()))
        .collect();
    assert!(missing.is_empty(), "{missing:?} not in {report}");
}

#[test]
fn apply_does_not_allocate_so_it_can_run_between_fork_and_exec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_child("ro+apply_allocations", Some(dir.path()));
    assert!(out.ran() && out.code == Some(0), "{out:?}");
    let counts: Vec<usize> = out
        .printed()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    // `new` allocates (which shows the counter works); `apply` must not.
    assert!(
        matches!(counts[..], [built, 0] if built > 0),
        "allocations: {counts:?}"
    );
}

// --- configuration ---------------------------------------------------------------------------

#[test]
fn uid_0_as_the_agent_user_is_refused() {
    let mut cfg = SandboxConfig::new(vec![], vec![PathBuf::from("/")]);
    cfg.uid_gid = Some((0, 0));
    assert!(matches!(
        Sandbox::new(&cfg),
        Err(SandboxError::InvalidConfig(_))
    ));
}

#[test]
fn relative_paths_are_refused() {
    let cfg = SandboxConfig::new(vec![PathBuf::from("home")], vec![PathBuf::from("/")]);
    assert!(matches!(
        Sandbox::new(&cfg),
        Err(SandboxError::InvalidConfig(_))
    ));
}

#[test]
fn missing_device_paths_are_skipped_and_reported() {
    let mut cfg = moat_guest_sandbox::agent_config(Path::new("/tmp"));
    cfg.devices.push(PathBuf::from("/dev/moat-no-such-device"));
    let sandbox = Sandbox::new(&cfg).expect("sandbox");
    assert!(
        sandbox
            .missing_devices()
            .contains(&PathBuf::from("/dev/moat-no-such-device"))
    );
}

#[test]
fn missing_writable_path_is_an_error() {
    let cfg = SandboxConfig::new(
        vec![PathBuf::from("/nonexistent/moat-home")],
        vec![PathBuf::from("/")],
    );
    assert!(matches!(Sandbox::new(&cfg), Err(SandboxError::Path { .. })));
}
