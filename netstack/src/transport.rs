//! How a flow reaches the host: one stream per flow. In a VM that is AF_VSOCK to the host
//! (CID 2) on the egress port; in the namespace backend, the proxy's Unix socket directly.
//! Both hand back the stream as a non-blocking [`UnixStream`]: read, write and shutdown are
//! the same system calls on either socket family.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Opens one stream to the host per flow.
pub trait FlowTransport: Send {
    /// A new, connected, non-blocking stream.
    fn connect(&self) -> io::Result<UnixStream>;
}

/// The namespace backend: the egress proxy's Unix socket (`<uds>_<port>`).
#[derive(Debug, Clone)]
pub struct UnixTransport {
    /// The socket path.
    pub path: PathBuf,
}

impl FlowTransport for UnixTransport {
    fn connect(&self) -> io::Result<UnixStream> {
        let s = UnixStream::connect(&self.path)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// Inside a VM: AF_VSOCK to the host. Never used on a host machine (whose vsock may lead to
/// infrastructure that is not ours); only guest-init inside our own guest constructs it.
#[derive(Debug, Clone, Copy)]
pub struct VsockTransport {
    /// The host's vsock port for egress flows.
    pub port: u32,
}

impl FlowTransport for VsockTransport {
    fn connect(&self) -> io::Result<UnixStream> {
        let s = crate::sys::vsock_connect(crate::HOST_CID, self.port)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}
