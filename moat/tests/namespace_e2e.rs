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

/// The same scenarios on the host's root (`moat run --host-root`), the mode kept for hosts
/// without the root image.
mod host_root {
    use super::common;
    use super::common::Workspace;

    macro_rules! host_root_scenarios {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    common::scenarios::$name(&Workspace::host_root());
                }
            )*
        };
    }
    every_backend_scenario!(host_root_scenarios);
}

/// The same scenarios on a root unpacked from an OCI image (`moat run --image`): the root
/// image's own tree as a one-layer OCI archive, so everything the agent does above works the
/// same from an image.
mod oci_image {
    use super::common;
    use super::common::Workspace;

    macro_rules! oci_image_scenarios {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    common::scenarios::$name(&Workspace::from_oci_image("namespace", None));
                }
            )*
        };
    }
    every_backend_scenario!(oci_image_scenarios);

    #[test]
    fn the_root_is_the_images_and_named_by_its_digest() {
        let ws = Workspace::from_oci_image("namespace", None);
        let out = ws.run("head -1 /etc/os-release; test -e /proc/self && echo proc");
        let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains("Debian GNU/Linux 12") && stdout.contains("proc"),
            "{stdout}"
        );
        let said = stderr
            .lines()
            .find(|l| l.starts_with("moat: the workspace's root: "))
            .unwrap_or_else(|| panic!("no root line in: {stderr}"));
        let cache = common::image_cache();
        assert!(said.contains(&*cache.to_string_lossy()), "{said}");
        assert!(
            stderr.contains("(sha256:") && said.ends_with("/root"),
            "the image is named by its digest: {stderr}"
        );
    }
}

