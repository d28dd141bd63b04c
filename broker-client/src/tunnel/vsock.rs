//! The host side's last hop: Firecracker's vsock convention on a Unix socket. The host connects
//! to the workspace's `<uds>`, writes `CONNECT <port>\n`, and reads `OK <n>\n`; after that the
//! stream is the guest port's. The namespace backend serves the same convention on a Unix socket.

use std::path::Path;
use std::time::Duration;

use moat_flow_header::vsock::{self, LineBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long the guest may take to accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors connecting to a guest port.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be reached.
    #[error("cannot connect to the workspace socket {path}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed on the wire.
    #[error("vsock handshake failed")]
    Io(#[source] std::io::Error),
    /// The guest did not answer `OK` (nothing listens on the port).
    #[error("the workspace refused port {0}")]
    Refused(u32),
    /// No answer in time.
    #[error("the workspace did not answer within {0:?}")]
    Timeout(Duration),
}

/// Connects to guest `port` through the vsock Unix socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| VsockError::Connect {
            path: uds.display().to_string(),
            source,
        })?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, port))
        .await
        .map_err(|_| VsockError::Timeout(HANDSHAKE_TIMEOUT))??;
    Ok(stream)
}

/// How often [`connect_when_ready`] tries again.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// Connects to guest `port` as [`connect`] does, trying again for up to `grace` while the
/// workspace refuses or is not there yet: a workspace still starting (a VM whose guest-init
/// brings its session service up seconds after the host's tunnel is connected) is not yet
/// listening, and the person at the other end would only be told to try again.
pub async fn connect_when_ready(
    uds: &Path,
    port: u32,
    grace: Duration,
) -> Result<UnixStream, VsockError> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match connect(uds, port).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() + RETRY_EVERY >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

async fn handshake(stream: &mut UnixStream, port: u32) -> Result<(), VsockError> {
    stream
        .write_all(vsock::connect_line(port).as_bytes())
        .await
        .map_err(VsockError::Io)?;
    // One byte at a time: the guest may start talking right after the newline (an SSH banner),
    // and those bytes belong to the stream, not to us. Anything but `OK <n>` is a refusal.
    let mut line = LineBuf::new();
    loop {
        let byte = stream.read_u8().await.map_err(VsockError::Io)?;
        match line.push(byte) {
            Ok(Some(line)) => {
                return vsock::parse_ok(line)
                    .map(drop)
                    .map_err(|_| VsockError::Refused(port));
            }
            Ok(None) => {}
            Err(_) => return Err(VsockError::Refused(port)),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// A guest that answers `reply` to the CONNECT line, then writes `after`.
    async fn guest(
        reply: &'static [u8],
        after: &'static [u8],
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 22\n");
            stream.get_mut().write_all(reply).await.unwrap();
            stream.get_mut().write_all(after).await.unwrap();
        });
        (dir, path)
    }

    #[tokio::test]
    async fn a_workspace_that_starts_listening_late_is_reached_and_one_that_never_does_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        // Nobody there yet: the socket appears after a second, closes the first two streams
        // unanswered (nothing listens on the guest port yet), then answers.
        let bound = path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let listener = tokio::net::UnixListener::bind(&bound).unwrap();
            for _ in 0..2 {
                drop(listener.accept().await.unwrap());
            }
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            stream.get_mut().write_all(b"OK 1\n").await.unwrap();
            // Held open until the test ends.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let started = std::time::Instant::now();
        assert!(
            connect_when_ready(&path, 22, Duration::from_secs(10))
                .await
                .is_ok()
        );
        assert!(started.elapsed() >= Duration::from_secs(1));
        let nobody = dir.path().join("nobody");
        let err = connect_when_ready(&nobody, 22, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_bytes_after_ok_belong_to_the_stream() {
        let (_dir, path) = guest(b"OK 1073741824\n", b"SSH-2.0-x\r\n").await;
        let mut stream = connect(&path, 22).await.unwrap();
        let mut banner = String::new();
        stream.read_to_string(&mut banner).await.unwrap();
        assert_eq!(banner, "SSH-2.0-x\r\n");
    }

    #[tokio::test]
    async fn anything_but_ok_is_a_refusal() {
        for reply in [&b"NO\n"[..], b"OK\n", b"OK x\n", b"OK 1\r\n", &[b'O'; 64]] {
            let (_dir, path) = guest(reply, b"").await;
            assert!(
                matches!(connect(&path, 22).await, Err(VsockError::Refused(22))),
                "{reply:?}"
            );
        }
    }
}
