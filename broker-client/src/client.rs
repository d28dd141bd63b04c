//! The person's side, used by `moat login` and `moat ssh`, and the admin's (`moat-broker revoke`).
//!
//! After sign-in the client keeps one thing: the session file (bearer token, its workspace and
//! end, the broker's URL and CA), mode 0600 under `$XDG_RUNTIME_DIR/moat` (or `~/.cache/moat`).
//! It is useless after the session ends or is revoked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::https::{self, HttpsError, Target};
use crate::protocol::{SIGN_IN_TIMEOUT, UPGRADE};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached (everything fails closed).
    #[error("cannot reach the broker")]
    Https(#[source] HttpsError),
    /// The broker refused.
    #[error("the broker refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The broker's answer is not what was expected.
    #[error("unexpected answer from the broker")]
    Protocol,
    /// The sign-in was not finished in time.
    #[error("sign-in not finished within {0:?}")]
    Timeout(Duration),
    /// A local file could not be used.
    #[error("cannot use {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker CA is not valid PEM.
    #[error("invalid broker CA")]
    Ca(#[source] rustls::Error),
    /// No session for this workspace, or it has ended.
    #[error("not signed in to {0} (run `moat login`)")]
    NoSession(String),
}

/// What a signed-in client keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// The broker's base URL.
    pub broker: String,
    /// The broker's CA (PEM), if not a Web PKI one.
    pub broker_ca: Option<String>,
    /// The workspace.
    pub workspace: String,
    /// The bearer token. Secret.
    pub token: String,
    /// The session's id (for revocation by an admin).
    pub session_id: String,
    /// Unix seconds.
    pub expires_at: u64,
}

impl SessionFile {
    /// The default place for `workspace`'s session.
    pub fn default_path(workspace: &str) -> PathBuf {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("moat")
            .join("sessions")
            .join(format!("{workspace}.json"))
    }

    /// Writes it with mode 0600 (its directory 0700), replacing an older one.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let file_err = |source| ClientError::File {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(file_err)?;
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(file_err)?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|_| ClientError::Protocol)?;
        f.write_all(&bytes).map_err(file_err)?;
        std::fs::rename(&tmp, path).map_err(file_err)
    }

    /// Reads the session at `path`, if it has not ended.
    pub fn load(path: &Path, workspace: &str) -> Result<Self, ClientError> {
        let bytes =
            std::fs::read(path).map_err(|_| ClientError::NoSession(workspace.to_owned()))?;
        let s: SessionFile = serde_json::from_slice(&bytes)
            .map_err(|_| ClientError::NoSession(workspace.to_owned()))?;
        if s.workspace != workspace || s.expires_at <= crate::unix_now() {
            return Err(ClientError::NoSession(workspace.to_owned()));
        }
        Ok(s)
    }
}

/// A client of one broker.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    base: String,
    ca_pem: Option<String>,
    http: https::Client,
}

/// A sign-in in progress: where the browser must go, and the loopback listener where it ends.
#[derive(Debug)]
pub struct SignIn {
    /// The login handle (a secret of this client).
    login_id: String,
    /// Where the person's browser must go.
    pub authorize_url: String,
    loopback: tokio::net::TcpListener,
}

/// A device-flow sign-in in progress (RFC 8628): the person approves `user_code` at
/// `verification_uri`, on any device.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceSignIn {
    login_id: String,
    /// What the person types.
    pub user_code: String,
    /// Where.
    pub verification_uri: String,
    /// The same with the code filled in, if the provider offers it.
    pub verification_uri_complete: Option<String>,
}

/// How often a device-flow client asks the broker whether the person has approved.
const DEVICE_POLL_INTERVAL: Duration = Duration::from_secs(1);

fn refused(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
    ClientError::Refused {
        status: status.as_u16(),
        message,
    }
}

impl BrokerClient {
    /// A client of the broker at `base` (https), trusting `ca_pem` if given, else the Web PKI.
    pub fn new(base: &str, ca_pem: Option<String>) -> Result<Self, ClientError> {
        let roots = match &ca_pem {
            Some(pem) => https::roots_from_pem(pem.as_bytes(), false),
            None => https::roots_from_pem(b"", true),
        }
        .map_err(ClientError::Ca)?;
        Ok(BrokerClient {
            base: base.trim_end_matches('/').to_owned(),
            ca_pem,
            http: https::Client::new(roots).map_err(ClientError::Ca)?,
        })
    }