/// HTTP rules on the intercepted api.test, with real curl through the whole path: the GET an
/// HTTP rule allows gets the secret, the POST none allows is answered 403 by the proxy, naming
/// the rule (over HTTP/2 with and without a body, and over HTTP/1.1), and all are audited with
/// the HTTP rule that decided.
/// Every refusal of an intercepted request that comes before its body is read reaches an
/// HTTP/2 client as the refusal page, not as a stream reset (the body is drained first).
#[test]
fn a_refused_http2_request_with_a_body_reads_the_refusal_not_a_stream_error() {
    let ws = Workspace::new();
    let out = ws.run(&format!(
        "head -c 30000 /dev/zero | tr '\\0' x > /tmp/body; curl -sS --http2 -X TRACE --data-binary @/tmp/body -w '%{{http_code}}\\n' {}",
        ws.url("api.test", "/auth")
    ));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("moat: request refused (request_refused): TRACE echoes")
            && stdout.ends_with("501\n"),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn http_rules_let_curl_get_and_refuse_its_post_with_a_403_naming_the_rule() {
    let ws = Workspace::new().with_http_rules(
        "[rules.http]\ndefault = \"deny\"\n\n[[rules.http.requests]]\nname = \"read-auth\"\n\
         methods = [\"GET\"]\npaths = [\"/auth\"]\naction = \"allow\"\n",
    );
    let url = ws.url("api.test", "/auth");
    let out = ws.run(&format!(
        "curl -sS -H 'Authorization: Bearer {p}' {url}; \
         curl -sS -X POST -w '%{{http_code}}\\n' -H 'Authorization: Bearer {p}' {url}; \
         curl -sS --http1.1 -X POST -d x -w '%{{http_code}}\\n' {url}; \
         curl -sS -X POST -d x -w '%{{http_code}}\\n' {url}",
        p = common::E2E_PLACEHOLDER
    ));
    let stdout = text(&out.stdout);
    let refused = "moat: request refused (http_rule_denied): POST /auth is denied by the \
                   default of rule \"api\" (no HTTP rule matched)\n403\n";
    assert_eq!(
        stdout,
        format!("auth: ok\n{refused}{refused}{refused}"),
        "stderr: {}",
        text(&out.stderr)
    );
    let http: Vec<_> = ws
        .audit()
        .into_iter()
        .filter(|r| r["class_uid"] == 4002)
        .collect();
    let rule_of = |method: &str| {
        let r = http
            .iter()
            .find(|r| r["http_request"]["http_method"] == method)
            .unwrap();
        (
            r["unmapped"]["moat"]["http_rule"]
                .as_str()
                .map(str::to_owned),
            r["disposition"].as_str().map(str::to_owned),
        )
    };
    assert_eq!(
        rule_of("GET"),
        (Some("read-auth".into()), Some("Allowed".into()))
    );
    assert_eq!(
        rule_of("POST"),
        (Some("default".into()), Some("Blocked".into()))
    );
}

/// An upstream that echoes the request hands curl the placeholder where the injected secret
/// was, over HTTP/2 and HTTP/1.1 to the proxy, and the reflection is audited, blaming the
/// upstream.
#[test]
fn an_echoing_upstream_hands_curl_only_the_placeholder() {
    let ws = Workspace::new();
    let url = ws.url("api.test", "/echo");
    let out = ws.run(&format!(
        "curl -sS --compressed -H 'Authorization: Bearer {p}' {url}; \
         curl -sS --http1.1 -H 'Authorization: Bearer {p}' {url}",
        p = common::E2E_PLACEHOLDER
    ));
    let stdout = text(&out.stdout);
    // The placeholder cut to the secret's length: the echo keeps its Content-Length.
    let shown = &common::E2E_PLACEHOLDER[..common::E2E_SECRET.len()];
    assert!(
        !stdout.contains(common::E2E_SECRET)
            && stdout
                .matches(&format!("authorization: Bearer {shown}\r\n"))
                .count()
                == 2,
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    // Asked for an uncompressed answer, whatever curl accepts, so it could be scanned.
    assert!(stdout.contains("accept-encoding: identity\r\n"), "{stdout}");
    let reflected: Vec<_> = ws
        .audit()
        .into_iter()
        .filter(|r| r["unmapped"]["moat"]["reason"] == "secret_reflected")
        .collect();
    assert_eq!(reflected.len(), 2, "{reflected:?}");
    assert!(
        reflected
            .iter()
            .all(|r| r["unmapped"]["moat"]["blame"] == "upstream"
                && r["unmapped"]["moat"]["secrets_reflected"][0]["name"] == "api"),
        "{reflected:?}"
    );
}

#[test]
fn an_auto_placeholder_is_fresh_per_start_in_the_agents_env_and_required() {
    let ws = Workspace::new();
    let show = format!("echo ${}", common::E2E_AUTO_ENV);
    let first = text(&ws.run(&show).stdout);
    let second = text(&ws.run(&show).stdout);
    assert!(first.starts_with("sk-moat-"), "{first:?}");
    assert_ne!(first, second, "two starts drew the same placeholder");
    // With the placeholder the secret is injected; without it the request is refused.
    let url = ws.url("api.test", "/auth-required");
    let out = ws.run(&format!(
        "curl -sS -H \"Authorization: Bearer ${}\" {url}; \
         curl -sS -o /dev/null -w '%{{http_code}}\\n' {url}",
        common::E2E_AUTO_ENV
    ));
    assert_eq!(
        text(&out.stdout),
        "auth: ok\n403\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        ws.reasons().contains(&"placeholder_required".to_owned()),
        "audit: {:?}",
        ws.reasons()
    );
}

#[test]
fn tls_clients_are_pointed_at_the_workspace_trust_store() {
    for (ws, root) in [
        (Workspace::new(), common::root_image()),
        (Workspace::host_root(), "/".into()),
    ] {
        let out = ws.run("echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $GIT_SSL_CAINFO; grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE");
        let stdout = text(&out.stdout);
        let mut lines = stdout.lines();
        assert_eq!(
            lines.next().unwrap(),
            ["/etc/ssl/certs/ca-certificates.crt"; 4].join(" ")
        );
        let root_count = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))
            .unwrap_or_default()
            .matches("BEGIN CERTIFICATE")
            .count();
        // The root's own roots (the image's, or the host's), the egress proxy's workspace CA,
        // and the --ca given.
        assert_eq!(
            lines.next().unwrap().parse::<usize>().unwrap(),
            root_count + 2,
            "root {}",
            root.display()
        );
    }
}

