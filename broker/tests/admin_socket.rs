//! The admin socket's access control: mode 0600 from the moment it exists whatever the umask,
//! and a peer of another uid refused even when it can reach the socket file. A test binary of
//! its own: the umask is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

#[tokio::test]
async fn admin_socket_is_0600_with_umask_0_and_refuses_another_uid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let listener = moat_private_socket::bind(&path);
    nix::sys::stat::umask(old);
    let listener = listener.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["admin.sock"], "nothing of the bind left beside it");

    // Its own uid is allowed.
    let own = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    assert_eq!(moat_broker::admin::peer_allowed(&accepted), Ok(()));
    drop((own, accepted));

    // Another uid, given the file by a mistake (and the way to it), is refused. Only root can
    // become another uid here.
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut other = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "/usr/bin/python3",
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect(sys.argv[1])\n\
             s.recv(1)\n",
        ])
        .arg(&path)
        .spawn()
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    let refused = moat_broker::admin::peer_allowed(&accepted).unwrap_err();
    assert!(refused.contains("peer uid 65534"), "{refused}");
    drop(accepted);
    // It sees the connection closed, and ends.
    tokio::task::spawn_blocking(move || other.wait().unwrap())
        .await
        .unwrap();
}
