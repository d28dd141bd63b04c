//! `moat connect`: open one flow through the egress proxy, as the guest's netstack would.
//!
//! With no `--listen`, stdin/stdout are the flow (like `nc`). With `--listen ADDR`, every TCP
//! connection accepted there becomes one flow, so curl and openssl can be pointed at it:
//! `curl --connect-to example.com:443:127.0.0.1:7443 https://example.com/`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use moat_egress::{EGRESS_VSOCK_PORT, port_path};
use moat_flow_header::{FlowHeader, Hostname, Transport};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Base path of the vsock Unix socket (the proxy's --uds).
    #[arg(long)]
    uds: PathBuf,
    /// The vsock port.
    #[arg(long, default_value_t = EGRESS_VSOCK_PORT)]
    port: u32,
    /// Accept TCP connections here and turn each into a flow, instead of using stdin/stdout.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Destination: host:port, ip:port or [v6]:port.
    destination: String,
}

static NEXT_FLOW: AtomicU64 = AtomicU64::new(1);

fn header(host: Option<&str>, addr: IpAddr, port: u16) -> Result<Vec<u8>> {
    let hostname = host.map(Hostname::new).transpose()?;
    Ok(FlowHeader {
        flow_id: NEXT_FLOW.fetch_add(1, Ordering::Relaxed),
        transport: Transport::Tcp,
        destination: SocketAddr::new(addr, port),
        hostname,
        program: None,
    }
    .encode())
}

async fn open(
    args: &ConnectArgs,
    host: Option<&str>,
    addr: IpAddr,
    port: u16,
) -> Result<UnixStream> {
    let path = port_path(&args.uds, args.port);
    let mut stream = UnixStream::connect(&path)
        .await
        .with_context(|| format!("cannot connect to the proxy at {}", path.display()))?;
    stream.write_all(&header(host, addr, port)?).await?;
    Ok(stream)
}

pub(crate) fn run(args: ConnectArgs) -> Result<ExitCode> {
    let (host, addr, port) = crate::policy_cmd::parse_destination(&args.destination)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match args.listen {
            None => {
                let mut flow = open(&args, host.as_deref(), addr, port).await?;
                let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
                tokio::io::copy_bidirectional(&mut stdio, &mut flow).await?;
            }
            Some(listen) => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!(
                    "moat connect: {listen} -> {} through the proxy",
                    args.destination
                );
                loop {
                    let (mut tcp, _) = listener.accept().await?;
                    let mut flow = open(&args, host.as_deref(), addr, port).await?;
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut flow).await;
                    });
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
