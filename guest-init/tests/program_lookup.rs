//! The program lookup against real sockets: each test makes its own network namespace (on one
//! thread: the lookup reads the calling thread's socket tables, as guest-init's netstack
//! thread does), connects real programs over its loopback, and asks who holds each socket.
//! Needs root (a network namespace); as anyone else the tests pass without checking anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use moat_guest_init::program::ProcPrograms;

/// Runs `test` on a thread of its own in a fresh network namespace with loopback up.
fn in_new_netns(test: impl FnOnce() + Send + 'static) {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: no network namespace of our own, nothing checked");
        return;
    }
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // A child forked by this thread starts in this thread's network namespace.
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        test();
    })
    .join()
    .unwrap();
}

/// A Python process connected to `port` on loopback, and its socket's local address. With
/// `hand_to`, it then starts that program with the socket inherited (and ends it when its
/// stdin closes).
fn python_connected_to(port: u16, hand_to: Option<&str>) -> (Child, SocketAddrV4) {
    let (start, stop) = hand_to.map_or((String::new(), String::new()), |prog| {
        (
            format!(
                "import subprocess; p = subprocess.Popen(['{prog}', '300'], pass_fds=[s.fileno()])"
            ),
            "p.kill(); p.wait()".to_owned(),
        )
    });
    let script = format!(
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         {start}\n\
         print(s.getsockname()[1], flush=True)\n\
         sys.stdin.read()\n\
         {stop}\n"
    );
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = SocketAddrV4::new([127, 0, 0, 1].into(), line.trim().parse().unwrap());
    (child, local)
}

fn sha256_of(path: &str) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn listener() -> (TcpListener, SocketAddrV4) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(addr) = l.local_addr().unwrap() else {
        unreachable!()
    };
    (l, addr)
}

/// Ends a child started by [`python_connected_to`]: its stdin closed, it ends what it
/// started and exits.
fn end(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn a_socket_is_named_by_its_owners_executable_and_digest() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let (child, local) = python_connected_to(server.port(), None);
        let mut lookup = ProcPrograms::default();
        let program = lookup
            .lookup(local, server)
            .expect("python's socket has an owner");
        // The kernel's name for it: the symlink /usr/bin/python3 resolved.
        assert_eq!(program.path().as_str(), "/usr/bin/python3.11");
        assert_eq!(program.pid(), child.id());
        assert_eq!(
            program.sha256_hex().as_deref(),
            Some(sha256_of("/usr/bin/python3.11").as_str())
        );
        end(child);
    });
}

/// Where the kernel has no sock_diag for TCP (the VM's), the socket tables give the same.
#[test]
fn the_socket_tables_serve_where_sock_diag_is_absent() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let (child, local) = python_connected_to(server.port(), None);
        let mut lookup = ProcPrograms::tables_only(std::path::Path::new("/proc"));
        let program = lookup.lookup(local, server).unwrap();
        assert_eq!(program.path().as_str(), "/usr/bin/python3.11");
        assert_eq!(program.pid(), child.id());
        let nobody = SocketAddrV4::new([127, 0, 0, 1].into(), 1);
        assert_eq!(lookup.lookup(nobody, server), None);
        end(child);
    });
}

#[test]
fn this_process_own_socket_names_this_test_binary() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let stream = TcpStream::connect(server).unwrap();
        let std::net::SocketAddr::V4(local) = stream.local_addr().unwrap() else {
            unreachable!()
        };
        let program = ProcPrograms::default().lookup(local, server).unwrap();
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(program.path().as_str(), me.to_str().unwrap());
    });
}

#[test]
fn a_flood_from_one_program_hashes_it_once() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let mut lookup = ProcPrograms::default();
        let mut children = Vec::new();
        for _ in 0..3 {
            let (child, local) = python_connected_to(server.port(), None);
            assert!(lookup.lookup(local, server).unwrap().sha256().is_some());
            children.push(child);
        }
        assert_eq!(lookup.hashed(), 1);
        children.into_iter().for_each(end);
    });
}

/// A socket handed on (inherited by a program Python starts) is named by its newest holder:
/// the claim says which executable holds the socket, not whose code connected it.
#[test]
fn a_socket_handed_to_another_program_is_named_by_its_newest_holder() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let (child, local) = python_connected_to(server.port(), Some("/usr/bin/sleep"));
        let program = ProcPrograms::default().lookup(local, server).unwrap();
        assert_eq!(program.path().as_str(), "/usr/bin/sleep");
        end(child);
    });
}

#[test]
fn a_socket_nobody_holds_and_an_unknown_connection_have_no_owner() {
    in_new_netns(|| {
        let (_l, server) = listener();
        let mut lookup = ProcPrograms::default();
        let nobody = SocketAddrV4::new([127, 0, 0, 1].into(), 1);
        assert_eq!(lookup.lookup(nobody, server), None);
        let stream = TcpStream::connect(server).unwrap();
        let std::net::SocketAddr::V4(local) = stream.local_addr().unwrap() else {
            unreachable!()
        };
        drop(stream);
        // Closed by us: TIME_WAIT (inode 0) or gone; either way nobody holds it.
        assert_eq!(lookup.lookup(local, server), None);
    });
}
