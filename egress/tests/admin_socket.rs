//! The admin socket's access control, with a real proxy: its mode is 0600 from the moment it
//! exists whatever the umask, and a peer of another uid is not answered even when it can reach
//! the socket file. A test binary of its own: the umask is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::os::unix::fs::PermissionsExt;

use harness::*;

#[tokio::test]
async fn admin_socket_is_0600_with_umask_0_and_answers_only_its_own_uid_or_root() {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let tp = TestProxy::start().await;
    nix::sys::stat::umask(old);
    let mode = std::fs::metadata(&tp.admin).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    // Nothing of the private directory it was bound in is left beside it.
    let names: Vec<String> = std::fs::read_dir(tp.admin.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".binding")), "{names:?}");
    assert!(tp.admin_get("/healthz").await.contains("ok policy"));

    // Another uid, given the file by a mistake (and the way to it), is still not answered.
    // Only root can become another uid here.
    if nix::unistd::Uid::effective().is_root() {
        std::fs::set_permissions(&tp.admin, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(
            tp.admin.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let admin = tp.admin.clone();
        // Connects (which the file's mode allows), asks, and prints what came back.
        let client = "import socket, sys\n\
                      s = socket.socket(socket.AF_UNIX)\n\
                      s.connect(sys.argv[1])\n\
                      print('connected')\n\
                      try:\n    \
                          s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: admin\\r\\n\\r\\n')\n    \
                          print('answer', s.recv(4096))\n\
                      except OSError as e:\n    \
                          print('closed', e)\n";
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .args(["/usr/bin/python3", "-c", client])
                .arg(&admin)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Connected (so the file did not stop it), then closed unanswered: the peer check.
        assert!(
            stdout.starts_with("connected\n")
                && (stdout.contains("answer b''") || stdout.contains("closed")),
            "uid 65534: {stdout} {stderr}"
        );
    }

    // An audited flow, for the harness's leak scan at the end.
    let _ = tp.named("denied.test", 443).await;
    tp.refused("no_rule").await;
}
