//! The people-facing HTTPS API.
//!
//! | request | who | what |
//! | --- | --- | --- |
//! | `POST /v1/login` `{"workspace", "loopback_port"}` | anyone | starts a sign-in: `{"login_id", "authorize_url"}` |
//! | `GET /v1/callback?code&state` | the browser, from the provider | finishes it; sends the browser to `http://127.0.0.1:<loopback_port>/?handoff=...` |
//! | `POST /v1/login/complete` `{"login_id", "handoff"}` | the client that started it, on the browser's machine | 200 session (once), 403 refused |
//! | `POST /v1/login/device` `{"workspace"}` | anyone (a terminal without a browser) | starts a device-flow sign-in: `{"login_id", "user_code", "verification_uri", ...}` |
//! | `POST /v1/login/device/poll` `{"login_id"}` | the client that started it | 202 pending, 200 session (once), 403 refused |
//! | `POST /v1/ssh/certificate` `{"workspace", "public_key"}` | bearer session | a user certificate ending with the session |
//! | `GET /v1/workspaces/<name>/connect`, `Upgrade: moat-stream` | bearer session | 101, then the stream to the workspace's sshd |
//!
//! The bearer token is the only credential a client holds; it reaches only its own workspace and
//! ends when the session does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use moat_broker_client::protocol::{SIGN_IN_TIMEOUT, UPGRADE};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::audit::{RemoteEvent, SshActivity};
use crate::config::WorkspaceName;
use crate::entitlement::entitled;
use crate::oidc::{Identity, OidcError};
use crate::session::{LoginStatus, Session};
use crate::ssh_ca::Grant;
use crate::state::{Broker, Counted};

/// The largest request body read.
const MAX_BODY: usize = 16 * 1024;
/// A request body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    reply(status, json!({ "error": message }))
}

