//! Shared helpers for the VM tests: building the probe guest and running moat-vmm on it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why KVM tests cannot run here, or `None` when /dev/kvm is usable.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable ({e})")),
    }
}

/// Skips the calling test with a plain reason when KVM is unavailable; where the run expects
/// real KVM (`MOAT_EXPECT_REAL_KVM`, set by `cargo xtask test` inside L1), fails instead, so a
/// skip can never pass for a run.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(why) = common::kvm_unavailable() {
            common::skip(&format!("{why}; this test needs real KVM"));
            return;
        }
    };
}

/// Prints why the calling test is skipped, or fails it where this run expects everything to
/// run (`MOAT_EXPECT_REAL_KVM`: inside L1, with real KVM, root and user namespaces).
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("MOAT_EXPECT_REAL_KVM").is_none(),
        "this run expects real KVM, so nothing may be skipped, but: {why}"
    );
    eprintln!("SKIPPED: {why}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The probe guest ELF: `MOAT_PROBE_GUEST` if set (xtask builds it), else built here once.
pub fn probe_guest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("MOAT_PROBE_GUEST") {
            return PathBuf::from(p);
        }
        let dir = repo_root().join("tests/probe-guest");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-guest");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Idempotent and offline when the target is already installed; a fresh CI machine
        // gets it here (rustup reaches its distribution server there).
        let _ = Command::new("rustup")
            .current_dir(&dir)
            .args(["target", "add", "x86_64-unknown-none"])
            .status();
        let status = Command::new(cargo)
            .current_dir(&dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--release", "--target", "x86_64-unknown-none"])
            .status()
            .expect("run cargo to build the probe guest");
        assert!(
            status.success(),
            "building the probe guest failed (needs `rustup target add x86_64-unknown-none`)"
        );
        target.join("x86_64-unknown-none/release/moat-probe-guest")
    })
    .clone()
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The result of one VM run: exit code and the serial console.
pub struct Run {
    pub code: Option<i32>,
    pub serial: String,
    pub stderr: String,
}

impl Run {
    pub fn has_line(&self, line: &str) -> bool {
        self.serial.lines().any(|l| l == line)
    }
}

/// Runs moat-vmm with `args` plus a serial file and a 60 s timeout.
pub fn run_vmm(name: &str, args: &[&str]) -> Run {
    run_vmm_with_timeout(name, args, 60)
}

/// Runs moat-vmm with `args` plus a serial file and a `secs` timeout.
pub fn run_vmm_with_timeout(name: &str, args: &[&str], secs: u64) -> Run {
    let dir = scratch(name);
    let serial = dir.join("serial.log");
    let out: Output = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args(args)
        .arg("--serial-out")
        .arg(&serial)
        .arg("--timeout")
        .arg(secs.to_string())
        .output()
        .expect("run moat-vmm");
    Run {
        code: out.status.code(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A moat-vmm still running, its serial console going to a file the test reads meanwhile.
/// Every failure it reports carries what the guest printed, and the VMM is killed first.
pub struct Live {
    pub child: Child,
    pub serial: PathBuf,
}

impl Live {
    /// What the guest printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Kills the VMM and fails the test with `why` and the guest's console.
    pub fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{why}; the guest printed:\n{}", self.console())
    }

    /// Waits until the guest printed `line` (a whole line); fails when the VMM exits first
    /// or `secs` pass.
    pub fn wait_for_line(&mut self, line: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.console().lines().any(|l| l == line) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!(
                    "moat-vmm exited ({status}) before the guest printed {line:?}"
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("the guest did not print {line:?} within {secs} s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `r`'s value, or the test fails with `what`, the error and the guest's console.
    pub fn ok<T>(&mut self, what: &str, r: std::io::Result<T>) -> T {
        r.unwrap_or_else(|e| self.fail(&format!("{what}: {e}")))
    }

    /// Connects through the VMM's vsock socket `uds` into the guest's `port` (`CONNECT`,
    /// answered `OK <port>`), sends `message` and returns what comes back of the same length
    /// (the probe guest echoes); the connection is closed after.
    pub fn echo_through_guest_port(&mut self, uds: &Path, port: u32, message: &[u8]) -> Vec<u8> {
        use std::io::{BufRead, Read, Write};
        let client = std::os::unix::net::UnixStream::connect(uds);
        let client = self.ok("connect to the vsock socket", client);
        let timeout = client.set_read_timeout(Some(Duration::from_secs(30)));
        self.ok("set a read timeout", timeout);
        let wrote = (&client).write_all(format!("CONNECT {port}\n").as_bytes());
        self.ok("write CONNECT", wrote);
        let mut reader = std::io::BufReader::new(&client);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        self.ok(&format!("read the answer to CONNECT {port}"), read);
        if !(line.starts_with("OK ") && line.ends_with('\n')) {
            self.fail(&format!("CONNECT {port} was answered {line:?}"));
        }
        let wrote = (&client).write_all(message);
        self.ok("write to the guest", wrote);
        let mut back = vec![0u8; message.len()];
        let read = reader.read_exact(&mut back);
        self.ok("read the guest's echo", read);
        back
    }
}
