//! Losing an entitlement at the identity provider ends the person's sessions within a bound.
//!
//! Each session keeps the refresh token of its sign-in (in memory only, see
//! [`crate::oidc::RefreshToken`]) and is *confirmed until* its last confirmation plus
//! `entitlement_check_secs` (the interval, `I`). One task ([`run`]) uses each session's refresh
//! token at the provider's token endpoint before that runs out: [`Schedule::lead`](crate::session::schedule::Schedule::lead) before it,
//! with that long to finish. The refreshed ID token is validated as at sign-in (issuer, audience,
//! algorithm, key, expiry; its nonce per OpenID Connect Core 12.2) and [`judge`]d:
//!
//! - the same `sub` whose groups still entitle the workspace: confirmed again, until the check's
//!   start plus `I`; a rotated refresh token replaces the old one;
//! - `invalid_grant` (refresh refused: account disabled, grant or token revoked), another `sub`,
//!   groups that no longer entitle the workspace, or an ID token that fails validation: the
//!   session ends at once, as an administrator's revocation of it does (relays cancelled, live
//!   SSH dropped, a Logoff audited with the reason);
//! - no usable answer (provider unreachable, timeout, an error status other than
//!   `invalid_grant`, garbage, no ID token, a signing key not known yet): tried again shortly;
//!   the session ends when its confirmation runs out, at most `I` after the last successful
//!   check. A session whose sign-in brought no refresh token cannot be checked and so lives at
//!   most `I`.
//!
//! At most [`MAX_CONCURRENT_CHECKS`] checks run at once; no lock is held across an await.

use std::sync::Arc;
use std::time::Instant;

use moat_broker_client::https::HttpsError;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::oidc::{Identity, OidcError, RefreshError, RefreshToken, SignedIn, TokenError};
use crate::session::schedule::TICK;
use crate::session::{Session, Target};
use crate::state::Broker;

/// At most this many checks run at once.
pub const MAX_CONCURRENT_CHECKS: usize = 8;
/// Why a session's entitlement is gone: the provider said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The person is no longer in any of the workspace's groups.
    GroupRemoved,
    /// The refreshed ID token names another subject.
    AnotherSubject,
    /// The provider refused the refresh token (`invalid_grant`).
    RefreshRefused,
    /// The refreshed ID token failed validation.
    TokenRefused,
    /// The workspace is no longer configured.
    WorkspaceGone,
}

impl Lost {
    /// The audit record's `status_detail`.
    pub fn reason(self) -> &'static str {
        match self {
            Lost::GroupRemoved => "entitlement lost: group removed",
            Lost::AnotherSubject => "entitlement lost: the provider named another subject",
            Lost::RefreshRefused => "entitlement lost: refresh refused",
            Lost::TokenRefused => "entitlement lost: the refreshed ID token was refused",
            Lost::WorkspaceGone => "entitlement lost: workspace not configured",
        }
    }
}

/// Whether a person in `person_groups` may reach a workspace open to `workspace_groups`.
pub fn entitled(person_groups: &[String], workspace_groups: &[String]) -> bool {
    person_groups.iter().any(|g| workspace_groups.contains(g))
}

/// Whether `now`, what the provider vouches for today, is still the person who signed in as
/// `original` and still entitled to a workspace open to `workspace_groups` (`None`: the
/// workspace is gone).
pub fn decide(
    original: &Identity,
    now: &Identity,
    workspace_groups: Option<&[String]>,
) -> Result<(), Lost> {
    if now.subject != original.subject {
        return Err(Lost::AnotherSubject);
    }
    let Some(groups) = workspace_groups else {
        return Err(Lost::WorkspaceGone);
    };
    if entitled(&now.groups, groups) {
        Ok(())
    } else {
        Err(Lost::GroupRemoved)
    }
}

/// What one check concluded.
#[derive(Debug)]
pub enum Outcome {
    /// Still entitled; the rotated refresh token, if the provider rotated it.
    Confirmed(Option<RefreshToken>),
    /// The entitlement is gone: end the session now.
    Lost(Lost),
    /// No usable answer: try again; the session ends if none comes in time.
    NoAnswer(RefreshError),
}

/// Judges the provider's answer to a refresh for a session of `original` on a workspace open to
/// `workspace_groups`.
pub fn judge(
    answer: Result<SignedIn, RefreshError>,
    original: &Identity,
    workspace_groups: Option<&[String]>,
) -> Outcome {
    match answer {
        Ok(now) => match decide(original, &now.identity, workspace_groups) {
            Ok(()) => Outcome::Confirmed(now.refresh_token),
            Err(lost) => Outcome::Lost(lost),
        },
        Err(RefreshError::Refused) => Outcome::Lost(Lost::RefreshRefused),
        // A key the broker has not fetched yet (the JWKS is fetched again at most every 30 s)
        // may be a rotation at the provider: not a verdict on the person.
        Err(e @ RefreshError::Token(TokenError::UnknownKey)) => Outcome::NoAnswer(e),
        Err(RefreshError::Token(_)) => Outcome::Lost(Lost::TokenRefused),
        Err(e @ (RefreshError::NoIdToken | RefreshError::Unavailable(_))) => Outcome::NoAnswer(e),
    }
}

/// Checks every live session's entitlement on the sessions' schedule until `shutdown`; checks in
/// flight stop with it.
pub async fn run(broker: Arc<Broker>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS));
    let mut checks = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        while checks.try_join_next().is_some() {}
        let sweep = broker.sessions.sweep(Instant::now());
        for (session, why) in sweep.unconfirmed {
            tracing::warn!(session = %session.id, subject = %session.identity.subject,
                "session ended: {}", why.reason());
            end(&broker, &session, why.reason());
        }
        for session in sweep.due {
            let (broker, slots) = (Arc::clone(&broker), Arc::clone(&slots));
            checks.spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                check(&broker, &session).await;
            });
        }
    }
}