    /// A client for the broker named in `session`.
    pub fn for_session(session: &SessionFile) -> Result<Self, ClientError> {
        Self::new(&session.broker, session.broker_ca.clone())
    }

    async fn post_json(
        &self,
        path: &str,
        body: serde_json::Value,
        bearer: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let target = Target::parse(&format!("{}{path}", self.base)).map_err(ClientError::Https)?;
        let mut request = Request::post(target.path())
            .header(header::HOST, target.authority())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| ClientError::Protocol)?;
        let response = self
            .http
            .send(&target, request)
            .await
            .map_err(ClientError::Https)?;
        Ok((response.status(), response.into_body()))
    }

    /// Starts a sign-in to `workspace`, listening on a loopback port for the browser's return.
    pub async fn begin_login(&self, workspace: &str) -> Result<SignIn, ClientError> {
        let loopback = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| ClientError::File {
                path: PathBuf::from("127.0.0.1:0"),
                source,
            })?;
        let port = loopback
            .local_addr()
            .map_err(|_| ClientError::Protocol)?
            .port();
        let (status, body) = self
            .post_json(
                "/v1/login",
                json!({ "workspace": workspace, "loopback_port": port }),
                None,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &body));
        }
        #[derive(Deserialize)]
        struct Started {
            login_id: String,
            authorize_url: String,
        }
        let s: Started = serde_json::from_slice(&body).map_err(|_| ClientError::Protocol)?;
        Ok(SignIn {
            login_id: s.login_id,
            authorize_url: s.authorize_url,
            loopback,
        })
    }

    /// Waits for the browser to come back to the loopback listener, then collects the session.
    pub async fn finish_login(
        &self,
        workspace: &str,
        sign_in: SignIn,
    ) -> Result<SessionFile, ClientError> {
        #[derive(Deserialize)]
        struct Done {
            token: String,
            session_id: String,
            expires_at: u64,
        }
        let handoff = tokio::time::timeout(SIGN_IN_TIMEOUT, wait_for_handoff(sign_in.loopback))
            .await
            .map_err(|_| ClientError::Timeout(SIGN_IN_TIMEOUT))??;
        let (status, body) = self
            .post_json(
                "/v1/login/complete",
                json!({ "login_id": sign_in.login_id, "handoff": handoff }),
                None,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &body));
        }
        let d: Done = serde_json::from_slice(&body).map_err(|_| ClientError::Protocol)?;
        Ok(SessionFile {
            broker: self.base.clone(),
            broker_ca: self.ca_pem.clone(),
            workspace: workspace.to_owned(),
            token: d.token,
            session_id: d.session_id,
            expires_at: d.expires_at,
        })
    }

    /// Starts a device-flow sign-in to `workspace`, for a terminal without a browser.
    pub async fn begin_device_login(&self, workspace: &str) -> Result<DeviceSignIn, ClientError> {
        let (status, body) = self
            .post_json("/v1/login/device", json!({ "workspace": workspace }), None)
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &body));
        }
        serde_json::from_slice(&body).map_err(|_| ClientError::Protocol)
    }

    /// Waits until the person has approved `sign_in` (or it was refused or expired).
    pub async fn finish_device_login(
        &self,
        workspace: &str,
        sign_in: &DeviceSignIn,
    ) -> Result<SessionFile, ClientError> {
        #[derive(Deserialize)]
        struct Done {
            token: String,
            session_id: String,
            expires_at: u64,
        }
        let give_up = tokio::time::Instant::now() + SIGN_IN_TIMEOUT;
        loop {
            let (status, body) = self
                .post_json(
                    "/v1/login/device/poll",
                    json!({ "login_id": sign_in.login_id }),
                    None,
                )
                .await?;
            match status {
                StatusCode::ACCEPTED => {}
                StatusCode::OK => {
                    let d: Done =
                        serde_json::from_slice(&body).map_err(|_| ClientError::Protocol)?;
                    return Ok(SessionFile {
                        broker: self.base.clone(),
                        broker_ca: self.ca_pem.clone(),
                        workspace: workspace.to_owned(),
                        token: d.token,
                        session_id: d.session_id,
                        expires_at: d.expires_at,
                    });
                }
                _ => return Err(refused(status, &body)),
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(ClientError::Timeout(SIGN_IN_TIMEOUT));
            }
            tokio::time::sleep(DEVICE_POLL_INTERVAL).await;
        }
    }

    /// Has the broker certify `public_key` (one OpenSSH line) for `session`.
    pub async fn certificate(
        &self,
        session: &SessionFile,
        public_key: &str,
    ) -> Result<String, ClientError> {
        let (status, body) = self
            .post_json(
                "/v1/ssh/certificate",
                json!({ "workspace": session.workspace, "public_key": public_key }),
                Some(&session.token),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &body));
        }
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("certificate")
                    .and_then(|c| c.as_str())
                    .map(str::to_owned)
            })
            .ok_or(ClientError::Protocol)
    }

    /// Opens a stream to the workspace's sshd.
    pub async fn connect(&self, session: &SessionFile) -> Result<Upgraded, ClientError> {
        let url = format!("{}/v1/workspaces/{}/connect", self.base, session.workspace);
        let target = Target::parse(&url).map_err(ClientError::Https)?;
        let request = Request::get(target.path())
            .header(header::HOST, target.authority())
            .header(header::AUTHORIZATION, format!("Bearer {}", session.token))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, UPGRADE)
            .body(Full::new(Bytes::new()))
            .map_err(|_| ClientError::Protocol)?;
        let response = tokio::time::timeout(https::TIMEOUT, self.http.open(&target, request))
            .await
            .map_err(|_| ClientError::Https(HttpsError::Timeout(https::TIMEOUT)))?
            .map_err(ClientError::Https)?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(refused(status, &body));
        }
        hyper::upgrade::on(response)
            .await
            .map_err(|e| ClientError::Https(HttpsError::Http(e)))
    }
}

