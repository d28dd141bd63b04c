//! End to end through the namespace backend with real programs: `moat run --backend
//! namespace -- <command>` runs curl, git and a shell inside the workspace (the scenarios every
//! backend passes are in common/scenarios.rs; the namespace backend's own checks are here);
//! their traffic goes through the virtual DNS, the TUN device, the netstack, the flow header and the egress proxy
//! to a TLS server on the host's loopback (rcgen test CA). Needs unprivileged user namespaces
//! and /dev/net/tun (both present on our CI machines), curl, git and python3. Run as root (as
//! on our machines and CI), the `run_by_root_*` tests check that the workspace is then an
//! unprivileged host uid; as anyone else they pass without checking anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::{Workspace, text};

// The scenarios every backend passes (moat/tests/common/scenarios.rs), through this one.
macro_rules! namespace_scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                common::scenarios::$name(&Workspace::new());
            }
        )*
    };
}
every_backend_scenario!(namespace_scenarios);

#[test]
fn tls_clients_are_pointed_at_the_workspace_trust_store() {
    let ws = Workspace::new();
    let out = ws.run("echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $GIT_SSL_CAINFO; grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE");
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next().unwrap(),
        ["/etc/ssl/certs/ca-certificates.crt"; 4].join(" ")
    );
    let host_count = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count();
    // The host's roots, the egress proxy's workspace CA, and the --ca given.
    assert_eq!(
        lines.next().unwrap().parse::<usize>().unwrap(),
        host_count + 2
    );
}

#[test]
fn the_agent_cannot_signal_its_parents_through_the_process_group() {
    let ws = Workspace::new();
    // `kill(0, sig)` also reaches the caller, so the shell ignores what it sends in order to
    // tell its own status; what else is in its process group gets the default action.
    // SIGHUP and SIGQUIT would end `moat run` run by an ordinary user, SIGUSR1 also
    // `__guest-init` (which handles neither) run by root.
    // (Landlock's signal scoping, from ABI 6, refuses these too where the kernel has it: the
    // agent's own session, checked first, is what holds on every kernel.) The agent leads its
    // session and process group (inside the workspace's pid namespace, a group or session led
    // from outside it shows as 0).
    let out = ws.run(
        "ps -o pid=,pgid=,sid= -p $$; \
         trap '' HUP QUIT USR1; kill -HUP 0; kill -QUIT 0; kill -USR1 0; echo survived; exit 3",
    );
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let ids: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(ids.len(), 3, "{stdout}");
    assert!(
        ids[0] == ids[1] && ids[1] == ids[2],
        "the agent does not lead its own session and process group: pid, pgid, sid = {ids:?}"
    );
    assert_eq!(
        (out.status.code(), lines.next()),
        (Some(3), Some("survived")),
        "status {:?}, stderr: {}",
        out.status,
        text(&out.stderr)
    );
}

#[test]
fn ctrl_c_at_the_terminal_still_reaches_the_agent() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let ws = Workspace::new();
    // A process group of its own, as a terminal's foreground job: the terminal's Ctrl-C is a
    // SIGINT to that whole group, which the agent, in a session of its own, is no longer in.
    let mut child = ws
        .command("trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 0.1; done")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pgid = i32::try_from(child.id()).unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-int\n");
    assert_eq!(status.code(), Some(42));
}

#[test]
fn descriptors_moat_run_inherited_do_not_reach_the_agent() {
    let ws = Workspace::new();
    let inner = ws.command("ls /proc/self/fd");
    // fd 5 opened without close-on-exec by the shell that starts `moat run`, as a careless
    // caller would leave one.
    let mut outer = Command::new("sh");
    outer
        .arg("-c")
        .arg("exec 5</etc/hostname; exec \"$@\"")
        .arg("sh")
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            outer.env(k, v);
        }
    }
    let out = outer.output().unwrap();
    // 0, 1, 2, and the directory ls itself opened.
    assert_eq!(
        text(&out.stdout),
        "0\n1\n2\n3\n",
        "status {:?}, stderr: {}",
        out.status,
        text(&out.stderr)
    );
}