/// A directory outside /tmp, /run, /home and /root (which every workspace masks), readable by
/// everyone: where a host file would be visible under `--host-root`.
fn unmasked_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let target_tmp = env!("CARGO_TARGET_TMPDIR");
    let hidden = ["/tmp/", "/home/", "/root/", "/run/"];
    let base = if hidden.iter().any(|h| target_tmp.starts_with(h)) {
        "/var/tmp"
    } else {
        target_tmp
    };
    let dir = tempfile::tempdir_in(base).unwrap();
    // Every directory above it searchable, as the workspace's own uid would need.
    let mut p = dir.path().to_path_buf();
    while p.pop() && p != Path::new("/") {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by others",
            p.display()
        );
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn the_workspace_root_is_the_image_and_no_host_file_is_in_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = unmasked_dir();
    let marker = dir.path().join("host-marker");
    std::fs::write(&marker, "HOST-FILE-MARKER\n").unwrap();
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        "cat {} 2>/dev/null; echo status=$?; head -1 /etc/os-release; test -e {} && echo moat-binary",
        marker.display(),
        env!("CARGO_BIN_EXE_moat")
    );
    let out = Workspace::new().run(&script);
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("HOST-FILE-MARKER") && stdout.contains("status=1"),
        "a host file is visible on the root image: {stdout} {}",
        text(&out.stderr)
    );
    assert!(!stdout.contains("moat-binary"), "{stdout}");
    assert!(stdout.contains("Debian GNU/Linux 12"), "{stdout}");
    // The control: under --host-root the same file is there.
    let out = Workspace::host_root().run(&script);
    assert!(
        text(&out.stdout).contains("HOST-FILE-MARKER"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_secret_source_or_run_directory_visible_inside_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    // A secret whose source file lies where the host's root shows it.
    let dir = unmasked_dir();
    let ws = Workspace::host_root();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "sk-visible\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = ws.dir.path();
    let profile = std::fs::read_to_string(d.join("policy.toml"))
        .unwrap()
        .replace(
            &d.join("secret").display().to_string(),
            &secret.display().to_string(),
        );
    let key = moat_policy::signing::generate("").unwrap();
    std::fs::write(d.join("policy.pub"), &key.public).unwrap();
    let sig = moat_policy::signing::sign(profile.as_bytes(), &key.secret, "").unwrap();
    std::fs::write(d.join("policy.toml"), &profile).unwrap();
    std::fs::write(d.join("policy.toml.minisig"), sig).unwrap();
    let out = ws.run("echo started");
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && !text(&out.stdout).contains("started"));
    assert!(
        stderr.contains("refusing to start") && stderr.contains("the secret \"api\"'s source"),
        "{stderr}"
    );
    // On the root image, the same profile starts: the file is not in the workspace's view.
    let image = Workspace {
        host_root: false,
        ..Workspace::host_root()
    };
    for f in ["policy.toml", "policy.toml.minisig", "policy.pub"] {
        std::fs::copy(d.join(f), image.dir.path().join(f)).unwrap();
    }
    let out = image.run("echo started");
    assert_eq!(text(&out.stdout), "started\n", "{}", text(&out.stderr));

    // The run directory (the proxy's sockets) under a temporary directory the root shows.
    let tmp = unmasked_dir();
    let out = Workspace::host_root()
        .command("echo started")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("the run directory"),
        "{stderr}"
    );
}

