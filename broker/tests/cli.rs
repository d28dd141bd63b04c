//! The `moat-broker` binary's offline commands, and its refusal to serve without its identity
//! provider (fail closed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const BROKER: &str = env!("CARGO_BIN_EXE_moat-broker");

fn config(dir: &Path) -> std::path::PathBuf {
    std::fs::write(dir.join("secret"), "s\n").unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            r#"
listen = "127.0.0.1:0"
tunnel_listen = "127.0.0.1:0"
public_url = "https://broker.test"
server_names = ["broker.test"]
state_dir = "{d}/state"
admin_socket = "{d}/run/admin.sock"
audit = "{d}/audit.jsonl"

[oidc]
issuer = "https://127.0.0.1:1"
client_id = "moat-broker"
client_secret_file = "{d}/secret"

[[workspaces]]
name = "ws1"
groups = ["eng"]
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

fn broker(args: &[&str]) -> Output {
    Command::new(BROKER).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn enrol_writes_a_workspace_identity_with_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let out = dir.path().join("ws1");

    let run = broker(&[
        "enrol",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "ws1",
    ]);

    assert!(run.status.success(), "{}", text(&run.stderr));
    for key in ["workspace.key", "ssh_host_ed25519_key"] {
        let mode = std::fs::metadata(out.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    assert!(read("workspace.crt").contains("BEGIN CERTIFICATE"));
    assert!(read("broker-ca.pem").contains("BEGIN CERTIFICATE"));
    // What `moat run --tunnel` needs: where the broker is, and who this workspace is.
    let enrolment = moat_broker::enrolment::read_dir(&out).unwrap();
    assert_eq!(enrolment.tunnel.workspace.as_str(), "ws1");
    assert!(enrolment.ssh_user_ca.starts_with("ssh-ed25519 "));
    // The host key, printed for people's known_hosts, is the one written.
    assert!(
        text(&run.stdout).contains(&format!("ws1 {}", enrolment.ssh_host_key_pub)),
        "{}",
        text(&run.stdout)
    );
}

#[test]
fn enrol_refuses_a_workspace_the_configuration_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());

    let run = broker(&[
        "enrol",
        "--config",
        config.to_str().unwrap(),
        "--out",
        dir.path().join("ws9").to_str().unwrap(),
        "ws9",
    ]);

    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("ws9 is not a workspace"),
        "{}",
        text(&run.stderr)
    );
}

#[test]
fn ssh_ca_prints_the_same_user_ca_key_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());

    let first = broker(&["ssh-ca", "--config", config.to_str().unwrap()]);
    let second = broker(&["ssh-ca", "--config", config.to_str().unwrap()]);

    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).starts_with("ssh-ed25519 "));
    assert_eq!(first.stdout, second.stdout);
}

#[test]
fn a_broker_that_cannot_reach_its_identity_provider_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());

    let run = broker(&["serve", "--config", config.to_str().unwrap()]);

    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("cannot discover the identity provider"),
        "{}",
        text(&run.stderr)
    );
}

#[test]
fn an_unknown_configuration_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let mut text_config = std::fs::read_to_string(&config).unwrap();
    text_config.insert_str(0, "allow_everyone = true\n");
    std::fs::write(&config, text_config).unwrap();

    let run = broker(&["ssh-ca", "--config", config.to_str().unwrap()]);

    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("unknown field"),
        "{}",
        text(&run.stderr)
    );
}