/// The host pids of `pid`'s children (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[test]
fn the_agents_home_is_nosuid_and_nodev_for_pid_1_too() {
    use std::io::{BufRead, Write};
    let ws = Workspace::new();
    let mut child = ws
        .command("echo ready; read line")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // PID 1 is `moat run`'s grandchild (through `__guest-init`): the one whose last pid in
    // its namespaces is 1. The agent's own view is made nosuid again by its sandbox; PID 1's,
    // the bind guest-init made, is what is checked here. mountinfo is readable by anyone.
    let pid1 = children(child.id())
        .into_iter()
        .flat_map(children)
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1"))
        })
        .expect("the workspace's PID 1");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid1}/mountinfo")).unwrap();
    let home = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/home/agent"))
        .unwrap_or_else(|| panic!("no /home/agent mount in PID 1's view:\n{mountinfo}"));
    let options: Vec<&str> = home.split(' ').nth(5).unwrap_or("").split(',').collect();
    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        options.contains(&"nosuid") && options.contains(&"nodev"),
        "PID 1's /home/agent: {home}"
    );
}

#[test]
fn host_secrets_are_not_visible_inside() {
    let ws = Workspace::new();
    let out = ws.run(
        "ls -A /root | wc -l; wc -c < /etc/shadow; cat /etc/ssh/ssh_host_*_key 2>/dev/null | wc -c",
    );
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(lines, ["0", "0", "0"], "stderr: {}", text(&out.stderr));
}

#[test]
fn the_workspace_has_its_own_accounts_and_none_of_the_hosts() {
    let ws = Workspace::new();
    let out =
        ws.run("cut -d: -f1,3 /etc/passwd; echo --; cut -d: -f1,3 /etc/group; echo --; id -un");
    let got = text(&out.stdout);
    assert_eq!(
        got,
        "root:0\nagent:1000\nnobody:65534\n--\nroot:0\nagent:1000\nnogroup:65534\n--\nroot\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn the_workspace_sees_only_its_own_processes_and_leaves_none_behind() {
    let ws = Workspace::new();
    let out = ws.run("sleep 300 & ps -e -o pid= | wc -l");
    // init, sh, sleep, ps, wc: nothing of the host's.
    let n: usize = text(&out.stdout).trim().parse().unwrap();
    assert!(n <= 6, "{n} processes visible");
    let leftover = Command::new("pgrep")
        .args(["-f", &ws.home().to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "left behind: {}",
        text(&leftover.stdout)
    );
}

/// Whether these tests run as the host's root: then the workspace's root must not be.
fn host_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("not root: the workspace maps the caller, nothing to check");
    }
    root
}

#[test]
fn run_by_root_the_workspace_root_is_an_unprivileged_host_uid() {
    use std::os::unix::fs::MetadataExt;
    if !host_root() {
        return;
    }
    let id = moat_guest_init::ROOT_RUN_ID;
    let ws = Workspace::new();
    let out = ws.run("cat /proc/self/uid_map /proc/self/gid_map; id -u; echo made > ~/made-inside");
    let maps: Vec<Vec<String>> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let want = vec!["0".to_owned(), id.to_string(), "1".to_owned()];
    assert_eq!(
        maps,
        [want.clone(), want, vec!["0".to_owned()]],
        "stderr: {}",
        text(&out.stderr)
    );
    // What the agent creates is the mapped uid's on the host, not root's.
    let made = std::fs::metadata(ws.home().join("made-inside")).unwrap();
    assert_eq!((made.uid(), made.gid()), (id, id));
}