/// Serves the loopback listener until a browser brings `GET /?handoff=...`; returns it.
async fn wait_for_handoff(listener: tokio::net::TcpListener) -> Result<String, ClientError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    let accept = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let handoff = req.uri().query().and_then(|q| {
                                form_urlencoded::parse(q.as_bytes())
                                    .find(|(k, _)| k == "handoff")
                                    .map(|(_, v)| v.into_owned())
                            });
                            let (status, text) = match handoff {
                                Some(h) => {
                                    let _ = tx.send(h).await;
                                    (StatusCode::OK, "Sign-in finished: return to your terminal.")
                                }
                                None => (StatusCode::NOT_FOUND, "Not a moat sign-in."),
                            };
                            let mut r = http::Response::new(Full::new(Bytes::from(format!(
                                "<!doctype html><meta charset=utf-8><title>moat</title><p>{text}</p>"
                            ))));
                            *r.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    };
    tokio::select! {
        h = rx.recv() => h.ok_or(ClientError::Protocol),
        () = accept => Err(ClientError::Protocol),
    }
}

/// Splices standard input and output with `stream` (OpenSSH's ProxyCommand contract).
pub async fn stdio_relay(stream: Upgraded) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(stream));
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let up = async {
        tokio::io::copy(&mut stdin, &mut wr).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await
    };
    let down = async {
        tokio::io::copy(&mut rd, &mut stdout).await?;
        tokio::io::AsyncWriteExt::flush(&mut stdout).await
    };
    // The workspace closing its side ends the session; stdin closing only half-closes.
    tokio::select! {
        r = down => r,
        r = async { up.await?; std::future::pending::<std::io::Result<()>>().await } => r,
    }
}

/// Sends one admin request to the broker's admin socket; returns the JSON answer.
pub async fn admin_request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::File {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Https(HttpsError::Http(e)))?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "admin")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .map_err(|_| ClientError::Protocol)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Https(HttpsError::Http(e)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Https(HttpsError::Http(e)))?
        .to_bytes();
    if !status.is_success() {
        return Err(refused(status, &body));
    }
    serde_json::from_slice(&body).map_err(|_| ClientError::Protocol)
}