#[test]
fn the_default_audit_log_is_kept_on_disk_outside_the_temporary_directory() {
    let ws = Workspace::new();
    let state = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let with_audit = ws.command("echo ok");
    let mut cmd = Command::new(with_audit.get_program());
    let mut args = with_audit.get_args();
    while let Some(arg) = args.next() {
        if arg == "--audit" {
            args.next();
        } else {
            cmd.arg(arg);
        }
    }
    let out = cmd
        .env("MOAT_LOG", "warn")
        .env("XDG_STATE_HOME", state.path())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    let path = stderr
        .lines()
        .find_map(|l| l.split("audit: ").nth(1))
        .map(|p| p.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| panic!("no audit path in {stderr}"));
    let expected_dir = if nix::unistd::Uid::effective().is_root() {
        std::path::PathBuf::from("/var/log/moat")
    } else {
        state.path().join("moat")
    };
    assert!(
        Path::new(&path).starts_with(&expected_dir),
        "{path} not in {}",
        expected_dir.display()
    );
    assert!(!Path::new(&path).starts_with(std::env::temp_dir()));
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("\"class_uid\":1007"), "{log}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn pid_1_and_guest_init_hold_none_of_moat_runs_environment() {
    use std::io::{BufRead, Write};
    let ws = Workspace::new();
    let mut child = ws
        .command("echo ready; read line")
        .env("MOAT_E2E_ENV_SECRET", "ENV-SECRET-MARKER")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // `__guest-init` (moat run's child), PID 1 (its child) and whatever they started.
    let mut seen = Vec::new();
    let mut queue = children(child.id());
    while let Some(pid) = queue.pop() {
        queue.extend(children(pid));
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            seen.push((
                pid,
                String::from_utf8_lossy(&env).contains("ENV-SECRET-MARKER"),
            ));
        }
    }
    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        !seen.is_empty(),
        "no process of the workspace could be read"
    );
    assert!(
        seen.iter().all(|(_, has)| !has),
        "moat run's environment reached {seen:?}"
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
    for ws in [Workspace::new(), Workspace::host_root()] {
        let out = ws.run(
            "ls -A /root | wc -l; wc -c < /etc/shadow; cat /etc/ssh/ssh_host_*_key 2>/dev/null | wc -c",
        );
        let lines: Vec<String> = text(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .collect();
        assert_eq!(lines, ["0", "0", "0"], "stderr: {}", text(&out.stderr));
    }
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
    let ws = Workspace::new();
    let out = ws.run("cat /proc/self/uid_map /proc/self/gid_map; id -u; echo made > ~/made-inside");
    let maps: Vec<Vec<String>> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let id: u32 = maps[0][1].parse().unwrap();
    assert!(moat_guest_init::ids::is_run_id(id), "{id}");
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
    let dir = unmasked_dir();
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "ROOT-ONLY-MARKER\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ws = Workspace::host_root();
    // The first run hands the empty home to the workspace's uid (kept for the next).
    assert!(ws.run("true").status.success());
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
    // Root's and not empty: neither a home moat may hand over nor a kept one.
    std::fs::write(ws.home().join("root-file"), b"x").unwrap();
    let out = ws.run("echo started");
    assert!(!out.status.success());
    assert!(!text(&out.stdout).contains("started"));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is owned by uid 0")
            && stderr.contains(&moat_guest_init::ids::FIRST_RUN_ID.to_string()),
        "stderr: {stderr}"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(ws.home()).unwrap()),
        0,
        "left as it was"
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
    let id = found[0].1;
    assert!(moat_guest_init::ids::is_run_id(id), "{found:?}");
    assert_eq!(found, [(0, id, 0o710), (0, id, 0o660), (0, id, 0o660)]);
    assert!(!other.status.success());
    assert!(text(&other.stderr).contains("Permission denied"));
}

#[test]
fn run_by_root_each_workspace_is_a_host_uid_of_its_own_and_a_kept_home_keeps_its_uid() {
    use std::io::{BufRead, Write};
    if !host_root() {
        return;
    }
    let (a, b) = (Workspace::new(), Workspace::new());
    let uid_of = |out: &str| -> u32 {
        out.split_whitespace()
            .nth(1)
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no uid map in {out:?}"))
    };
    // A runs while B starts: two running workspaces, two host uids.
    let mut first = a
        .command("head -1 /proc/self/uid_map; read line")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let id_a = uid_of(&line);
    let out = b.run("head -1 /proc/self/uid_map");
    let id_b = uid_of(&text(&out.stdout));
    first.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(first.wait().unwrap().success());
    assert_ne!(id_a, id_b, "two workspaces share host uid {id_a}");
    // A's kept home is not B's to read: it belongs to A's uid alone.
    let meta = std::fs::metadata(a.home()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), id_a);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
        0
    );
    // The next run with A's home is A's uid again.
    let again = a.run("head -1 /proc/self/uid_map");
    assert_eq!(uid_of(&text(&again.stdout)), id_a);
}