fn page(status: StatusCode, text: &str) -> Reply {
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>moat</title><p>{}</p>",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    let mut r = Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| error(StatusCode::REQUEST_TIMEOUT, "request body too slow"))?
    .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?
    .to_bytes();
    serde_json::from_slice(&body).map_err(|_| error(StatusCode::BAD_REQUEST, "invalid JSON body"))
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

/// Routes one request.
pub async fn handle(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Reply {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/login") => login(&broker, req).await,
        (Method::GET, "/v1/callback") => callback(&broker, req, peer).await,
        (Method::POST, "/v1/login/complete") => complete(&broker, req).await,
        (Method::POST, "/v1/login/device") => device(broker, req, peer).await,
        (Method::POST, "/v1/login/device/poll") => device_poll(&broker, req).await,
        (Method::POST, "/v1/ssh/certificate") => certificate(&broker, req).await,
        (Method::GET, p) => match p
            .strip_prefix("/v1/workspaces/")
            .and_then(|rest| rest.strip_suffix("/connect"))
        {
            Some(name) => {
                let name = name.to_owned();
                connect(broker, req, &name, peer, shutdown).await
            }
            None => error(StatusCode::NOT_FOUND, "no such endpoint"),
        },
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    workspace: WorkspaceName,
    loopback_port: u16,
}

async fn login(broker: &Broker, req: Request<Incoming>) -> Reply {
    let body: LoginRequest = match json_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Whether the workspace exists and whether this person may reach it is decided after
    // sign-in: an unauthenticated caller learns nothing about which workspaces exist.
    if body.loopback_port == 0 {
        return error(StatusCode::BAD_REQUEST, "loopback_port must be a port");
    }
    let (login_id, state, nonce, challenge) = match broker
        .sessions
        .begin_sign_in(body.workspace, body.loopback_port)
    {
        Ok(v) => v,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let url = broker
        .provider
        .authorize_url(&broker.redirect_uri(), &state, &nonce, &challenge);
    reply(
        StatusCode::OK,
        json!({ "login_id": login_id, "authorize_url": url }),
    )
}

/// Why `identity` may not reach `workspace`, if it may not.
fn entitlement(
    broker: &Broker,
    identity: &Identity,
    workspace: &WorkspaceName,
) -> Result<(), &'static str> {
    if broker.sessions.person_revoked(&identity.subject) {
        return Err("person revoked");
    }
    if broker.sessions.workspace_revoked(workspace) {
        return Err("workspace revoked");
    }
    let Some(ws) = broker.config.workspace(workspace) else {
        return Err("not entitled to this workspace");
    };
    if entitled(&identity.groups, &ws.groups) {
        Ok(())
    } else {
        Err("not entitled to this workspace")
    }
}

async fn callback(broker: &Broker, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    let query = req.uri().query().unwrap_or("");
    let mut code = None;
    let mut state = None;
    let mut idp_error = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "code" => code = Some(v.into_owned()),
            "state" => state = Some(v.into_owned()),
            "error" => idp_error = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(pending) = state.and_then(|s| broker.sessions.take_sign_in(&s).ok()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Unknown or expired sign-in. Run moat login again.",
        );
    };
    let workspace = pending.workspace.clone();
    let refuse = |identity: Option<&Identity>, reason: &str| {
        broker
            .audit
            .sign_in(identity, &workspace, peer, Err(reason));
        match broker.sessions.refuse_sign_in(&pending, reason) {
            Ok(handoff) => to_loopback(pending.loopback_port, &handoff),
            Err(e) => page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    };
    let code = match (code, idp_error) {
        (Some(code), None) => code,
        _ => return refuse(None, "the identity provider returned an error"),
    };
    let signed_in = match broker
        .provider
        .sign_in(
            &code,
            &pending.pkce.verifier,
            &broker.redirect_uri(),
            &pending.nonce,
        )
        .await
    {
        Ok(signed_in) => signed_in,
        Err(e) => {
            tracing::warn!("sign-in failed: {}", crate::error_chain(&e));
            let reason = match e {
                OidcError::Token(_) => "the ID token was refused",
                _ => "the identity provider did not complete the sign-in",
            };
            return refuse(None, reason);
        }
    };
    let identity = signed_in.identity.clone();
    if let Err(reason) = entitlement(broker, &identity, &workspace) {
        return refuse(Some(&identity), reason);
    }
    warn_without_refresh_token(broker, &signed_in);
    match broker.sessions.establish(&pending, signed_in) {
        Ok((session, handoff)) => {
            broker
                .audit
                .sign_in(Some(&identity), &workspace, peer, Ok(&session));
            to_loopback(pending.loopback_port, &handoff)
        }
        Err(e) => refuse(Some(&identity), &e.to_string()),
    }
}

/// A sign-in without a refresh token cannot be re-checked, so its session ends after one
/// entitlement interval: say so where an operator will look.
fn warn_without_refresh_token(broker: &Broker, signed_in: &crate::oidc::SignedIn) {
    if signed_in.refresh_token.is_none() {
        tracing::warn!(
            subject = %signed_in.identity.subject,
            "the identity provider issued no refresh token: the session ends after \
             entitlement_check_secs ({} s)",
            broker.config.entitlement_check_secs
        );
    }
}

/// Sends the browser on to the client's loopback listener with the one-time handoff.
fn to_loopback(port: u16, handoff: &str) -> Reply {
    let mut r = page(StatusCode::SEE_OTHER, "Returning to moat login...");
    let location = format!("http://127.0.0.1:{port}/?handoff={handoff}");
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    login_id: String,
    handoff: String,
}

async fn complete(broker: &Broker, req: Request<Incoming>) -> Reply {
    let body: CompleteRequest = match json_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    status_reply(broker.sessions.complete(&body.login_id, &body.handoff))
}

fn status_reply(status: Option<LoginStatus>) -> Reply {
    match status {
        None => error(StatusCode::NOT_FOUND, "unknown or finished sign-in"),
        Some(LoginStatus::Pending) => reply(StatusCode::ACCEPTED, json!({ "status": "pending" })),
        Some(LoginStatus::Done {
            token,
            session_id,
            expires_at,
        }) => reply(
            StatusCode::OK,
            json!({
                "status": "ok", "token": token, "session_id": session_id, "expires_at": expires_at
            }),
        ),
        Some(LoginStatus::Refused(reason)) => reply(
            StatusCode::FORBIDDEN,
            json!({ "status": "refused", "error": reason }),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRequest {
    workspace: WorkspaceName,
}

/// Starts a device-flow sign-in (RFC 8628): the provider shows the person a user code to
/// approve on any device; the broker polls the provider, the client polls the broker.
async fn device(broker: Arc<Broker>, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    let body: DeviceRequest = match json_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let login = match broker.sessions.begin_device() {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let authorization = match broker.provider.device_authorization().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("device authorization failed: {}", crate::error_chain(&e));
            return error(
                StatusCode::BAD_GATEWAY,
                "the identity provider did not start a device sign-in",
            );
        }
    };
    let answer = json!({
        "login_id": login,
        "user_code": authorization.user_code,
        "verification_uri": authorization.verification_uri,
        "verification_uri_complete": authorization.verification_uri_complete,
        "expires_in": authorization.expires_in,
    });
    tokio::spawn(device_wait(
        broker,
        login,
        body.workspace,
        authorization,
        peer,
    ));
    reply(StatusCode::OK, answer)
}

/// Polls the provider for one device sign-in until approved, refused or expired.
async fn device_wait(
    broker: Arc<Broker>,
    login: String,
    workspace: WorkspaceName,
    authorization: crate::oidc::DeviceAuthorization,
    peer: SocketAddr,
) {
    use crate::oidc::DevicePoll;
    let expires = tokio::time::Instant::now()
        + Duration::from_secs(authorization.expires_in).min(SIGN_IN_TIMEOUT);
    let mut interval = Duration::from_secs(authorization.interval.clamp(1, 60));
    let refuse = |identity: Option<&Identity>, reason: &str| {
        broker
            .audit
            .sign_in(identity, &workspace, peer, Err(reason));
        broker.sessions.refuse_device(&login, reason);
    };
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= expires {
            return refuse(None, "the device code expired");
        }
        match broker
            .provider
            .device_poll(&authorization.device_code)
            .await
        {
            Ok(DevicePoll::Pending) => {}
            Ok(DevicePoll::SlowDown) => interval += Duration::from_secs(5),
            Ok(DevicePoll::Done(signed_in)) => {
                let identity = signed_in.identity.clone();
                if let Err(reason) = entitlement(&broker, &identity, &workspace) {
                    return refuse(Some(&identity), reason);
                }
                warn_without_refresh_token(&broker, &signed_in);
                match broker
                    .sessions
                    .establish_device(&login, workspace.clone(), signed_in)
                {
                    Ok(session) => {
                        broker
                            .audit
                            .sign_in(Some(&identity), &workspace, peer, Ok(&session));
                    }
                    Err(e) => refuse(Some(&identity), &e.to_string()),
                }
                return;
            }
            Err(e) => {
                tracing::warn!("device sign-in failed: {}", crate::error_chain(&e));
                let reason = match e {
                    OidcError::Token(_) => "the ID token was refused",
                    _ => "the identity provider did not complete the sign-in",
                };
                return refuse(None, reason);
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicePollRequest {
    login_id: String,
}

async fn device_poll(broker: &Broker, req: Request<Incoming>) -> Reply {
    let body: DevicePollRequest = match json_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    status_reply(broker.sessions.poll_device(&body.login_id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    workspace: WorkspaceName,
    public_key: String,
}

async fn certificate(broker: &Broker, req: Request<Incoming>) -> Reply {
    let Some(token) = bearer(&req) else {
        return error(StatusCode::UNAUTHORIZED, "no session");
    };
    let body: CertificateRequest = match json_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let session = match broker.sessions.authorize(&token, &body.workspace) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let Some(ws) = broker.config.workspace(&session.workspace) else {
        return error(StatusCode::FORBIDDEN, "workspace no longer configured");
    };
    let grant = Grant {
        account: &ws.ssh_user,
        workspace: &session.workspace,
        key_id: format!(
            "moat session {} subject {}",
            session.id, session.identity.subject
        ),
        valid_before: session.expires,
    };
    match broker.ssh_ca.certify(&body.public_key, &grant) {
        Ok(cert) => reply(StatusCode::OK, json!({ "certificate": cert })),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn connect(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    name: &str,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Reply {
    let Ok(workspace) = WorkspaceName::try_from(name) else {
        return error(StatusCode::NOT_FOUND, "no such workspace");
    };
    let refuse = |session: Option<&Session>, status: StatusCode, why: &str| {
        broker.audit.remote(&RemoteEvent {
            activity: SshActivity::Refuse,
            session,
            workspace: &workspace,
            src: peer,
            detail: Some(why),
            bytes: None,
            started: None,
        });
        error(status, why)
    };
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(UPGRADE) {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "Upgrade: moat-stream required",
        );
    }
    let session = match bearer(&req).map(|t| broker.sessions.authorize(&t, &workspace)) {
        Some(Ok(s)) => s,
        Some(Err(e)) => return refuse(None, StatusCode::UNAUTHORIZED, &e.to_string()),
        None => return refuse(None, StatusCode::UNAUTHORIZED, "no session"),
    };
    let Some(port) = broker.config.workspace(&workspace).map(|w| w.ssh_port) else {
        return refuse(
            Some(&session),
            StatusCode::FORBIDDEN,
            "workspace no longer configured",
        );
    };
    let Ok(permit) = Arc::clone(&broker.relays).try_acquire_owned() else {
        return refuse(
            Some(&session),
            StatusCode::SERVICE_UNAVAILABLE,
            "too many sessions",
        );
    };
    let stream = match broker.tunnels.open(&workspace, port).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                Some(&session),
                StatusCode::BAD_GATEWAY,
                &crate::error_chain(&e),
            );
        }
    };
    tokio::spawn(async move {
        relay(broker, req, stream, session, peer, shutdown).await;
        drop(permit);
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::UPGRADE, header::HeaderValue::from_static(UPGRADE));
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    r
}

/// Splices the person's upgraded connection with the tunnel stream until either ends, the
/// session is revoked or expires, or the broker shuts down.
async fn relay(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    stream: hyper::upgrade::Upgraded,
    session: Arc<Session>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let Ok(person) = hyper::upgrade::on(req).await else {
        return;
    };
    let started = SystemTime::now();
    let event = |activity, detail, bytes| RemoteEvent {
        activity,
        session: Some(&session),
        workspace: &session.workspace,
        src: peer,
        detail,
        bytes,
        started: Some(started),
    };
    broker.audit.remote(&event(SshActivity::Open, None, None));
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut person = Counted::new(TokioIo::new(person), Arc::clone(&up));
    let mut workspace = Counted::new(TokioIo::new(stream), Arc::clone(&down));
    let deadline = tokio::time::Instant::from_std(session.deadline);
    let why = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut person, &mut workspace) => match r {
            Ok(_) => "finished",
            Err(_) => "connection lost",
        },
        () = session.cancel.cancelled() => "session revoked",
        () = tokio::time::sleep_until(deadline) => "session expired",
        () = shutdown.cancelled() => "broker shutting down",
    };
    let bytes = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    broker
        .audit
        .remote(&event(SshActivity::Close, Some(why), Some(bytes)));
}
