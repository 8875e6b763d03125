//! Imports the control plane announced: a box archive is imported only with
//! the one-time token the control plane issued for that box and this runner.
//!
//! The announcement reaches the runner in its own healthcheck answers
//! ([`protocol::ImportGrant`]: box id, SHA-256 of the token, expiry), over the
//! connection the runner opens to the control plane with its runner token —
//! not over the runner's API, whose bearer key is what an attacker would hold.
//! The import request presents the token in [`protocol::IMPORT_TOKEN_HEADER`];
//! [`Imports::claim`] accepts it once, for the announced box, before it
//! expires. Answers are level-triggered (each one replaces what was announced
//! before), and a claimed token stays claimed however often it is announced
//! again.
//!
//! The control plane announces just before it sends the import, so the
//! import may arrive before the runner's next check-in: [`Imports::fresh_answer`]
//! asks for a check-in at once and waits (bounded) for an answer to a
//! healthcheck that started after the import arrived.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::ImportGrant;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

/// Longest an import waits for a healthcheck answer that may announce it.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

/// Why an import was refused before anything was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportRefused {
    /// The request carries no token.
    #[error(
        "an import needs the {} header: the one-time token the control plane issued for it",
        protocol::IMPORT_TOKEN_HEADER
    )]
    TokenRequired,
    /// Nothing was announced for this box.
    #[error("the control plane announced no import of box {0} to this runner")]
    NotAnnounced(Uuid),
    /// The token is not the one announced for this box.
    #[error("the import token is not the one announced for box {0}")]
    WrongToken(Uuid),
    /// The announced token expired.
    #[error("the import token for box {0} expired at {1}")]
    Expired(Uuid, String),
    /// The token was used already.
    #[error("the import token for box {0} was used already; it is valid once")]
    Used(Uuid),
}

impl ImportRefused {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            ImportRefused::TokenRequired => "import_token_required",
            ImportRefused::NotAnnounced(_) => "import_not_announced",
            ImportRefused::WrongToken(_) => "import_token_invalid",
            ImportRefused::Expired(..) => "import_token_expired",
            ImportRefused::Used(_) => "import_token_used",
        }
    }

    /// True when a fresher announcement could change the outcome.
    fn may_be_stale(&self) -> bool {
        matches!(
            self,
            ImportRefused::NotAnnounced(_) | ImportRefused::WrongToken(_)
        )
    }
}

struct Announced {
    token_sha256: [u8; 32],
    expires_at: OffsetDateTime,
}

#[derive(Default)]
struct Inner {
    announced: HashMap<Uuid, Announced>,
    /// Claimed token hashes, kept until they expire.
    used: HashMap<[u8; 32], (Uuid, OffsetDateTime)>,
}

/// What the control plane announced, and which tokens were used.
pub struct Imports {
    inner: Mutex<Inner>,
    /// Number of healthchecks started.
    started: AtomicU64,
    /// Sequence number of the latest healthcheck that got an answer.
    answered: tokio::sync::watch::Sender<u64>,
}