/// One check of `session` at the provider.
async fn check(broker: &Broker, session: &Arc<Session>) {
    let schedule = broker.sessions.schedule();
    let started = Instant::now();
    // Waiting for a slot may have taken it past its confirmation: the sweep ends it.
    let grant = session
        .refresh_grant()
        .filter(|_| session.is_confirmed(started));
    let Some((token, nonce)) = grant else {
        broker.sessions.unanswered(session, started);
        return;
    };
    let answer = tokio::time::timeout(schedule.lead(), broker.provider.refresh(&token, nonce))
        .await
        .unwrap_or_else(|_| {
            Err(RefreshError::Unavailable(OidcError::Https(
                HttpsError::Timeout(schedule.lead()),
            )))
        });
    drop(token);
    let groups = broker
        .config
        .workspace(&session.workspace)
        .map(|w| w.groups.as_slice());
    match judge(answer, &session.identity, groups) {
        Outcome::Confirmed(rotated) => {
            tracing::debug!(session = %session.id, "entitlement confirmed");
            broker.sessions.confirm(session, started, rotated);
        }
        Outcome::Lost(lost) => {
            tracing::info!(session = %session.id, subject = %session.identity.subject,
                "session ended: {}", lost.reason());
            end(broker, session, lost.reason());
        }
        Outcome::NoAnswer(e) => {
            tracing::warn!(session = %session.id,
                "the identity provider did not confirm the entitlement: {}",
                crate::error_chain(&e));
            broker.sessions.unanswered(session, Instant::now());
        }
    }
}

/// Ends `session` as an administrator's revocation of it does, audited with `reason`.
fn end(broker: &Broker, session: &Session, reason: &str) {
    // Ending one session persists nothing, so this cannot fail; log it if it ever does.
    if let Err(e) = broker.end_sessions(&Target::Session(session.id.clone()), reason) {
        tracing::error!(session = %session.id, "cannot end the session: {e}");
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn alice(groups: &[&str]) -> Identity {
        Identity {
            subject: "alice".into(),
            email: Some("alice@example.test".into()),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    fn ws_groups() -> Vec<String> {
        vec!["eng".into(), "ops".into()]
    }

    #[test]
    fn the_same_person_still_in_a_workspace_group_is_still_entitled() {
        let groups = ws_groups();
        assert_eq!(
            decide(&alice(&["eng"]), &alice(&["ops", "x"]), Some(&groups)),
            Ok(())
        );
    }

    #[test]
    fn a_person_no_longer_in_any_workspace_group_has_lost_it() {
        let groups = ws_groups();
        assert_eq!(
            decide(&alice(&["eng"]), &alice(&["sales"]), Some(&groups)),
            Err(Lost::GroupRemoved)
        );
        assert_eq!(
            decide(&alice(&["eng"]), &alice(&[]), Some(&groups)),
            Err(Lost::GroupRemoved)
        );
    }

    #[test]
    fn another_subject_is_not_the_person_who_signed_in() {
        let groups = ws_groups();
        let mut bob = alice(&["eng"]);
        bob.subject = "bob".into();
        assert_eq!(
            decide(&alice(&["eng"]), &bob, Some(&groups)),
            Err(Lost::AnotherSubject)
        );
    }

    #[test]
    fn a_workspace_no_longer_configured_entitles_nobody() {
        assert_eq!(
            decide(&alice(&["eng"]), &alice(&["eng"]), None),
            Err(Lost::WorkspaceGone)
        );
    }

    #[test]
    fn the_providers_answers_are_judged() {
        let groups = ws_groups();
        let judged = |answer| judge(answer, &alice(&["eng"]), Some(&groups));
        let still = SignedIn {
            identity: alice(&["eng"]),
            refresh_token: Some(RefreshToken::new("rt-2".into())),
        };
        assert!(matches!(
            judged(Ok(still)),
            Outcome::Confirmed(Some(ref t)) if t.expose() == "rt-2"
        ));
        let removed = SignedIn {
            identity: alice(&["sales"]),
            refresh_token: None,
        };
        assert!(matches!(
            judged(Ok(removed)),
            Outcome::Lost(Lost::GroupRemoved)
        ));
        assert!(matches!(
            judged(Err(RefreshError::Refused)),
            Outcome::Lost(Lost::RefreshRefused)
        ));
        for refused in [
            TokenError::Signature,
            TokenError::Issuer,
            TokenError::Audience,
            TokenError::Nonce,
            TokenError::Expired,
        ] {
            assert!(matches!(
                judged(Err(RefreshError::Token(refused))),
                Outcome::Lost(Lost::TokenRefused)
            ));
        }
        assert!(matches!(
            judged(Err(RefreshError::Token(TokenError::UnknownKey))),
            Outcome::NoAnswer(_)
        ));
        assert!(matches!(
            judged(Err(RefreshError::NoIdToken)),
            Outcome::NoAnswer(_)
        ));
        assert!(matches!(
            judged(Err(RefreshError::Unavailable(OidcError::Status {
                what: "the refresh request",
                status: 503
            }))),
            Outcome::NoAnswer(_)
        ));
    }

    #[test]
    fn reasons_say_what_happened() {
        assert_eq!(
            Lost::GroupRemoved.reason(),
            "entitlement lost: group removed"
        );
        assert_eq!(
            Lost::RefreshRefused.reason(),
            "entitlement lost: refresh refused"
        );
    }
}
