//! Console input through real KVM: the VMM feeds its stdin to COM1 (the console being its
//! stdout), and the probe guest reads a line by polling the UART's data-ready bit and echoes it
//! upper-cased.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs the probe with `input` on the VMM's stdin (a pipe) and the console on its stdout.
fn echo_through_the_console(input: &[u8]) -> (Option<i32>, String) {
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(common::probe_guest())
        .args(["--mem", "64", "--timeout", "60"])
        .args(["--cmdline", "probe.serial_echo=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = vmm.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    let out = vmm.wait_with_output().unwrap();
    drop(stdin);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn probe_reads_a_line_from_stdin_through_com1() {
    require_kvm!();
    let (code, console) = echo_through_the_console(b"hello moat\n");
    assert_eq!(code, Some(0), "{console}");
    assert!(
        console
            .lines()
            .any(|l| l == "probe: serial echo HELLO MOAT"),
        "{console}"
    );
}

#[test]
fn input_longer_than_the_uart_fifo_reaches_the_guest_at_its_pace() {
    require_kvm!();
    // 200 bytes before the newline: three times the 64-byte FIFO, so the input thread must
    // wait for the guest to empty it (vm-superio's in_buffer_empty) and refill it.
    let mut input = vec![b'x'; 200];
    input.push(b'\n');
    let (code, console) = echo_through_the_console(&input);
    assert_eq!(code, Some(0), "{console}");
    let expected = format!("probe: serial echo {}", "X".repeat(64));
    assert!(console.lines().any(|l| l == expected), "{console}");
}

#[test]
fn serial_input_with_a_console_file_is_a_config_error() {
    let dir = common::scratch("console-file-input");
    let out = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args(["--kernel", "/nonexistent", "--serial-in", "on"])
        .arg("--serial-out")
        .arg(dir.join("console.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("serial input needs the console on stdout")
    );
}

/// A VM started without console input takes it later, from a descriptor handed over its
/// control socket (as a warm pool's claimant hands over its terminal): the probe echoes what
/// was written there. Asked without a descriptor, the VMM refuses and goes on.
#[test]
fn console_input_handed_over_the_control_socket_reaches_the_guest() {
    require_kvm!();
    let dir = common::scratch("console-input-api");
    let api = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .arg("--kernel")
        .arg(common::probe_guest())
        .args(["--mem", "64", "--timeout", "60", "--serial-in", "off"])
        .args(["--cmdline", "probe.serial_echo=1"])
        .arg("--api-sock")
        .arg(&api)
        .arg("--serial-out")
        .arg(&serial)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut vmm = common::Live { child, serial };
    vmm.wait_for_line("probe: serial echo ready", 60);
    let mut client = vmm.ok("connect", moat_vmm::api::Client::connect(&api));
    let e = client.request("console-input").unwrap_err().to_string();
    assert!(e.contains("descriptor"), "{e}");
    let (reader, mut writer) = std::io::pipe().unwrap();
    vmm.ok("console-input", client.attach_console_input(&reader));
    drop(reader);
    writer.write_all(b"handed over\n").unwrap();
    vmm.wait_for_line("probe: serial echo HANDED OVER", 60);
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.console());
}

/// Terminal modes (`stty -g`) around a VMM run on a pseudo-terminal: before, once the guest
/// runs, after; and the VMM's exit code.
struct TtyRun {
    before: String,
    during: String,
    after: String,
    code: String,
}

/// Runs the hanging probe with the VMM's stdin and stdout on a pseudo-terminal that
/// util-linux `script` provides, or says why it cannot. `then` is shell run once the guest runs
/// (`$VMM` is the VMM's pid).
fn run_on_a_tty(name: &str, timeout: u32, then: &str) -> Result<TtyRun, String> {
    for tool in ["script", "stty"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    let dir = common::scratch(name);
    let file = |f: &str| dir.join(f).display().to_string();
    // The VMM runs in the background with the terminal as stdin explicitly (a non-interactive
    // shell would give it /dev/null). The guest's "hanging on purpose" reaches the terminal,
    // which `script` copies (flushed) into `typescript`: by then the VMM has set raw mode. Not
    // a fixed sleep: under emulation (nested KVM in QEMU's TCG) the guest may take seconds.
    let inner = format!(
        "stty -g > {before}; {vmm} --kernel {probe} --mem 64 --timeout {timeout} \
         --cmdline probe.hang=1 </dev/tty & VMM=$!; \
         until grep -q 'hanging on purpose' {typescript} || ! kill -0 $VMM; do sleep 0.1; done; \
         stty -g > {during}; {then}; \
         wait $VMM; echo $? > {code}; stty -g > {after}",
        typescript = file("typescript"),
        before = file("before"),
        during = file("during"),
        after = file("after"),
        code = file("code"),
        vmm = env!("CARGO_BIN_EXE_moat-vmm"),
        probe = common::probe_guest().display(),
    );
    let status = Command::new("script")
        .args(["-qfec", &inner])
        .arg(dir.join("typescript"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "script failed: {status}");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_owned()
    };
    Ok(TtyRun {
        before: read("before"),
        during: read("during"),
        after: read("after"),
        code: read("code"),
    })
}

#[test]
fn raw_terminal_is_restored_when_the_vm_times_out() {
    require_kvm!();
    let run = match run_on_a_tty("console-tty-timeout", 10, "true") {
        Ok(r) => r,
        Err(why) => {
            common::skip(&format!("{why}; this test needs a pseudo-terminal"));
            return;
        }
    };
    assert_ne!(run.during, run.before, "raw mode while the VM runs");
    assert_eq!(run.after, run.before, "the terminal's mode comes back");
    assert_eq!(run.code, "4");
}

#[test]
fn raw_terminal_is_restored_when_the_vmm_is_terminated() {
    require_kvm!();
    let run = match run_on_a_tty("console-tty-sigterm", 30, "kill -TERM $VMM") {
        Ok(r) => r,
        Err(why) => {
            common::skip(&format!("{why}; this test needs a pseudo-terminal"));
            return;
        }
    };
    assert_ne!(run.during, run.before, "raw mode while the VM runs");
    assert_eq!(run.after, run.before, "the terminal's mode comes back");
    assert_eq!(run.code, "143", "128 + SIGTERM");
}
