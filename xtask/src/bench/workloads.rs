//! The client's workloads, the same over every path ([`Env::connect`]): one bulk download,
//! small requests on one kept-alive connection, a new TLS connection per request; each
//! measured in wall time and in the proxy's CPU time.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::env::{Env, Io, Path3};

/// Reads a response head, up to and with its empty line, a byte at a time (so nothing of
/// the body is read).
pub(super) async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("connection closed in response head");
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            bail!("response head too large");
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends GET `path` and reads the whole response body; returns its length.
async fn get(s: &mut Box<dyn Io>, host: &str, path: &str, close: bool) -> Result<u64> {
    let conn = if close { "close" } else { "keep-alive" };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n").as_bytes(),
    )
    .await?;
    s.flush().await?;
    let head = read_head(s).await?;
    // A proxy's error page is not a measurement.
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("empty response"));
    }
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("response without Content-Length")?;
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            bail!("connection closed with {left} body bytes left");
        }
        left -= n as u64;
    }
    Ok(len)
}

/// One measurement: units of work done, wall seconds, proxy CPU seconds.
pub(super) struct Sample {
    pub(super) units: f64,
    pub(super) secs: f64,
    pub(super) cpu: f64,
}

/// One download of `/bulk` on a new connection.
pub(super) async fn bulk(env: &Env, path: Path3) -> Result<Sample> {
    bulk_of(env, path, "/bulk").await
}

/// One download of `target` on a new connection.
pub(super) async fn bulk_of(env: &Env, path: Path3, target: &str) -> Result<Sample> {
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    let mut s = env.connect(path).await?;
    let n = get(&mut s, &env.host_header(path), target, true).await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Sample {
        units: n as f64 / 1e6,
        secs,
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

/// `requests` GETs of `/small` on one connection (after one to warm it up).
pub(super) async fn keepalive(env: &Env, path: Path3, requests: usize) -> Result<Sample> {
    let mut s = env.connect(path).await?;
    let host = env.host_header(path);
    get(&mut s, &host, "/small", false).await?;
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    for i in 0..requests {
        get(&mut s, &host, "/small", false)
            .await
            .with_context(|| format!("request {i}"))?;
    }
    Ok(Sample {
        units: requests as f64,
        secs: t.elapsed().as_secs_f64(),
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

/// `conns` new connections, one GET of `/small` each, one at a time.
pub(super) async fn new_conns(env: &Env, path: Path3, conns: usize) -> Result<Sample> {
    let cpu0 = env.proxy_cpu(path);
    let t = Instant::now();
    for _ in 0..conns {
        let mut s = env.connect(path).await?;
        get(&mut s, &env.host_header(path), "/small", true).await?;
    }
    Ok(Sample {
        units: conns as f64,
        secs: t.elapsed().as_secs_f64(),
        cpu: env.proxy_cpu(path) - cpu0,
    })
}

/// The median (the upper one of an even count); 0 for none.
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