impl Default for Imports {
    fn default() -> Self {
        Imports {
            inner: Mutex::new(Inner::default()),
            started: AtomicU64::new(0),
            answered: tokio::sync::watch::channel(0).0,
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str.trim(), &mut out).ok()?;
    Some(out)
}

impl Imports {
    /// A healthcheck is about to be sent: its sequence number.
    pub fn begin_check(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The answer to healthcheck `seq` announced `grants` (and nothing else).
    pub fn announce(&self, seq: u64, grants: &[ImportGrant], now: OffsetDateTime) {
        {
            let mut g = self.inner.lock().expect("imports lock");
            g.used.retain(|_, (_, expires)| *expires > now);
            let mut announced = HashMap::with_capacity(grants.len());
            for grant in grants {
                let Some(h) = parse_hash(&grant.token_sha256) else {
                    tracing::warn!(r#box = %grant.box_id, "ignoring an announced import with a malformed token hash");
                    continue;
                };
                if g.used.contains_key(&h) {
                    continue;
                }
                announced.insert(
                    grant.box_id,
                    Announced {
                        token_sha256: h,
                        expires_at: grant.expires_at,
                    },
                );
            }
            g.announced = announced;
        }
        self.answered.send_if_modified(|a| {
            let newer = seq > *a;
            if newer {
                *a = seq;
            }
            newer
        });
    }

    /// Accept `token` for importing `box_id` at `now`, once.
    pub fn claim(
        &self,
        box_id: Uuid,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<(), ImportRefused> {
        let h = digest(token);
        let mut g = self.inner.lock().expect("imports lock");
        if g.used.get(&h).is_some_and(|(b, _)| *b == box_id) {
            return Err(ImportRefused::Used(box_id));
        }
        let Some(a) = g.announced.get(&box_id) else {
            return Err(ImportRefused::NotAnnounced(box_id));
        };
        if !crate::sys::ct_eq(&a.token_sha256, &h) {
            return Err(ImportRefused::WrongToken(box_id));
        }
        if a.expires_at <= now {
            let at = a
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            return Err(ImportRefused::Expired(box_id, at));
        }
        let a = g.announced.remove(&box_id).expect("just looked up");
        g.used.insert(h, (box_id, a.expires_at));
        Ok(())
    }

    /// Wait (at most `limit`) for the answer to a healthcheck that starts
    /// after this call; `wake` asks the healthcheck loop to send one now.
    pub async fn fresh_answer(&self, wake: impl FnOnce(), limit: Duration) {
        let need = self.started.load(Ordering::SeqCst) + 1;
        let mut rx = self.answered.subscribe();
        wake();
        let _ = tokio::time::timeout(limit, rx.wait_for(|a| *a >= need)).await;
    }

    /// [`Imports::claim`], and when the refusal may come from an announcement
    /// not seen yet, again after a fresh healthcheck answer.
    pub async fn claim_fresh(
        &self,
        box_id: Uuid,
        token: &str,
        wake: impl FnOnce(),
        limit: Duration,
    ) -> Result<(), ImportRefused> {
        match self.claim(box_id, token, OffsetDateTime::now_utc()) {
            Err(e) if e.may_be_stale() => {
                self.fresh_answer(wake, limit).await;
                self.claim(box_id, token, OffsetDateTime::now_utc())
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(box_id: Uuid, token: &str, expires_at: OffsetDateTime) -> ImportGrant {
        ImportGrant {
            box_id,
            token_sha256: hex::encode(digest(token)),
            expires_at,
        }
    }

    #[test]
    fn a_token_is_accepted_once_for_its_box_until_it_expires() {
        let now = OffsetDateTime::now_utc();
        let later = now + time::Duration::minutes(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let i = Imports::default();
        assert_eq!(i.claim(a, "t", now), Err(ImportRefused::NotAnnounced(a)));
        i.announce(
            1,
            &[
                grant(a, "ta", later),
                grant(b, "tb", now - time::Duration::seconds(1)),
            ],
            now,
        );
        assert_eq!(i.claim(a, "tb", now), Err(ImportRefused::WrongToken(a)));
        assert_eq!(i.claim(c, "ta", now), Err(ImportRefused::NotAnnounced(c)));
        assert!(matches!(
            i.claim(b, "tb", now),
            Err(ImportRefused::Expired(..))
        ));
        assert_eq!(i.claim(a, "ta", now), Ok(()));
        assert_eq!(i.claim(a, "ta", now), Err(ImportRefused::Used(a)));
        // Announced again (level-triggered): still used.
        i.announce(2, &[grant(a, "ta", later)], now);
        assert_eq!(i.claim(a, "ta", now), Err(ImportRefused::Used(a)));
        // A new announcement replaces the old one; a withdrawn one is gone.
        i.announce(3, &[grant(a, "ta2", later), grant(c, "tc", later)], now);
        assert_eq!(i.claim(a, "ta2", now), Ok(()));
        i.announce(4, &[], now);
        assert_eq!(i.claim(c, "tc", now), Err(ImportRefused::NotAnnounced(c)));
    }

    #[tokio::test]
    async fn an_import_waits_for_a_healthcheck_started_after_it() {
        let i = std::sync::Arc::new(Imports::default());
        let id = Uuid::new_v4();
        let later = OffsetDateTime::now_utc() + time::Duration::minutes(2);
        // A check in flight when the import arrives does not count...
        let in_flight = i.begin_check();
        let i2 = i.clone();
        let claim = tokio::spawn(async move {
            i2.claim_fresh(id, "tok", || {}, Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        i.announce(in_flight, &[], OffsetDateTime::now_utc());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!claim.is_finished());
        // ...the next one, which announces it, does.
        let next = i.begin_check();
        i.announce(next, &[grant(id, "tok", later)], OffsetDateTime::now_utc());
        assert_eq!(claim.await.unwrap(), Ok(()));
        // Nothing announced: refused once the bound is reached.
        let t0 = std::time::Instant::now();
        let other = Uuid::new_v4();
        assert_eq!(
            i.claim_fresh(other, "x", || {}, Duration::from_millis(200))
                .await,
            Err(ImportRefused::NotAnnounced(other))
        );
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }
}
