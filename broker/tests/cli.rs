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
    let enrolment = moat_broker_client::enrolment::read_dir(&out).unwrap();
    assert_eq!(enrolment.tunnel.workspace.as_str(), "ws1");
    assert!(enrolment.ssh_user_ca.starts_with("ssh-ed25519 "));
    // Printed for people's known_hosts: the broker's host CA, trusted for ws1 alone.
    let host_ca = broker(&["ssh-ca", "--host", "--config", config.to_str().unwrap()]);
    let host_ca = text(&host_ca.stdout);
    assert!(host_ca.starts_with("ssh-ed25519 "), "{host_ca}");
    assert!(
        text(&run.stdout).contains(&format!("@cert-authority ws1 {host_ca}")),
        "{}",
        text(&run.stdout)
    );
    assert!(enrolment.ssh_host_certificate.is_some());
}

/// `ssh-keygen -L` on a certificate file: OpenSSH's own reading of it.
fn ssh_keygen_l(cert: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

fn fingerprint(key_line: &str, dir: &Path) -> String {
    let file = dir.join("fingerprint.pub");
    std::fs::write(&file, key_line).unwrap();
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[test]
fn enrolling_again_rotates_the_host_key_under_a_host_certificate_for_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let out = dir.path().join("ws1");
    let enrol = || {
        let run = broker(&[
            "enrol",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "ws1",
        ]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        moat_broker_client::enrolment::read_dir(&out).unwrap()
    };
    let first = enrol();

    let again = enrol();

    assert_ne!(again.ssh_host_key_pub, first.ssh_host_key_pub);
    assert_ne!(again.cert_pem, first.cert_pem);
    // OpenSSH reads a host certificate of the new key, for ws1 alone, from the host CA.
    let listed = ssh_keygen_l(&out.join("ssh_host_ed25519_key-cert.pub"));
    let host_ca = broker(&["ssh-ca", "--host", "--config", config.to_str().unwrap()]);
    let ca_fingerprint = fingerprint(&text(&host_ca.stdout), dir.path());
    let key_fingerprint = fingerprint(&again.ssh_host_key_pub, dir.path());
    assert!(listed.contains("host certificate"), "{listed}");
    assert!(
        listed.contains(&format!("Public key: ED25519-CERT {key_fingerprint}")),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("Signing CA: ED25519 {ca_fingerprint}")),
        "{listed}"
    );
    let principals: Vec<&str> = listed
        .split("Principals:")
        .nth(1)
        .and_then(|rest| rest.split("Critical Options:").next())
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(principals, ["ws1"], "{listed}");
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
    // The host CA is another key.
    let host = broker(&["ssh-ca", "--host", "--config", config.to_str().unwrap()]);
    assert!(host.status.success(), "{}", text(&host.stderr));
    assert_ne!(host.stdout, first.stdout);
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