#[test]
fn run_by_root_a_host_file_only_root_may_read_stays_unreadable_inside() {
    use std::os::unix::fs::PermissionsExt;
    if !host_root() {
        return;
    }
    // Outside /tmp, /home, /root and /run: the workspace sees it in the host's read-only root.
    let target_tmp = env!("CARGO_TARGET_TMPDIR");
    let hidden = ["/tmp/", "/home/", "/root/", "/run/"];
    let base = if hidden.iter().any(|h| target_tmp.starts_with(h)) {
        "/var/tmp"
    } else {
        target_tmp
    };
    let dir = tempfile::tempdir_in(base).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "ROOT-ONLY-MARKER\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ws = Workspace::new();
    // And one in the agent's own home, bound writable into the workspace.
    let in_home = ws.home().join("root-only");
    std::fs::write(&in_home, "ROOT-ONLY-MARKER\n").unwrap();
    std::fs::set_permissions(&in_home, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = ws.run(&format!(
        "test -f {0} && echo visible; cat {0}; echo host=$?; cat ~/root-only; echo home=$?",
        secret.display()
    ));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("visible"), "{stdout}");
    assert!(!stdout.contains("ROOT-ONLY-MARKER"), "{stdout}");
    assert!(
        stdout.contains("host=1") && stdout.contains("home=1"),
        "{stdout}"
    );
    assert!(text(&out.stderr).contains("Permission denied"));
}

#[test]
fn run_by_root_the_workspace_network_namespace_is_not_the_workspaces() {
    if !host_root() {
        return;
    }
    let ws = Workspace::new();
    // NS_GET_USERNS: the user namespace that owns the network namespace is the host's, not
    // the workspace's own, so nothing inside holds CAP_NET_ADMIN over its network. (The kernel
    // answers EPERM for an owner outside the caller's user namespace.)
    let out = ws.run(
        "python3 -c \"import fcntl, os\n\
         try: o = fcntl.ioctl(os.open('/proc/self/ns/net', os.O_RDONLY), 0xb701)\n\
         except PermissionError: print('owner outside')\n\
         else: print('owner', 'outside' if os.fstat(o).st_ino != os.stat('/proc/self/ns/user').st_ino else 'inside')\"",
    );
    assert_eq!(
        text(&out.stdout),
        "owner outside\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn run_by_root_a_home_the_workspace_uid_does_not_own_is_refused() {
    if !host_root() {
        return;
    }
    let ws = Workspace::new();
    std::os::unix::fs::chown(ws.home(), Some(0), Some(0)).unwrap();
    let out = ws.run("echo started");
    assert!(!out.status.success());
    assert!(!text(&out.stdout).contains("started"));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("as the agent's home")
            && stderr.contains(&moat_guest_init::ROOT_RUN_ID.to_string()),
        "stderr: {stderr}"
    );
}

#[test]
fn run_by_root_the_default_home_is_given_to_the_workspace_uid() {
    if !host_root() {
        return;
    }
    let ws = Workspace::new();
    // The same command without --home: a fresh home in the run directory.
    let with_home = ws.command("touch ~/made-inside && stat -c %u:%a ~ && echo home=ok");
    let mut cmd = Command::new(with_home.get_program());
    let mut args = with_home.get_args();
    while let Some(arg) = args.next() {
        if arg == "--home" {
            args.next();
        } else {
            cmd.arg(arg);
        }
    }
    let out = cmd.env("MOAT_LOG", "warn").output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "0:700\nhome=ok\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn run_by_root_the_run_directory_is_open_to_the_workspace_gid_only() {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    if !host_root() {
        return;
    }
    let id = moat_guest_init::ROOT_RUN_ID;
    let ws = Workspace::new();
    // The run directory's name is random (mkdtemp): give this run a temporary directory of its
    // own, searchable by the workspace uid as /tmp is, and find it there.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut child = ws
        .command("echo ready; sleep 30")
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let run_dir = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("moat-")
        })
        .expect("the run directory");
    let owner_mode = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    // Root's, the workspace's gid may only search it and connect to the two sockets.
    let found = [
        owner_mode(&run_dir),
        owner_mode(&run_dir.join("vsock_1025")),
        owner_mode(&run_dir.join("vsock_1026")),
    ];
    // Another host user reaches nothing in it.
    let other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(run_dir.join("resolv.conf"))
        .output()
        .unwrap();
    // SIGTERM, so that `moat run` removes the run directory.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = child.wait();
    assert!(!run_dir.exists());
    assert_eq!(found, [(0, id, 0o710), (0, id, 0o660), (0, id, 0o660)]);
    assert!(!other.status.success());
    assert!(text(&other.stderr).contains("Permission denied"));
}
