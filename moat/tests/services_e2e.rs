//! Workspace services through the namespace backend (run as root, as on our machines and CI:
//! each service is a host uid of its own): a model server started before the agent, reached
//! through its loopback port, and out of the agent's reach otherwise. Each barrier has its
//! own test, which fails where that barrier is removed (docs/inference.md says how each was
//! shown to).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[allow(unused_macros)]
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::services::{
    HELLO_ANSWER, LOCAL_ROUTE, PORT, WEIGHTS, inference_dir, openai_chat, openai_python,
    services_file,
};
use common::{Workspace, text};

fn root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("not root: the namespace backend refuses services, nothing to check");
    }
    root
}

/// A stand-in GPU: a character device node of the host's (1:5, /dev/zero's numbers) outside
/// /dev, which the service is given with `--device` (no GPU on our machines).
fn stand_in_device(dir: &Path) -> PathBuf {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let node = dir.join("gpu0");
    mknod(
        &node,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 5),
    )
    .unwrap();
    node
}

/// One workspace whose agent runs the probe (moat/tests/inference/probe.py) against the
/// service `llm`; the barrier tests below read its answer.
struct Probe {
    answer: serde_json::Value,
    stderr: String,
    _ws: Workspace,
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        let mut ws = Workspace::new();
        let device = stand_in_device(ws.dir.path());
        let file = services_file(&ws, &[]);
        ws.args = vec![
            "--services".into(),
            file.into(),
            "--device".into(),
            device.into(),
        ];
        // The home starts empty (run by root, moat hands it to the workspace's uid).
        let probe = std::fs::read(inference_dir().join("probe.py")).unwrap();
        let hex: String = probe.iter().map(|b| format!("{b:02x}")).collect();
        let out = ws.run(&format!(
            "python3 -c \"exec(bytes.fromhex('{hex}').decode())\" llm"
        ));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{stdout}{stderr}");
        let answer: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
        assert!(
            answer["pid"].is_u64(),
            "the agent sees the service's pid: {answer}"
        );
        assert_ne!(answer["pid"], 1, "the service, not PID 1: {answer}");
        eprintln!("the probe: {answer}");
        Probe {
            answer,
            stderr,
            _ws: ws,
        }
    })
}

fn refused(what: &str) {
    if !root() {
        return;
    }
    let p = probe();
    let got = p.answer[what].as_str().unwrap_or("missing");
    assert_ne!(
        got, "allowed",
        "the agent did {what}: {}\n{}",
        p.answer, p.stderr
    );
    assert_ne!(got, "missing", "{}", p.answer);
}

#[test]
fn the_agent_cannot_ptrace_a_service() {
    refused("ptrace");
}

#[test]
fn the_agent_cannot_signal_a_service() {
    refused("signal");
}

#[test]
fn the_agent_cannot_open_a_services_memory_environment_or_maps() {
    refused("mem");
    refused("environ");
    refused("maps");
    refused("proc_root");
}

#[test]
fn the_agent_cannot_read_a_services_models() {
    refused("models");
    refused("models_dir");
    refused("services_dir");
}

#[test]
fn the_agent_cannot_see_a_services_device() {
    refused("device");
    refused("device_in_dev");
}

/// The service's side: its own uid (mapped to a host uid of its own), a pid namespace where it
/// is alone under our init, its device in its /dev, the agent's /tmp and home hidden, and
/// its start and end in the audit log, named.
#[test]
fn a_service_runs_as_its_own_uid_alone_in_its_pid_namespace_with_its_device() {
    if !root() {
        return;
    }
    let mut ws = Workspace::new();
    let device = stand_in_device(ws.dir.path());
    // The service reports on standard error (PID 1's, the workspace's), then listens on a
    // port, so the agent starts only once it has reported.
    let script = "{ id -u; grep '^ *900 ' /proc/self/uid_map; echo pid=$$; \
                  head -c 4 /dev/gpu0 | od -An -tx1; \
                  { ls -A /tmp; ls -A /home; } 2>/dev/null | wc -l; \
                  echo tmp=$TMPDIR; touch $TMPDIR/own && echo wrote; } >&2\n\
                  exec python3 -m http.server --bind 127.0.0.1 8001 >/dev/null 2>&1\n";
    let models = ws.dir.path().join("look-models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("look.sh"), script).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [&models, &models.join("look.sh")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let file = ws.dir.path().join("services.toml");
    std::fs::write(
        &file,
        format!(
            "[[service]]\nname = \"look\"\ncommand = [\"sh\", \"/run/moat-services/look/models/look.sh\"]\n\
             port = 8001\nmodels = {models:?}\ndevices = [{device:?}]\n"
        ),
    )
    .unwrap();
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run("id -u");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("moat")).collect();
    assert_eq!(lines[0], "900", "the service's uid inside: {stderr}");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map[0], "900");
    let host: u32 = map[1].parse().unwrap();
    assert!(moat_guest_init::ids::is_run_id(host), "{stderr}");
    let agent_map = std::fs::metadata(ws.home()).unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::uid(&agent_map),
        host,
        "a host uid of its own, not the agent's"
    );
    assert_eq!(
        lines[2], "pid=2",
        "alone with our init in its pid namespace: {stderr}"
    );
    assert_eq!(lines[3].trim(), "00 00 00 00", "its device works: {stderr}");
    assert_eq!(
        lines[4].trim(),
        "0",
        "the agent's /tmp and home are hidden: {stderr}"
    );
    assert_eq!(lines[5], "tmp=/run/moat-services/look/tmp");
    assert_eq!(lines[6], "wrote", "{stderr}");
    let records: Vec<serde_json::Value> = ws
        .audit()
        .into_iter()
        .filter(|r| r["class_uid"] == 1007 && r["unmapped"]["moat"]["service"] == "look")
        .collect();
    assert_eq!(records.len(), 2, "its launch and its end: {records:#?}");
    assert_eq!(records[0]["activity_name"], "Launch");
    assert_eq!(records[1]["activity_name"], "Terminate");
    assert_eq!(
        records[1]["exit_code"], 143,
        "stopped with SIGTERM after the agent"
    );
    common::validate_ocsf(&ws.dir.path().join("audit.jsonl"));
}

