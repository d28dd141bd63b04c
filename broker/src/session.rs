//! Sign-ins in flight, live sessions, and what is revoked.
//!
//! A session is bound to one person (the ID token's `sub`) and one workspace, lives at most the
//! configured TTL and is never renewed: to keep working, a person signs in again, so losing an
//! entitlement at the identity provider ends their access within one TTL. The client holds an
//! opaque bearer token; the broker keeps only its SHA-256. Every relayed stream watches its
//! session's [`CancellationToken`], so revoking the session, its person or its workspace ends the
//! stream at once. Revoked people and workspaces are written to the state directory and survive a
//! restart; sessions do not (a restarted broker has none: everyone signs in again).
//!
//! A sign-in is bound to the machine whose browser finished it, not only to whoever started it:
//! the broker's callback sends the browser on to the client's loopback listener
//! (`http://127.0.0.1:<port>/?handoff=...`, RFC 8252's native-app pattern) and the session is
//! handed out only for the login handle *and* that one-time handoff. A sign-in URL sent to a
//! victim by someone else therefore yields them nothing: the handoff lands on the victim's own
//! loopback.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::WorkspaceName;
use crate::oidc::{Identity, Pkce, random_token};

/// A sign-in not finished within this time is forgotten.
pub const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(300);
/// At most this many sign-ins in flight (the endpoint that starts them is unauthenticated).
pub const MAX_PENDING: usize = 4096;

/// Errors of the session store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Unknown, expired or revoked token.
    #[error("no such session (expired, revoked or never issued)")]
    Unknown,
    /// The session is for another workspace.
    #[error("the session is not for this workspace")]
    WrongWorkspace,
    /// Too many sign-ins in flight.
    #[error("too many sign-ins in flight")]
    Busy,
    /// The system's random generator failed.
    #[error("no randomness")]
    Random,
    /// The sign-in's `state` is unknown or was used.
    #[error("unknown or finished sign-in")]
    UnknownSignIn,
}

/// One live session.
#[derive(Debug)]
pub struct Session {
    /// Public identifier (admin API, audit, certificate key id); not a credential.
    pub id: String,
    /// Who.
    pub identity: Identity,
    /// Where to.
    pub workspace: WorkspaceName,
    /// Wall-clock start and end, for records and the SSH certificate.
    pub created: SystemTime,
    /// When it ends.
    pub expires: SystemTime,
    /// The same end on the monotonic clock, which relays wait on.
    pub deadline: Instant,
    /// Cancelled on revocation.
    pub cancel: CancellationToken,
}

/// A sign-in between `POST /v1/login` and the provider's redirect back.
#[derive(Debug)]
pub struct PendingSignIn {
    /// Which login (the client's login handle, hashed).
    login: [u8; 32],
    /// The workspace asked for.
    pub workspace: WorkspaceName,
    /// Sent in the authorization request; must come back in the ID token.
    pub nonce: String,
    /// PKCE.
    pub pkce: Pkce,
    /// The client's loopback listener, where the browser goes last.
    pub loopback_port: u16,
    started: Instant,
}

/// What the client that started a sign-in learns, once, for its handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStatus {
    /// A device-flow sign-in the person has not approved yet.
    Pending,
    /// Signed in: the bearer token (handed out once) and the session.
    Done {
        /// The bearer token.
        token: String,
        /// The session's id.
        session_id: String,
        /// Unix seconds.
        expires_at: u64,
    },
    /// Refused, with a reason safe to show.
    Refused(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Revoked {
    people: HashSet<String>,
    workspaces: HashSet<String>,
}

/// A SHA-256 of a secret (token, login handle, handoff).
type Digest = [u8; 32];
/// A sign-in's outcome, the hash of its handoff (if it has one), and when it was recorded.
type Outcome = (LoginStatus, Option<Digest>, Instant);

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<[u8; 32], Arc<Session>>,
    pending: HashMap<String, PendingSignIn>,
    /// Sign-ins by login handle: the outcome, the handoff's hash (none for the device flow,
    /// where the person typing the user code is the binding), when.
    logins: HashMap<Digest, Outcome>,
    revoked: Revoked,
}

/// The store.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    ttl: Duration,
    revoked_file: Option<PathBuf>,
}

/// A session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSummary {
    /// Its id.
    pub id: String,
    /// The person.
    pub subject: String,
    /// The workspace.
    pub workspace: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// What to revoke.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// One session, by id.
    Session(String),
    /// Everything of one person (their `sub`); they cannot sign in again.
    Person(String),
    /// Everything reaching one workspace; its tunnel is refused too.
    Workspace(WorkspaceName),
}

