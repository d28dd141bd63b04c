//! Sign-ins in flight, live sessions, and what is revoked.
//!
//! A session is bound to one person (the ID token's `sub`) and one workspace, lives at most the
//! configured TTL and is never renewed past it. Within it, the provider must keep confirming the
//! person: each session holds the refresh token of its sign-in (in memory only) and is
//! *confirmed until* an instant, the last confirmation plus the entitlement interval
//! ([`crate::entitlement`] re-checks it before then). A session not confirmed again by then has
//! ended ([`Session::ended`]) and the entitlement task ends its relays. The client holds an
//! opaque bearer token; the broker keeps only its SHA-256. Every relayed stream watches its
//! session's [`CancellationToken`], so revoking the session, its person or its workspace ends the
//! stream at once. Revoked people and workspaces are written to the state directory and survive a
//! restart; sessions do not (a restarted broker has none: everyone signs in again). A revoked
//! workspace's tunnel certificates are revoked too, by serial ([`Sessions::revoke_certificates`]),
//! and stay revoked when the name is allowed again ([`Sessions::unrevoke`]): only a certificate
//! issued after that (a new enrolment) brings the workspace back.
//!
//! A sign-in is bound to the machine whose browser finished it, not only to whoever started it:
//! the broker's callback sends the browser on to the client's loopback listener
//! (`http://127.0.0.1:<port>/?handoff=...`, RFC 8252's native-app pattern) and the session is
//! handed out only for the login handle *and* that one-time handoff. A sign-in URL sent to a
//! victim by someone else therefore yields them nothing: the handoff lands on the victim's own
//! loopback.

pub mod schedule;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use moat_broker_client::protocol::SIGN_IN_TIMEOUT;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::WorkspaceName;
use crate::oidc::{Identity, NonceRule, Pkce, RefreshToken, SignedIn, random_token};
use crate::pki::Serial;
use schedule::{Schedule, Unconfirmed};

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
    /// The sign-in's nonce (authorization code flow; none for the device flow), which an ID
    /// token from a refresh may repeat.
    nonce: Option<String>,
    /// The provider's confirmations. Locked briefly, never across an await, and only ever after
    /// the store's lock, never before it.
    confirmation: Mutex<Confirmation>,
}

/// Where a session stands with the identity provider.
#[derive(Debug)]
struct Confirmation {
    /// What the next check uses; `None` when the provider gave none, so that the session ends
    /// once `until` passes.
    refresh_token: Option<RefreshToken>,
    /// The session has ended, unconfirmed, once this passes without a new confirmation.
    until: Instant,
    /// When the next check is due.
    next_check: Instant,
    /// A check is running.
    checking: bool,
    /// The last confirmation (the sign-in first), for the admin view.
    confirmed_at: SystemTime,
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
    /// Workspace tunnel certificates, by serial; never taken back (absent in files written
    /// before serials were revoked).
    #[serde(default)]
    certificates: HashSet<Serial>,
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
    schedule: Schedule,
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
    /// When the identity provider last confirmed the person's entitlement (the sign-in, then each
    /// successful check), Unix seconds.
    #[serde(default)]
    pub confirmed_at: u64,
}

