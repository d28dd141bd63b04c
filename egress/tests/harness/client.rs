//! Guest-side HTTP clients over intercepted connections, shared by the intercept tests and the
//! suite-wide secret scan.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::{TestProxy, read_all};

/// How long a raw exchange waits for the proxy to finish answering.
pub const WAIT: Duration = Duration::from_secs(5);

pub type Sender = SendRequest<Empty<bytes::Bytes>>;
pub type H2Sender = hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>;

/// An HTTP/2 client (ALPN h2) on an intercepted TLS connection to `host`.
pub async fn h2_client(tp: &TestProxy, host: &str) -> H2Sender {
    let tls = tp.intercepted_alpn(host, &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one HTTP/2 request to `https://{authority}{path}`; returns the status.
pub async fn h2_send(
    sender: &mut H2Sender,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let mut req = Request::get(format!("https://{authority}{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// An HTTP/1.1 client on an intercepted TLS connection to `host`.
pub async fn client(tp: &TestProxy, host: &str) -> Sender {
    let tls = tp.intercepted(host).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one request; returns the status and body.
pub async fn send(
    sender: &mut Sender,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = Request::get(path).header("host", host);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Writes raw bytes on a fresh intercepted connection and returns everything read back.
pub async fn raw(tp: &TestProxy, host: &str, bytes: &[u8]) -> String {
    let mut tls = tp.intercepted(host).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    String::from_utf8_lossy(&read_all(&mut tls, WAIT).await).into_owned()
}

pub async fn http_record(tp: &TestProxy, path: &str) -> serde_json::Value {
    tp.wait_record(|r| r["class_uid"] == 4002 && r["http_request"]["url"]["path"] == path)
        .await
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
