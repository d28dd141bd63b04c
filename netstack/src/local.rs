//! Local routes: names the workspace answers itself. A flow to such a name (on its port) is
//! not sent to the host: the netstack connects it to a workspace service on loopback instead
//! (a local model server as `inference.local`), with no flow header.
//!
//! Which names are local is the signed policy's choice (`[[local_routes]]`), read by `moat
//! run` and handed to guest-init at start; the agent cannot change this table, which lives in
//! PID 1. Each routed flow is relayed by two threads between its stream and the TCP
//! connection to the service (local inference is a few long requests, not thousands of flows);
//! the stack treats the stream like a host's.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;

/// One local route: flows to `host` on `port` go to `target` (a loopback address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRoute {
    /// The name, normalised (lower case, no trailing dot).
    pub host: String,
    /// The port the agent connects to.
    pub port: u16,
    /// Where the service listens, inside the workspace.
    pub target: SocketAddr,
}

/// The workspace's local routes.
#[derive(Debug, Clone, Default)]
pub struct LocalRoutes {
    routes: Vec<LocalRoute>,
}

impl LocalRoutes {
    /// Routes `routes`; only loopback targets are kept (a route leaves nothing by itself).
    pub fn new(routes: Vec<LocalRoute>) -> Self {
        let routes = routes
            .into_iter()
            .filter(|r| r.target.ip().is_loopback())
            .collect();
        LocalRoutes { routes }
    }

    /// Where a flow to `host:port` goes, if it is local.
    pub fn target(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|r| r.port == port && r.host.eq_ignore_ascii_case(host))
            .map(|r| r.target)
    }

    /// Opens a local flow to `target`: the stack's end of a stream pair (non-blocking), the
    /// other end relayed to a TCP connection to `target` by two threads. A target that refuses
    /// the connection closes the stream, which closes the flow.
    pub fn open(target: SocketAddr) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        std::thread::Builder::new()
            .name("local-route".into())
            .spawn(move || relay(theirs, target))?;
        Ok(ours)
    }
}

fn relay(stream: UnixStream, target: SocketAddr) {
    let Ok(tcp) = TcpStream::connect(target) else {
        return;
    };
    let (Ok(mut stream_r), Ok(mut tcp_w)) = (stream.try_clone(), tcp.try_clone()) else {
        return;
    };
    let up = std::thread::Builder::new()
        .name("local-route".into())
        .spawn(move || {
            let _ = io::copy(&mut stream_r, &mut tcp_w);
            let _ = tcp_w.shutdown(Shutdown::Write);
        });
    let (mut tcp_r, mut stream_w) = (tcp, stream);
    let _ = io::copy(&mut tcp_r, &mut stream_w);
    let _ = stream_w.shutdown(Shutdown::Write);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn route(host: &str, port: u16, target: SocketAddr) -> LocalRoute {
        LocalRoute {
            host: host.into(),
            port,
            target,
        }
    }

    #[test]
    fn only_the_named_host_and_port_are_local() {
        let to = SocketAddr::from(([127, 0, 0, 1], 8000));
        let routes = LocalRoutes::new(vec![route("inference.local", 80, to)]);
        assert_eq!(routes.target("Inference.Local", 80), Some(to));
        assert_eq!(routes.target("inference.local", 443), None);
        assert_eq!(routes.target("api.openai.com", 80), None);
    }

    #[test]
    fn a_route_to_anything_but_loopback_is_dropped() {
        let away = SocketAddr::from(([192, 0, 2, 1], 80));
        let routes = LocalRoutes::new(vec![route("inference.local", 80, away)]);
        assert_eq!(routes.target("inference.local", 80), None);
    }

    #[test]
    fn a_local_flow_carries_bytes_both_ways_and_its_end() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(&[got, b" back".to_vec()].concat()).unwrap();
        });
        let mut stream = LocalRoutes::open(target).unwrap();
        stream.set_nonblocking(false).unwrap();
        stream.write_all(b"there").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "there back");
        server.join().unwrap();
    }
}