fn hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Session {
    /// The admin view.
    pub fn summary(&self) -> SessionSummary {
        SessionSummary {
            id: self.id.clone(),
            subject: self.identity.subject.clone(),
            workspace: self.workspace.to_string(),
            expires_at: unix(self.expires),
        }
    }

    /// Whether it has ended (expired or revoked).
    pub fn ended(&self) -> bool {
        self.cancel.is_cancelled() || Instant::now() >= self.deadline
    }
}

impl Sessions {
    /// A store whose sessions last `ttl`; revocations persist in `revoked_file` if given.
    pub fn new(ttl: Duration, revoked_file: Option<PathBuf>) -> std::io::Result<Self> {
        let revoked = match &revoked_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revoked::default(),
                Err(e) => return Err(e),
            },
            None => Revoked::default(),
        };
        Ok(Sessions {
            inner: Mutex::new(Inner {
                revoked,
                ..Inner::default()
            }),
            ttl,
            revoked_file,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a sign-in for `workspace`: returns the client's login handle, the `state` for the
    /// authorization request, and the pending record's nonce and PKCE challenge.
    pub fn begin_sign_in(
        &self,
        workspace: WorkspaceName,
        loopback_port: u16,
    ) -> Result<(String, String, String, String), SessionError> {
        let login = random_token().map_err(|_| SessionError::Random)?;
        let state = random_token().map_err(|_| SessionError::Random)?;
        let nonce = random_token().map_err(|_| SessionError::Random)?;
        let pkce = Pkce::generate().map_err(|_| SessionError::Random)?;
        let challenge = pkce.challenge.clone();
        let mut inner = self.lock();
        inner
            .pending
            .retain(|_, p| p.started.elapsed() < SIGN_IN_TIMEOUT);
        inner
            .logins
            .retain(|_, (_, _, at)| at.elapsed() < SIGN_IN_TIMEOUT);
        if inner.pending.len() >= MAX_PENDING || inner.logins.len() >= MAX_PENDING {
            return Err(SessionError::Busy);
        }
        inner.pending.insert(
            state.clone(),
            PendingSignIn {
                login: hash(&login),
                workspace,
                nonce: nonce.clone(),
                pkce,
                loopback_port,
                started: Instant::now(),
            },
        );
        Ok((login, state, nonce, challenge))
    }

    /// Takes the pending sign-in for `state` (once).
    pub fn take_sign_in(&self, state: &str) -> Result<PendingSignIn, SessionError> {
        let mut inner = self.lock();
        match inner.pending.remove(state) {
            Some(p) if p.started.elapsed() < SIGN_IN_TIMEOUT => Ok(p),
            _ => Err(SessionError::UnknownSignIn),
        }
    }

    /// Records the outcome of `pending` for its client; returns the one-time handoff the
    /// browser carries to the client's loopback listener.
    fn finish(&self, pending: &PendingSignIn, status: LoginStatus) -> Result<String, SessionError> {
        let handoff = random_token().map_err(|_| SessionError::Random)?;
        self.lock().logins.insert(
            pending.login,
            (status, Some(hash(&handoff)), Instant::now()),
        );
        Ok(handoff)
    }

    /// Records a refused sign-in; returns its handoff.
    pub fn refuse_sign_in(
        &self,
        pending: &PendingSignIn,
        reason: &str,
    ) -> Result<String, SessionError> {
        self.finish(pending, LoginStatus::Refused(reason.to_owned()))
    }

    /// Whether `subject` is revoked.
    pub fn person_revoked(&self, subject: &str) -> bool {
        self.lock().revoked.people.contains(subject)
    }

    /// Whether `workspace` is revoked.
    pub fn workspace_revoked(&self, workspace: &WorkspaceName) -> bool {
        self.lock().revoked.workspaces.contains(workspace.as_str())
    }

    /// Creates the session for a finished sign-in (the caller has checked the entitlement);
    /// returns it and the handoff for the browser.
    pub fn establish(
        &self,
        pending: &PendingSignIn,
        identity: Identity,
    ) -> Result<(Arc<Session>, String), SessionError> {
        let (session, done) = self.create(pending.workspace.clone(), identity)?;
        let handoff = self.finish(pending, done)?;
        Ok((session, handoff))
    }

    /// A new session and the status that hands its token out.
    fn create(
        &self,
        workspace: WorkspaceName,
        identity: Identity,
    ) -> Result<(Arc<Session>, LoginStatus), SessionError> {
        let token = random_token().map_err(|_| SessionError::Random)?;
        let id = random_token().map_err(|_| SessionError::Random)?;
        let id = id.get(..16).unwrap_or(&id).to_owned();
        let now = SystemTime::now();
        let session = Arc::new(Session {
            id: id.clone(),
            identity,
            workspace,
            created: now,
            expires: now + self.ttl,
            deadline: Instant::now() + self.ttl,
            cancel: CancellationToken::new(),
        });
        let mut inner = self.lock();
        let now_i = Instant::now();
        inner.sessions.retain(|_, s| s.deadline > now_i);
        inner.sessions.insert(hash(&token), Arc::clone(&session));
        let done = LoginStatus::Done {
            token,
            session_id: id,
            expires_at: unix(session.expires),
        };
        Ok((session, done))
    }

    /// Starts a device-flow sign-in: returns the client's login handle.
    pub fn begin_device(&self) -> Result<String, SessionError> {
        let login = random_token().map_err(|_| SessionError::Random)?;
        let mut inner = self.lock();
        inner
            .logins
            .retain(|_, (_, _, at)| at.elapsed() < SIGN_IN_TIMEOUT);
        if inner.logins.len() >= MAX_PENDING {
            return Err(SessionError::Busy);
        }
        inner
            .logins
            .insert(hash(&login), (LoginStatus::Pending, None, Instant::now()));
        Ok(login)
    }

    /// Finishes device-flow sign-in `login` with a session for `identity` on `workspace`.
    pub fn establish_device(
        &self,
        login: &str,
        workspace: WorkspaceName,
        identity: Identity,
    ) -> Result<Arc<Session>, SessionError> {
        let (session, done) = self.create(workspace, identity)?;
        if let Some(entry) = self.lock().logins.get_mut(&hash(login)) {
            entry.0 = done;
        }
        Ok(session)
    }

    /// Records a refused device-flow sign-in.
    pub fn refuse_device(&self, login: &str, reason: &str) {
        if let Some(entry) = self.lock().logins.get_mut(&hash(login)) {
            entry.0 = LoginStatus::Refused(reason.to_owned());
        }
    }

    /// What the device-flow client polling with `login` learns; a final answer is handed out
    /// once.
    pub fn poll_device(&self, login: &str) -> Option<LoginStatus> {
        let mut inner = self.lock();
        let key = hash(login);
        match inner.logins.get(&key) {
            Some((LoginStatus::Pending, None, _)) => Some(LoginStatus::Pending),
            Some((_, None, _)) => inner.logins.remove(&key).map(|(status, _, _)| status),
            _ => None,
        }
    }

    /// The outcome of sign-in `login`, for the client that shows its `handoff`; handed out once.
    pub fn complete(&self, login: &str, handoff: &str) -> Option<LoginStatus> {
        let mut inner = self.lock();
        let key = hash(login);
        let (_, expected, at) = inner.logins.get(&key)?;
        if *expected != Some(hash(handoff)) || at.elapsed() >= SIGN_IN_TIMEOUT {
            return None;
        }
        inner.logins.remove(&key).map(|(status, _, _)| status)
    }

    /// The live session for bearer `token`, which must be for `workspace`.
    pub fn authorize(
        &self,
        token: &str,
        workspace: &WorkspaceName,
    ) -> Result<Arc<Session>, SessionError> {
        let inner = self.lock();
        let session = inner
            .sessions
            .get(&hash(token))
            .filter(|s| !s.ended())
            .ok_or(SessionError::Unknown)?;
        if &session.workspace != workspace {
            return Err(SessionError::WrongWorkspace);
        }
        if inner.revoked.people.contains(&session.identity.subject)
            || inner.revoked.workspaces.contains(workspace.as_str())
        {
            return Err(SessionError::Unknown);
        }
        Ok(Arc::clone(session))
    }

    /// Live sessions.
    pub fn list(&self) -> Vec<SessionSummary> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .sessions
            .values()
            .filter(|s| !s.ended())
            .map(|s| s.summary())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Revokes `target`: matching sessions are cancelled and forgotten; a person or workspace
    /// stays revoked (persisted) so that new sign-ins and tunnels are refused.
    pub fn revoke(&self, target: &Target) -> std::io::Result<Vec<Arc<Session>>> {
        let mut inner = self.lock();
        let matches = |s: &Session| match target {
            Target::Session(id) => &s.id == id,
            Target::Person(sub) => &s.identity.subject == sub,
            Target::Workspace(ws) => &s.workspace == ws,
        };
        let ended: Vec<Arc<Session>> = inner
            .sessions
            .values()
            .filter(|s| matches(s))
            .cloned()
            .collect();
        inner.sessions.retain(|_, s| !matches(s));
        for s in &ended {
            s.cancel.cancel();
        }
        let changed = match target {
            Target::Session(_) => false,
            Target::Person(sub) => inner.revoked.people.insert(sub.clone()),
            Target::Workspace(ws) => inner.revoked.workspaces.insert(ws.to_string()),
        };
        if changed && let Some(path) = &self.revoked_file {
            let bytes = serde_json::to_vec_pretty(&inner.revoked)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ws(name: &str) -> WorkspaceName {
        WorkspaceName::try_from(name).unwrap()
    }

    fn alice() -> Identity {
        Identity {
            subject: "alice".into(),
            email: None,
            groups: vec!["eng".into()],
        }
    }

    /// Signs alice in to `workspace`; returns her bearer token and session.
    fn signed_in(store: &Sessions, workspace: &str) -> (String, Arc<Session>) {
        let (login, state, _, _) = store.begin_sign_in(ws(workspace), 1).unwrap();
        let pending = store.take_sign_in(&state).unwrap();
        let (session, handoff) = store.establish(&pending, alice()).unwrap();
        let Some(LoginStatus::Done { token, .. }) = store.complete(&login, &handoff) else {
            panic!("sign-in not done")
        };
        (token, session)
    }

    #[test]
    fn a_session_authorizes_its_own_workspace_only() {
        let store = Sessions::new(Duration::from_secs(60), None).unwrap();
        let (token, _) = signed_in(&store, "ws1");
        assert!(store.authorize(&token, &ws("ws1")).is_ok());
        assert_eq!(
            store.authorize(&token, &ws("ws2")).unwrap_err(),
            SessionError::WrongWorkspace
        );
    }

    #[test]
    fn a_state_is_accepted_once() {
        let store = Sessions::new(Duration::from_secs(60), None).unwrap();
        let (_, state, _, _) = store.begin_sign_in(ws("ws1"), 1).unwrap();
        assert!(store.take_sign_in(&state).is_ok());
        assert_eq!(
            store.take_sign_in(&state).unwrap_err(),
            SessionError::UnknownSignIn
        );
    }

    #[test]
    fn the_token_is_handed_out_once_and_only_for_the_handoff() {
        let store = Sessions::new(Duration::from_secs(60), None).unwrap();
        let (login, state, _, _) = store.begin_sign_in(ws("ws1"), 1).unwrap();
        let pending = store.take_sign_in(&state).unwrap();
        let (_, handoff) = store.establish(&pending, alice()).unwrap();
        assert_eq!(store.complete(&login, "another-handoff"), None);
        assert!(matches!(
            store.complete(&login, &handoff),
            Some(LoginStatus::Done { .. })
        ));
        assert_eq!(store.complete(&login, &handoff), None);
    }

    #[test]
    fn revoking_a_person_cancels_their_sessions_and_refuses_their_tokens() {
        let store = Sessions::new(Duration::from_secs(60), None).unwrap();
        let (token, session) = signed_in(&store, "ws1");
        let ended = store.revoke(&Target::Person("alice".into())).unwrap();
        assert_eq!(ended.len(), 1);
        assert!(session.cancel.is_cancelled());
        assert_eq!(
            store.authorize(&token, &ws("ws1")).unwrap_err(),
            SessionError::Unknown
        );
        assert!(store.person_revoked("alice"));
    }

    #[test]
    fn revoked_workspaces_persist_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revoked.json");
        let store = Sessions::new(Duration::from_secs(60), Some(file.clone())).unwrap();
        store.revoke(&Target::Workspace(ws("ws1"))).unwrap();
        let restarted = Sessions::new(Duration::from_secs(60), Some(file)).unwrap();
        assert!(restarted.workspace_revoked(&ws("ws1")));
    }

    #[test]
    fn an_expired_session_authorizes_nothing() {
        let store = Sessions::new(Duration::ZERO, None).unwrap();
        let (token, _) = signed_in(&store, "ws1");
        assert_eq!(
            store.authorize(&token, &ws("ws1")).unwrap_err(),
            SessionError::Unknown
        );
    }
}