/// The MCP SDK's python (`cargo xtask test` installs it into .venv-mcp, from
/// moat/tests/mcp/requirements.txt, and sets MOAT_MCP_PYTHON).
fn mcp_python() -> std::path::PathBuf {
    let python = std::env::var("MOAT_MCP_PYTHON").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-mcp/bin/python"),
        std::path::PathBuf::from,
    );
    assert!(
        python.exists(),
        "the MCP SDK is not installed: run `cargo xtask test` (it installs it into .venv-mcp) \
         or set MOAT_MCP_PYTHON"
    );
    python
}

/// The Python SDK's MCP server (moat/tests/mcp/server.py) over TLS on 127.0.0.1 as `mcp.test`,
/// with a certificate from a CA of its own; killed when dropped.
struct McpServer {
    child: std::process::Child,
    port: u16,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl McpServer {
    fn start(python: &Path, json: bool) -> McpServer {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        use std::io::BufRead;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "moat e2e MCP CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["mcp.test".into()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "mcp.test");
        let leaf = leaf.signed_by(&key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let mut cmd = Command::new(python);
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/server.py"))
            .arg(dir.path().join("cert.pem"))
            .arg(dir.path().join("key.pem"));
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the MCP server printed {line:?}, not its port"));
        McpServer {
            child,
            port,
            ca_pem: ca.pem(),
            _dir: dir,
        }
    }

    /// Stops the server and returns what it wrote on stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        err
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workspace (on the host's root, where the MCP SDK's venv is) whose policy intercepts
/// mcp.test with MCP rules: every method, the tool `echo`, not `delete_everything`.
fn mcp_workspace(server: &McpServer) -> Workspace {
    let mut ws = Workspace::host_root().with_rules(&format!(
        "[[rules]]\nname = \"mcp\"\nhosts = [\"mcp.test\"]\nports = [{}]\naction = \"intercept\"\n\
         cidrs = [\"127.0.0.0/8\"]\n\n[rules.mcp]\npath = \"/mcp\"\n\
         methods = {{ default = \"allow\" }}\n\
         tools = {{ default = \"deny\", allow = [\"echo\"], deny = [\"delete_everything\"] }}\n",
        server.port
    ));
    // The proxy verifies the MCP server against its CA too (--upstream-ca is a bundle).
    let ca = ws.dir.path().join("ca.pem");
    let mut bundle = std::fs::read_to_string(&ca).unwrap();
    bundle.push_str(&server.ca_pem);
    std::fs::write(&ca, bundle).unwrap();
    ws.resolve.push("mcp.test=127.0.0.1".into());
    ws
}

/// MCP rules with the Python SDK's own client and server, through the whole path: in both of
/// the SDK's modes (the 2026-07-28 protocol answered with JSON; the legacy session answered as
/// SSE streams) `tools/list` shows the agent only `echo`, `echo` is called, and the call of
/// `delete_everything` is refused by the proxy with a JSON-RPC error naming the rule, which
/// the client raises; the server never runs it. Every request is audited with what MCP rules
/// saw, and the audit log is valid OCSF.
#[test]
fn mcp_rules_filter_tools_list_allow_echo_and_refuse_a_denied_tool_call() {
    let python = mcp_python();
    for json in [true, false] {
        let server = McpServer::start(&python, json);
        let ws = mcp_workspace(&server);
        let url = format!("https://mcp.test:{}/mcp", server.port);
        let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client.py");
        let py = python.display();
        let out = ws.run(&format!(
            "{py} {client} {url} auto; {py} {client} {url} legacy"
        ));
        let stdout = text(&out.stdout);
        let refused = "delete_everything: MCPError: moat egress refused this request: tools/call \
                       of tool \"delete_everything\" is denied by tools.deny of rule \"mcp\"'s \
                       MCP rules\n";
        let once = format!("tools: echo\necho: echo: hi\n{refused}");
        assert_eq!(
            stdout,
            format!("{once}{once}"),
            "json answers: {json}\nstderr: {}",
            text(&out.stderr)
        );
        let server_err = server.stop();
        assert!(
            !server_err.contains("DELETE-EVERYTHING-RAN"),
            "{server_err}"
        );

        let mcp: Vec<serde_json::Value> = ws
            .audit()
            .into_iter()
            .filter(|r| r["class_uid"] == 4002 && r["firewall_rule"]["name"] == "mcp")
            .collect();
        let denied: Vec<_> = mcp
            .iter()
            .filter(|r| r["unmapped"]["moat"]["reason"] == "mcp_denied")
            .collect();
        assert_eq!(denied.len(), 2, "{mcp:#?}");
        assert_eq!(denied[0]["http_response"]["code"], 403);
        assert_eq!(denied[0]["disposition"], "Blocked");
        assert_eq!(
            denied[0]["unmapped"]["moat"]["mcp"]["messages"][0],
            serde_json::json!({"method": "tools/call", "tool": "delete_everything", "mcp_rule": "tools.deny"})
        );
        let hidden: Vec<_> = mcp
            .iter()
            .filter(|r| {
                r["unmapped"]["moat"]["mcp"]["tools_hidden"]
                    == serde_json::json!(["delete_everything"])
            })
            .collect();
        assert_eq!(
            hidden.len(),
            2,
            "one filtered tools/list per mode: {mcp:#?}"
        );
        assert!(
            mcp.iter().any(
                |r| r["unmapped"]["moat"]["mcp"]["messages"][0]["tool"] == "echo"
                    && r["disposition"] == "Allowed"
            ),
            "{mcp:#?}"
        );
        common::validate_ocsf(&ws.dir.path().join("audit.jsonl"));
    }
}

/// MCP rules with curl: a batch holding one denied call is refused whole (403, one JSON-RPC
/// error per request, nothing forwarded), a body nested past the bound is refused 400 with a
/// parse error, and another HTTP method on the endpoint 403.
#[test]
fn mcp_rules_refuse_a_batch_with_a_denied_call_whole_and_bodies_past_the_bounds() {
    let python = mcp_python();
    let server = McpServer::start(&python, true);
    let ws = mcp_workspace(&server);
    let url = format!("https://mcp.test:{}/mcp", server.port);
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_everything","arguments":{}}}]"#;
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":{}1{}}}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let curl = "curl -sS -H 'content-type: application/json' \
                -H 'accept: application/json, text/event-stream' -w '\\n%{http_code}\\n'";
    let out = ws.run(&format!(
        "{curl} --data '{batch}' {url}; {curl} --data '{deep}' {url}; {curl} -X PUT --data x {url}"
    ));
    let stdout = text(&out.stdout);
    // A text page ends in its own newline: the blank line before its status is dropped.
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 6, "{stdout}\nstderr: {}", text(&out.stderr));
    let errors: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(lines[1], "403");
    assert_eq!(errors[0]["id"], 1);
    assert!(
        errors[0]["error"]["message"].as_str().unwrap().starts_with(
            "moat egress did not send this request: a batch of 2 messages is refused whole"
        ),
        "{errors}"
    );
    assert_eq!(errors[1]["id"], 2);
    assert_eq!(errors[1]["error"]["code"], -32001);
    assert_eq!(errors[1]["error"]["data"]["mcp_rule"], "tools.deny");
    let parse: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(
        (lines[3], &parse["error"]["code"]),
        ("400", &serde_json::json!(-32700))
    );
    assert!(
        lines[4].contains("PUT is not part of MCP's streamable HTTP transport"),
        "{stdout}"
    );
    assert_eq!(lines[5], "403");
    let server_err = server.stop();
    assert!(
        !server_err.contains("DELETE-EVERYTHING-RAN"),
        "{server_err}"
    );
    let reasons = ws.reasons();
    for want in ["mcp_denied", "mcp_malformed"] {
        assert!(reasons.contains(&want.to_owned()), "{reasons:?}");
    }
}
