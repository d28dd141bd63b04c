//! A deadline for every `moat run` the end-to-end tests start ([`output_within`]): a run that
//! hangs is killed and the test fails saying what it knows, instead of going silent until
//! someone's outer timeout (in L1, xtask's 300 s of silence) ends everything without a word.
//!
//! What a hang report holds: the elapsed time; `moat run`'s standard error so far (its own
//! messages and moat-vmm's, which inherits it); its standard output so far (in a VM, the serial
//! console: the agent's output, guest-init's messages, and the guest kernel's errors, which
//! `quiet` still prints: a soft lockup, a hung task, a panic); every process under `moat run`
//! with each thread's state, kernel wait channel and CPU time over one second (a vCPU thread
//! that burns a whole second is a guest that spins; one that sleeps is a guest waiting for
//! something); and whatever the caller adds (the audit log so far: which flows the proxy saw).
//! If L1 itself froze, no deadline inside it fires: the silence is then L1's.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one `moat run` of the tests may take: far above a normal run (a VM workspace in L1
/// boots, runs its script and stops in well under a minute), and below the 300 s of console
/// silence after which xtask takes an L1 as frozen, so that a hang of ours is reported by us.
pub const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// Collects a pipe as it is written, so that what came before a hang can be shown.
fn collect(
    mut pipe: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, reader)
}

/// Runs `cmd` to its end with standard input closed, collecting standard output and error, as
/// `Command::output` does, but within `deadline`: past it, the process tree is described, `cmd`
/// is killed (moat-vmm dies with `moat run`), and the test panics with `what`, the output so
/// far, the processes and `extra()` (evaluated then).
pub fn output_within(
    cmd: &mut Command,
    what: &str,
    deadline: Duration,
    extra: &dyn Fn() -> String,
) -> Output {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"));
    let (stdout, out_reader) = collect(child.stdout.take().unwrap());
    let (stderr, err_reader) = collect(child.stderr.take().unwrap());
    let text =
        |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let mut exited = None;
    while started.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = exited else {
        let pid = child.id();
        let processes = describe_tree(pid);
        let _ = child.kill();
        let _ = child.wait();
        // What the pipes still held (or what moat-vmm wrote as it died).
        std::thread::sleep(Duration::from_secs(1));
        // `xtask l1` reads "still running after N s, killed." as a hung guest (and reruns the
        // binary once in a fresh L1): keep the words.
        panic!(
            "{what}: still running after {:.0} s, killed.\n\
             --- its standard error so far ---\n{}\n\
             --- its standard output so far (a VM's console) ---\n{}\n\
             --- its processes (thread: state, wait channel, CPU over 1 s) ---\n{processes}\n\
             {}",
            started.elapsed().as_secs_f64(),
            text(&stderr),
            text(&stdout),
            extra(),
        );
    };
    // Both pipes end when the last process holding them does: a process that outlives `moat
    // run` with them open is a hang too.
    while !(out_reader.is_finished() && err_reader.is_finished()) {
        assert!(
            started.elapsed() < deadline + Duration::from_secs(30),
            "{what}: exited ({status}) but a process it started keeps its output open.\n\
             --- standard error ---\n{}\n--- standard output ---\n{}",
            text(&stderr),
            text(&stdout),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = (out_reader.join(), err_reader.join());
    let take = |buf: Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *buf.lock().unwrap());
    Output {
        status,
        stdout: take(stdout),
        stderr: take(stderr),
    }
}

/// `pid` and its descendants, each thread with its state, wait channel and the CPU time it used
/// over one second.
pub fn describe_tree(pid: u32) -> String {
    let pids = descendants(pid);
    let before: Vec<Vec<(String, u64)>> = pids.iter().map(|p| thread_ticks(*p)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut out = String::new();
    for (p, before) in pids.iter().zip(before) {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{p}/{f}")).unwrap_or_default();
        let cmdline = read("cmdline").replace('\0', " ");
        out.push_str(&format!("pid {p}: {}\n", cmdline.trim()));
        for (tid, ticks) in thread_ticks(*p) {
            let task = |f: &str| {
                std::fs::read_to_string(format!("/proc/{p}/task/{tid}/{f}")).unwrap_or_default()
            };
            let stat = task("stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_owned();
            let used = before
                .iter()
                .find(|(t, _)| *t == tid)
                .map_or(0, |(_, b)| ticks.saturating_sub(*b));
            out.push_str(&format!(
                "  {tid} {}: {state}, in {}, {used} ticks of CPU\n",
                task("comm").trim(),
                task("wchan").trim(),
            ));
        }
    }
    out
}

/// Each thread of `pid` with its user + system CPU ticks.
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state is the first, utime the 12th.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split(' ').collect())
            .unwrap_or_default();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.push((tid, num(11) + num(12)));
    }
    out
}

/// `pid` and every process below it, parents first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1))
                .and_then(|f| f.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

/// For a `moat run` a test drives itself (spawned, its pipes read by the test): past
/// `deadline` the watchdog prints the process tree and kills it, so that the test's next read
/// ends (and fails) rather than waits forever. Disarmed when dropped.
pub struct Watchdog {
    done: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Watchdog {
    pub fn arm(pid: u32, what: &str, deadline: Duration) -> Watchdog {
        let done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let shared = Arc::clone(&done);
        let what = what.to_owned();
        std::thread::spawn(move || {
            let (lock, cvar) = &*shared;
            let started = Instant::now();
            let mut finished = lock.lock().unwrap();
            while !*finished && started.elapsed() < deadline {
                let left = deadline.saturating_sub(started.elapsed());
                finished = cvar.wait_timeout(finished, left).unwrap().0;
            }
            if !*finished {
                // `xtask l1` reads these words as a hung guest, as in `output_within`.
                eprintln!(
                    "{what}: still running after {:.0} s, killed.\n--- its processes ---\n{}",
                    started.elapsed().as_secs_f64(),
                    describe_tree(pid)
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.done;
        *lock.lock().unwrap() = true;
        cvar.notify_all();
    }
}