/// The agent reaches the model server on its loopback port: it is up before the agent starts.
#[test]
fn the_agent_reaches_a_service_on_its_loopback_port() {
    if !root() {
        return;
    }
    let mut ws = Workspace::new();
    let file = services_file(&ws, &[]);
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run(&format!(
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:{PORT}/v1/models\").read().decode())'"
    ));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("moat-standin-bigram"), "{stdout}{stderr}");
    assert!(!stdout.contains(WEIGHTS));
}

/// A service that exits is started again as often as its spec allows, every end reported.
#[test]
fn a_service_that_exits_is_restarted_and_each_end_reported() {
    if !root() {
        return;
    }
    let ws = Workspace::new();
    let file = ws.dir.path().join("services.toml");
    std::fs::write(
        &file,
        "[[service]]\nname = \"flaky\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\nrestart = true\n",
    )
    .unwrap();
    let mut ws = ws;
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run("sleep 2");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ends: Vec<serde_json::Value> = ws
        .audit()
        .into_iter()
        .filter(|r| {
            r["unmapped"]["moat"]["service"] == "flaky" && r["activity_name"] == "Terminate"
        })
        .collect();
    assert_eq!(
        ends.len(),
        4,
        "one start and three restarts: {ends:#?}\n{stderr}"
    );
    assert!(ends.iter().all(|r| r["exit_code"] == 3), "{ends:#?}");
    assert!(
        stderr.contains("service \"flaky\" exited with status 3"),
        "{stderr}"
    );
}

#[test]
fn services_are_refused_with_a_clear_error() {
    let mut ws = Workspace::new();
    ws.args = vec!["--service".into(), "Bad Name=x".into()];
    let out = ws.run("true");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("\"Bad Name\" is not a service name"),
        "{}",
        text(&out.stderr)
    );
}

/// Local inference with the real OpenAI client, on the host's root where its venv is: the
/// agent asks `http://inference.local/v1`, a name the signed policy routes to the workspace
/// service `llm`, and gets the local model's completion; the egress proxy never sees the flow.
#[test]
fn the_openai_client_gets_a_completion_from_the_local_model_as_inference_local() {
    if !root() {
        return;
    }
    let python = openai_python();
    let mut ws = Workspace::host_root().with_rules(LOCAL_ROUTE);
    let file = services_file(&ws, &[]);
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run(&openai_chat(&python, "http://inference.local/v1"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), HELLO_ANSWER, "{stderr}");
    assert!(
        stderr.contains("inference.local:80 is answered in the workspace by service \"llm\""),
        "{stderr}"
    );
    let to_proxy: Vec<_> = ws
        .audit()
        .into_iter()
        .filter(|r| r["class_uid"] != 1007 && r.to_string().contains("inference.local"))
        .collect();
    assert!(to_proxy.is_empty(), "the proxy saw it: {to_proxy:#?}");
}

/// The control: without the policy's local route, the same name is the egress proxy's to
/// decide, and this policy allows it nowhere.
#[test]
fn without_the_policys_local_route_inference_local_is_the_proxys_and_refused() {
    if !root() {
        return;
    }
    let python = openai_python();
    let mut ws = Workspace::host_root();
    let file = services_file(&ws, &[]);
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run(&openai_chat(&python, "http://inference.local/v1"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(!stdout.contains(HELLO_ANSWER), "{stdout}");
    assert!(
        ws.reasons().iter().any(|r| r == "no_rule"),
        "refused by the proxy: {:?}",
        ws.reasons()
    );
}

/// The agent's OpenAI client also reaches the service directly on its loopback port.
#[test]
fn the_openai_client_gets_a_completion_on_the_services_loopback_port() {
    if !root() {
        return;
    }
    let python = openai_python();
    let mut ws = Workspace::host_root();
    let file = services_file(&ws, &[]);
    ws.args = vec!["--services".into(), file.into()];
    let out = ws.run(&openai_chat(
        &python,
        &format!("http://127.0.0.1:{PORT}/v1"),
    ));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), HELLO_ANSWER, "{stderr}");
}

/// A process joined to a running workspace (`moat __exec`: the containerd shim's exec) is
/// confined like the agent, the services' files out of its view too.
#[test]
fn a_process_joined_to_the_workspace_cannot_read_a_services_models() {
    if !root() {
        return;
    }
    let mut ws = Workspace::new();
    let file = services_file(&ws, &[]);
    ws.args = vec!["--services".into(), file.into()];
    let mut run = ws.command("sleep 60").spawn().unwrap();
    // `__exec` waits for the workspace's PID 1 to have started its agent.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["__exec", "--workspace-pid", &run.id().to_string(), "--"])
        .args([
            "sh",
            "-c",
            "ls -A /run/moat-services; echo listed; cat /run/moat-services/llm/models/weights.bin",
        ])
        .output()
        .unwrap();
    let _ = run.kill();
    let _ = run.wait();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.starts_with("listed"),
        "the services' directory is not empty to an exec: {stdout}{stderr}"
    );
    assert!(
        !stdout.contains(WEIGHTS) && !out.status.success(),
        "an exec read the service's models: {stdout}{stderr}"
    );
}