/// The sessions the entitlement task acts on now ([`Sessions::sweep`]).
#[derive(Debug, Default)]
pub struct Sweep {
    /// Sessions that went unconfirmed for the whole interval, and why: they end now.
    pub unconfirmed: Vec<(Arc<Session>, Unconfirmed)>,
    /// Sessions whose check is due, each now marked as being checked.
    pub due: Vec<Arc<Session>>,
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

/// What may be allowed again after a revocation (a session may not: it is gone).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Unrevoke {
    /// A person, who may sign in again.
    Person(String),
    /// A workspace, whose tunnel is accepted again, but only with a certificate issued after
    /// its revocation.
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
            confirmed_at: unix(self.lock_confirmation().confirmed_at),
        }
    }

    /// Whether it has ended: revoked, expired, or not confirmed by the provider in time.
    pub fn ended(&self) -> bool {
        let now = Instant::now();
        self.cancel.is_cancelled() || now >= self.deadline || now >= self.lock_confirmation().until
    }

    /// What the next check sends: the refresh token, and the rule for the refreshed ID token's
    /// nonce (the device flow's sign-in checked none, so neither does its refresh).
    pub fn refresh_grant(&self) -> Option<(RefreshToken, NonceRule<'_>)> {
        let token = self.lock_confirmation().refresh_token.clone()?;
        let rule = match &self.nonce {
            Some(n) => NonceRule::Refreshed(Some(n)),
            None => NonceRule::Unchecked,
        };
        Some((token, rule))
    }

    /// Whether the session is still confirmed at `now` (so a check starting now may extend it).
    pub fn is_confirmed(&self, now: Instant) -> bool {
        now < self.lock_confirmation().until
    }

    fn lock_confirmation(&self) -> MutexGuard<'_, Confirmation> {
        self.confirmation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sessions {
    /// A store whose sessions last `ttl` and are checked with the provider on `schedule`;
    /// revocations persist in `revoked_file` if given.
    pub fn new(
        ttl: Duration,
        schedule: Schedule,
        revoked_file: Option<PathBuf>,
    ) -> std::io::Result<Self> {
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
            schedule,
            revoked_file,
        })
    }

    /// The entitlement check's schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
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

    /// Whether the tunnel certificate with `serial` is revoked.
    pub fn certificate_revoked(&self, serial: &Serial) -> bool {
        self.lock().revoked.certificates.contains(serial)
    }

    /// Creates the session for a finished sign-in (the caller has checked the entitlement);
    /// returns it and the handoff for the browser.
    pub fn establish(
        &self,
        pending: &PendingSignIn,
        signed_in: SignedIn,
    ) -> Result<(Arc<Session>, String), SessionError> {
        let (session, done) = self.create(
            pending.workspace.clone(),
            signed_in,
            Some(pending.nonce.clone()),
        )?;
        let handoff = self.finish(pending, done)?;
        Ok((session, handoff))
    }

    /// A new session and the status that hands its token out. The sign-in is its first
    /// confirmation.
    fn create(
        &self,
        workspace: WorkspaceName,
        signed_in: SignedIn,
        nonce: Option<String>,
    ) -> Result<(Arc<Session>, LoginStatus), SessionError> {
        let token = random_token().map_err(|_| SessionError::Random)?;
        let id = random_token().map_err(|_| SessionError::Random)?;
        let id = id.get(..16).unwrap_or(&id).to_owned();
        let now = SystemTime::now();
        let started = Instant::now();
        let (until, next_check) = self.schedule.confirmed(started);
        let session = Arc::new(Session {
            id: id.clone(),
            identity: signed_in.identity,
            workspace,
            created: now,
            expires: now + self.ttl,
            deadline: started + self.ttl,
            cancel: CancellationToken::new(),
            nonce,
            confirmation: Mutex::new(Confirmation {
                refresh_token: signed_in.refresh_token,
                until,
                next_check,
                checking: false,
                confirmed_at: now,
            }),
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

    /// Finishes device-flow sign-in `login` with a session for `signed_in` on `workspace`.
    pub fn establish_device(
        &self,
        login: &str,
        workspace: WorkspaceName,
        signed_in: SignedIn,
    ) -> Result<Arc<Session>, SessionError> {
        let (session, done) = self.create(workspace, signed_in, None)?;
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

    /// At `now`: forgets revoked and expired sessions (dropping their refresh tokens), and says
    /// which sessions went unconfirmed for the whole interval (to end now) and whose check is
    /// due (marked as being checked, so that each session has at most one check running).
    pub fn sweep(&self, now: Instant) -> Sweep {
        let mut inner = self.lock();
        inner
            .sessions
            .retain(|_, s| !s.cancel.is_cancelled() && now < s.deadline);
        let mut sweep = Sweep::default();
        for session in inner.sessions.values() {
            let mut c = session.lock_confirmation();
            if now >= c.until {
                let why = match c.refresh_token {
                    Some(_) => Unconfirmed::NoAnswer,
                    None => Unconfirmed::NoRefreshToken,
                };
                sweep.unconfirmed.push((Arc::clone(session), why));
            } else if !c.checking && c.refresh_token.is_some() && now >= c.next_check {
                c.checking = true;
                sweep.due.push(Arc::clone(session));
            }
        }
        sweep
    }

    /// A check of `session` that started at `started` was answered: the provider confirmed the
    /// person. Extends the session's confirmation if the check started while it was still
    /// confirmed, and keeps the rotated refresh token, if any.
    pub fn confirm(&self, session: &Session, started: Instant, rotated: Option<RefreshToken>) {
        let (until, next_check) = self.schedule.confirmed(started);
        let mut c = session.lock_confirmation();
        c.checking = false;
        if let Some(token) = rotated {
            c.refresh_token = Some(token);
        }
        if started < c.until && until > c.until {
            c.until = until;
            c.next_check = next_check;
            c.confirmed_at = SystemTime::now()
                .checked_sub(started.elapsed())
                .unwrap_or_else(SystemTime::now);
        }
    }

    /// A check of `session` got no usable answer at `now`: try again soon (the session still
    /// ends when its confirmation runs out).
    pub fn unanswered(&self, session: &Session, now: Instant) {
        let mut c = session.lock_confirmation();
        c.checking = false;
        c.next_check = self.schedule.retry(now);
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
        if changed {
            self.persist(&inner.revoked)?;
        }
        Ok(ended)
    }

    /// Revokes the tunnel certificates with `serials` for good (persisted); returns how many
    /// were not revoked already. Nothing takes a serial back: a workspace allowed again
    /// ([`Sessions::unrevoke`]) needs a certificate issued after its revocation.
    pub fn revoke_certificates(&self, serials: Vec<Serial>) -> std::io::Result<usize> {
        let mut inner = self.lock();
        let added = serials
            .into_iter()
            .filter(|s| inner.revoked.certificates.insert(s.clone()))
            .count();
        if added > 0 {
            self.persist(&inner.revoked)?;
        }
        Ok(added)
    }

    /// Allows a revoked person or workspace again (persisted); returns whether it was revoked.
    /// A workspace's revoked certificates stay revoked.
    pub fn unrevoke(&self, target: &Unrevoke) -> std::io::Result<bool> {
        let mut inner = self.lock();
        let changed = match target {
            Unrevoke::Person(sub) => inner.revoked.people.remove(sub),
            Unrevoke::Workspace(ws) => inner.revoked.workspaces.remove(ws.as_str()),
        };
        if changed {
            self.persist(&inner.revoked)?;
        }
        Ok(changed)
    }

    /// Writes `revoked` to the revocation file, if there is one: a new file renamed over the
    /// old, so a crash leaves one or the other whole.
    fn persist(&self, revoked: &Revoked) -> std::io::Result<()> {
        let Some(path) = &self.revoked_file else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(revoked)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ws(name: &str) -> WorkspaceName {
        WorkspaceName::try_from(name).unwrap()
    }

    fn alice() -> SignedIn {
        SignedIn {
            identity: Identity {
                subject: "alice".into(),
                email: None,
                groups: vec!["eng".into()],
            },
            refresh_token: Some(RefreshToken::new("rt-1".into())),
        }
    }

    /// Sessions of `ttl`, checked every minute.
    fn store(ttl: Duration) -> Sessions {
        Sessions::new(ttl, Schedule::new(Duration::from_secs(60)), None).unwrap()
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
        let store = store(Duration::from_secs(60));
        let (token, _) = signed_in(&store, "ws1");
        assert!(store.authorize(&token, &ws("ws1")).is_ok());
        assert_eq!(
            store.authorize(&token, &ws("ws2")).unwrap_err(),
            SessionError::WrongWorkspace
        );
    }

    #[test]
    fn a_state_is_accepted_once() {
        let store = store(Duration::from_secs(60));
        let (_, state, _, _) = store.begin_sign_in(ws("ws1"), 1).unwrap();
        assert!(store.take_sign_in(&state).is_ok());
        assert_eq!(
            store.take_sign_in(&state).unwrap_err(),
            SessionError::UnknownSignIn
        );
    }

    #[test]
    fn the_token_is_handed_out_once_and_only_for_the_handoff() {
        let store = store(Duration::from_secs(60));
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
        let store = store(Duration::from_secs(60));
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
        let store = Sessions::new(
            Duration::from_secs(60),
            Schedule::new(Duration::from_secs(60)),
            Some(file.clone()),
        )
        .unwrap();
        store.revoke(&Target::Workspace(ws("ws1"))).unwrap();
        let restarted = Sessions::new(
            Duration::from_secs(60),
            Schedule::new(Duration::from_secs(60)),
            Some(file),
        )
        .unwrap();
        assert!(restarted.workspace_revoked(&ws("ws1")));
    }

    #[test]
    fn revoked_certificates_outlive_the_name_being_allowed_again_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revoked.json");
        // A file from before serials were revoked still loads.
        std::fs::write(&file, r#"{"people": [], "workspaces": ["ws2"]}"#).unwrap();
        let open = || {
            Sessions::new(
                Duration::from_secs(60),
                Schedule::new(Duration::from_secs(60)),
                Some(file.clone()),
            )
            .unwrap()
        };
        let store = open();
        let (old, new) = (
            Serial::from_be_bytes(&[0x0a]),
            Serial::from_be_bytes(&[0x0b]),
        );
        store.revoke(&Target::Workspace(ws("ws1"))).unwrap();
        assert_eq!(store.revoke_certificates(vec![old.clone()]).unwrap(), 1);
        assert_eq!(store.revoke_certificates(vec![old.clone()]).unwrap(), 0);

        assert!(store.unrevoke(&Unrevoke::Workspace(ws("ws1"))).unwrap());
        assert!(!store.unrevoke(&Unrevoke::Workspace(ws("ws1"))).unwrap());

        let restarted = open();
        assert!(!restarted.workspace_revoked(&ws("ws1")));
        assert!(restarted.workspace_revoked(&ws("ws2")));
        assert!(restarted.certificate_revoked(&old));
        assert!(!restarted.certificate_revoked(&new));
    }

    #[test]
    fn a_session_is_due_for_its_check_before_its_confirmation_runs_out_and_once_at_a_time() {
        let store = store(Duration::from_secs(900));
        let (_, session) = signed_in(&store, "ws1");
        let schedule = store.schedule();
        let signed_in_at = session.deadline - Duration::from_secs(900);

        let early = store.sweep(signed_in_at + Duration::from_secs(1));
        assert!(early.due.is_empty() && early.unconfirmed.is_empty());

        let due_at = signed_in_at + schedule.interval() - schedule.lead();
        let due = store.sweep(due_at);
        assert_eq!(due.due.len(), 1);
        assert!(due.unconfirmed.is_empty());
        assert!(
            store.sweep(due_at).due.is_empty(),
            "one check at a time per session"
        );
    }

    #[test]
    fn a_confirmation_extends_the_session_and_keeps_the_rotated_refresh_token() {
        let store = store(Duration::from_secs(900));
        let (_, session) = signed_in(&store, "ws1");
        let schedule = store.schedule();
        let signed_in_at = session.deadline - Duration::from_secs(900);
        let due_at = signed_in_at + schedule.interval() - schedule.lead();
        assert_eq!(store.sweep(due_at).due.len(), 1);

        store.confirm(&session, due_at, Some(RefreshToken::new("rt-2".into())));

        let after_first_interval = signed_in_at + schedule.interval();
        assert!(session.is_confirmed(after_first_interval));
        assert!(store.sweep(after_first_interval).unconfirmed.is_empty());
        let (rotated, _) = session.refresh_grant().unwrap();
        assert_eq!(rotated.expose(), "rt-2");
        // The next check is due one interval (less the lead) after the last one started.
        assert_eq!(
            store
                .sweep(due_at + schedule.interval() - schedule.lead())
                .due
                .len(),
            1
        );
    }

    #[test]
    fn a_session_unconfirmed_for_a_whole_interval_has_ended() {
        let store = store(Duration::from_secs(900));
        let (_, session) = signed_in(&store, "ws1");
        let schedule = store.schedule();
        let signed_in_at = session.deadline - Duration::from_secs(900);
        let due_at = signed_in_at + schedule.interval() - schedule.lead();
        assert_eq!(store.sweep(due_at).due.len(), 1);
        store.unanswered(&session, due_at);
        // Retried before the end...
        let retry = store.sweep(schedule.retry(due_at));
        assert_eq!(retry.due.len(), 1);
        store.unanswered(&session, schedule.retry(due_at));

        // ...but nothing confirmed it: at the interval's end it is over.
        let end = store.sweep(signed_in_at + schedule.interval());
        assert_eq!(end.unconfirmed.len(), 1);
        assert_eq!(end.unconfirmed[0].1, Unconfirmed::NoAnswer);
        assert!(end.due.is_empty());
        assert!(!session.is_confirmed(signed_in_at + schedule.interval()));
        // A late answer to a check that started after the end does not bring it back.
        store.confirm(&session, signed_in_at + schedule.interval(), None);
        assert!(!session.is_confirmed(signed_in_at + schedule.interval()));
    }

    #[test]
    fn a_session_without_a_refresh_token_is_never_checked_and_ends_after_one_interval() {
        let store = store(Duration::from_secs(900));
        let (login, state, _, _) = store.begin_sign_in(ws("ws1"), 1).unwrap();
        let pending = store.take_sign_in(&state).unwrap();
        let mut who = alice();
        who.refresh_token = None;
        let (session, handoff) = store.establish(&pending, who).unwrap();
        assert!(matches!(
            store.complete(&login, &handoff),
            Some(LoginStatus::Done { .. })
        ));
        let schedule = store.schedule();
        let signed_in_at = session.deadline - Duration::from_secs(900);

        assert!(
            store
                .sweep(signed_in_at + schedule.interval() - schedule.lead())
                .due
                .is_empty()
        );
        let end = store.sweep(signed_in_at + schedule.interval());
        assert_eq!(end.unconfirmed.len(), 1);
        assert_eq!(end.unconfirmed[0].1, Unconfirmed::NoRefreshToken);
        assert!(session.refresh_grant().is_none());
    }

    #[test]
    fn a_code_flow_refresh_allows_the_sign_ins_nonce_and_a_device_flow_refresh_checks_none() {
        let store = store(Duration::from_secs(900));
        let (_, session) = signed_in(&store, "ws1");
        let (_, rule) = session.refresh_grant().unwrap();
        assert!(matches!(rule, NonceRule::Refreshed(Some(_))));

        let login = store.begin_device().unwrap();
        let device = store.establish_device(&login, ws("ws1"), alice()).unwrap();
        let (_, rule) = device.refresh_grant().unwrap();
        assert_eq!(rule, NonceRule::Unchecked);
    }

    #[test]
    fn revoked_and_expired_sessions_are_forgotten_at_the_next_sweep() {
        let store = store(Duration::from_secs(900));
        let (_, session) = signed_in(&store, "ws1");
        let (_, other) = signed_in(&store, "ws1");
        store.revoke(&Target::Session(session.id.clone())).unwrap();
        assert_eq!(store.list().len(), 1);
        let sweep = store.sweep(other.deadline);
        assert!(sweep.due.is_empty() && sweep.unconfirmed.is_empty());
        assert!(store.list().is_empty());
    }

    #[test]
    fn an_expired_session_authorizes_nothing() {
        let store = store(Duration::ZERO);
        let (token, _) = signed_in(&store, "ws1");
        assert_eq!(
            store.authorize(&token, &ws("ws1")).unwrap_err(),
            SessionError::Unknown
        );
    }
}
