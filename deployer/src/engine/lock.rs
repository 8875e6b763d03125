//! The deploy lock of a stack/stage: a lease in the stage's state store.
//!
//! Taken with a write that succeeds only if no lock exists, renewed and
//! released with writes that succeed only if the lock is still ours, so two
//! deploys from two machines can never both hold it. A lock whose lease ran
//! out (its holder crashed) is taken over with the same conditional write, so
//! two would-be successors cannot both win either.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::store::{Condition, Etag, StateStore, StoreError};

/// Object key of the lock in the stage's store.
pub const LOCK_KEY: &str = "lock.json";

/// Lease of a command's lock; renewed every third of it while held.
pub const LEASE: Duration = Duration::from_secs(60);

/// Who holds a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// User name.
    pub user: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// The command line, without arguments that could carry secrets.
    pub command: String,
}

impl Holder {
    /// This process, running `command`.
    pub fn current(command: &str) -> Self {
        Holder {
            user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .ok()
                .filter(|u| !u.is_empty())
                .or_else(|| {
                    nix::unistd::User::from_uid(nix::unistd::getuid())
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                })
                .unwrap_or_else(|| nix::unistd::getuid().to_string()),
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown-host".into()),
            pid: std::process::id(),
            command: command.to_string(),
        }
    }
}

/// The lock document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Unique id of this acquisition.
    pub id: String,
    /// Stack.
    pub stack: String,
    /// Stage.
    pub stage: String,
    /// Holder.
    pub holder: Holder,
    /// When it was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    /// When the lease ends unless renewed.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl LockInfo {
    /// "user@host (pid N, `command`) since T, lease until T2".
    pub fn describe(&self) -> String {
        format!(
            "{}@{} (pid {}, `{}`) since {}, lease until {}",
            self.holder.user,
            self.holder.host,
            self.holder.pid,
            self.holder.command,
            fmt_time(self.acquired_at),
            fmt_time(self.expires_at)
        )
    }

    /// True when the lease ran out, or its holder was on this host and is gone.
    pub fn is_stale(&self, now: OffsetDateTime, this_host: &str) -> bool {
        if now >= self.expires_at {
            return true;
        }
        self.holder.host == this_host
            && self.holder.pid != std::process::id()
            && !pid_alive(self.holder.pid)
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// RFC 3339 without fractions.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Source of the current time (a test clock can move it forward).
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Why a lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds it.
    #[error("stage {stack}/{stage} is locked by {}", .info.describe())]
    Held {
        /// Stack.
        stack: String,
        /// Stage.
        stage: String,
        /// The current lock.
        info: Box<LockInfo>,
    },
    /// The lease was taken over (it expired while we were stalled).
    #[error("lost the deploy lock of {0}: another process took it over after the lease expired")]
    Lost(String),
    /// The store failed.
    #[error("deploy lock store {location}: {source}")]
    Store {
        /// Store location.
        location: String,
        /// Cause.
        source: StoreError,
    },
    /// The lock object is not a lock.
    #[error("deploy lock at {0} is unreadable: {1}; remove it with `boxctl unlock --force`")]
    Corrupt(String, String),
}

/// A held lock.
pub struct Lock {
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    lease: Duration,
    info: Mutex<LockInfo>,
    etag: Mutex<Etag>,
}

fn store_err(store: &dyn StateStore) -> impl Fn(StoreError) -> LockError + '_ {
    move |source| LockError::Store {
        location: store.location(),
        source,
    }
}

/// Read the current lock, if any.
pub async fn read(store: &dyn StateStore) -> Result<Option<(LockInfo, Etag)>, LockError> {
    match store.get(LOCK_KEY).await.map_err(store_err(store))? {
        None => Ok(None),
        Some((body, etag)) => serde_json::from_slice(&body)
            .map(|info| Some((info, etag)))
            .map_err(|e| {
                LockError::Corrupt(format!("{}/{LOCK_KEY}", store.location()), e.to_string())
            }),
    }
}

/// Remove the lock whoever holds it; the removed lock, if there was one.
pub async fn force_unlock(store: &dyn StateStore) -> Result<Option<LockInfo>, LockError> {
    match store.get(LOCK_KEY).await.map_err(store_err(store))? {
        None => Ok(None),
        Some((body, etag)) => {
            store
                .delete(LOCK_KEY, Condition::IfMatch(etag))
                .await
                .map_err(store_err(store))?;
            Ok(serde_json::from_slice(&body).ok())
        }
    }
}

/// Parameters of an acquisition.
pub struct LockRequest<'a> {
    /// Stack.
    pub stack: &'a str,
    /// Stage.
    pub stage: &'a str,
    /// Who asks.
    pub holder: Holder,
    /// Lease length; renewed every third of it.
    pub lease: Duration,
    /// How long to wait for a held lock before giving up (zero: fail at once).
    pub wait: Duration,
}

/// Take the lock, waiting up to `req.wait` for a holder to finish; `on_wait` is
/// called once with the holder when waiting starts.
pub async fn acquire(
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    req: LockRequest<'_>,
    mut on_wait: impl FnMut(&LockInfo),
) -> Result<Lock, LockError> {
    let started = tokio::time::Instant::now();
    let mut announced = false;
    loop {
        let now = clock.now();
        let info = LockInfo {
            id: uuid::Uuid::new_v4().to_string(),
            stack: req.stack.to_string(),
            stage: req.stage.to_string(),
            holder: req.holder.clone(),
            acquired_at: now,
            expires_at: now + req.lease,
        };
        let body = serde_json::to_vec_pretty(&info).expect("lock serializes");
        let attempt = match read(store.as_ref()).await? {
            None => store.put(LOCK_KEY, body, Condition::IfAbsent).await,
            Some((current, etag)) if current.is_stale(now, &req.holder.host) => {
                store.put(LOCK_KEY, body, Condition::IfMatch(etag)).await
            }
            Some((current, _)) => {
                if started.elapsed() >= req.wait {
                    return Err(LockError::Held {
                        stack: req.stack.to_string(),
                        stage: req.stage.to_string(),
                        info: Box::new(current),
                    });
                }
                if !announced {
                    on_wait(&current);
                    announced = true;
                }
                tokio::time::sleep(Duration::from_secs(1).min(req.wait)).await;
                continue;
            }
        };
        match attempt {
            Ok(etag) => {
                return Ok(Lock {
                    store,
                    clock,
                    lease: req.lease,
                    info: Mutex::new(info),
                    etag: Mutex::new(etag),
                });
            }
            // Someone else won the race: look again.
            Err(StoreError::PreconditionFailed) => continue,
            Err(e) => return Err(store_err(store.as_ref())(e)),
        }
    }
}

impl Lock {
    /// The lock document as last written.
    pub fn info(&self) -> LockInfo {
        self.info.lock().expect("lock mutex").clone()
    }

    /// Extend the lease; fails with `Lost` if someone took the lock over.
    pub async fn renew(&self) -> Result<(), LockError> {
        let mut info = self.info();
        info.expires_at = self.clock.now() + self.lease;
        let etag = self.etag.lock().expect("lock mutex").clone();
        let body = serde_json::to_vec_pretty(&info).expect("lock serializes");
        match self
            .store
            .put(LOCK_KEY, body, Condition::IfMatch(etag))
            .await
        {
            Ok(new) => {
                *self.etag.lock().expect("lock mutex") = new;
                *self.info.lock().expect("lock mutex") = info;
                Ok(())
            }
            Err(StoreError::PreconditionFailed) => {
                Err(LockError::Lost(format!("{}/{}", info.stack, info.stage)))
            }
            Err(e) => Err(store_err(self.store.as_ref())(e)),
        }
    }

    /// Give the lock back; a lock taken over in the meantime is left alone.
    pub async fn release(&self) -> Result<(), LockError> {
        let etag = self.etag.lock().expect("lock mutex").clone();
        match self.store.delete(LOCK_KEY, Condition::IfMatch(etag)).await {
            Ok(()) | Err(StoreError::PreconditionFailed) => Ok(()),
            Err(e) => Err(store_err(self.store.as_ref())(e)),
        }
    }

    /// Hold the lock from now until [`Held::release`]: its lease is renewed
    /// in the background; if it is lost, `lost` is cancelled so the holder
    /// stops scheduling work.
    pub fn hold(self, lost: CancellationToken) -> Held {
        let lock = Arc::new(self);
        let stop = CancellationToken::new();
        let renewal = lock.keep_alive(stop.clone(), lost);
        Held {
            lock,
            stop,
            renewal,
        }
    }

    /// Renew the lease every third of its length until `stop` is cancelled; if
    /// the lock is lost, cancel `lost`.
    fn keep_alive(
        self: &Arc<Self>,
        stop: CancellationToken,
        lost: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let lock = Arc::clone(self);
        tokio::spawn(async move {
            let period = lock.lease / 3;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                match lock.renew().await {
                    Ok(()) => {}
                    Err(LockError::Lost(what)) => {
                        tracing::error!("lost the deploy lock of {what}; stopping");
                        lost.cancel();
                        return;
                    }
                    // A store hiccup: the lease still has two thirds left; try again next period.
                    Err(e) => tracing::warn!("could not renew the deploy lock: {e}"),
                }
            }
        })
    }
}

/// A lock whose lease is being renewed, until it is released.
pub struct Held {
    lock: Arc<Lock>,
    stop: CancellationToken,
    renewal: tokio::task::JoinHandle<()>,
}

impl Held {
    /// The lock document as last written.
    pub fn info(&self) -> LockInfo {
        self.lock.info()
    }

    /// Stop renewing and give the lock back.
    pub async fn release(self) -> Result<(), LockError> {
        self.stop.cancel();
        let _ = self.renewal.await;
        self.lock.release().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::store::MemoryStore;

    /// A clock the test moves by hand.
    pub struct ManualClock(pub Mutex<OffsetDateTime>);

    impl Clock for ManualClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock().unwrap()
        }
    }

    fn req(stage: &str, who: &str) -> LockRequest<'static> {
        let stage: &'static str = Box::leak(stage.to_string().into_boxed_str());
        LockRequest {
            stack: "boxlite",
            stage,
            holder: Holder {
                user: who.into(),
                host: "host-a".into(),
                pid: std::process::id(),
                command: "boxctl deploy".into(),
            },
            lease: Duration::from_secs(60),
            wait: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn second_acquirer_is_refused_naming_the_holder() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let first = acquire(store.clone(), clock.clone(), req("dev", "alice"), |_| {})
            .await
            .unwrap();
        let err = acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
            .await
            .err()
            .expect("held");
        let msg = err.to_string();
        assert!(msg.contains("alice@host-a"), "{msg}");
        assert!(msg.contains("boxctl deploy"), "{msg}");
        first.release().await.unwrap();
        acquire(store, clock, req("dev", "bob"), |_| {})
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_old_holder_learns_it_lost() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock = Arc::new(ManualClock(Mutex::new(OffsetDateTime::now_utc())));
        let first = acquire(store.clone(), clock.clone(), req("dev", "alice"), |_| {})
            .await
            .unwrap();
        // Within the lease: refused.
        *clock.0.lock().unwrap() += Duration::from_secs(59);
        assert!(
            acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
                .await
                .is_err()
        );
        // Past it: taken over.
        *clock.0.lock().unwrap() += Duration::from_secs(2);
        let second = acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
            .await
            .unwrap();
        assert_eq!(second.info().holder.user, "bob");
        assert!(matches!(first.renew().await, Err(LockError::Lost(_))));
        // The loser's release leaves the new holder's lock in place.
        first.release().await.unwrap();
        assert_eq!(
            read(store.as_ref()).await.unwrap().unwrap().0.holder.user,
            "bob"
        );
    }

    #[tokio::test]
    async fn renewal_extends_the_lease() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock = Arc::new(ManualClock(Mutex::new(OffsetDateTime::now_utc())));
        let lock = acquire(store.clone(), clock.clone(), req("dev", "alice"), |_| {})
            .await
            .unwrap();
        *clock.0.lock().unwrap() += Duration::from_secs(50);
        lock.renew().await.unwrap();
        *clock.0.lock().unwrap() += Duration::from_secs(50);
        // 100 s after acquiring, but only 50 s after renewal: still held.
        assert!(
            acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_dead_holder_on_this_host_is_stale_at_once() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut r = req("dev", "alice");
        r.holder.host = Holder::current("x").host;
        // A pid that cannot exist.
        r.holder.pid = 0x3fff_fff0;
        acquire(store.clone(), clock.clone(), r, |_| {})
            .await
            .unwrap();
        let mut r2 = req("dev", "bob");
        r2.holder.host = Holder::current("x").host;
        acquire(store, clock, r2, |_| {}).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_acquirer_gets_the_lock_when_it_is_released() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let first = Arc::new(
            acquire(store.clone(), clock.clone(), req("dev", "alice"), |_| {})
                .await
                .unwrap(),
        );
        let f2 = first.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            f2.release().await.unwrap();
        });
        let mut r = req("dev", "bob");
        r.wait = Duration::from_secs(30);
        let mut waited_for = None;
        let second = acquire(store, clock, r, |i| {
            waited_for = Some(i.holder.user.clone())
        })
        .await
        .unwrap();
        assert_eq!(waited_for.as_deref(), Some("alice"));
        assert_eq!(second.info().holder.user, "bob");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lock_outlives_its_first_lease_and_tells_when_it_is_lost() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let t0 = OffsetDateTime::now_utc();
        let manual = Arc::new(ManualClock(Mutex::new(t0)));
        let clock: Arc<dyn Clock> = manual.clone();
        let set = |secs: i64| *manual.0.lock().unwrap() = t0 + time::Duration::seconds(secs);
        let lost = CancellationToken::new();
        let held = acquire(store.clone(), clock.clone(), req("dev", "alice"), |_| {})
            .await
            .unwrap()
            .hold(lost.clone());
        // A renewal (every 20 s) at 50 s carries the lease past 60 s.
        set(50);
        tokio::time::sleep(Duration::from_secs(21)).await;
        set(90);
        let err = acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
            .await
            .err()
            .expect("still held at 90 s");
        assert!(err.to_string().contains("alice"), "{err}");
        assert!(!lost.is_cancelled());
        // Once the lease runs out for real, bob takes it over and alice learns it.
        set(200);
        let bob = acquire(store.clone(), clock.clone(), req("dev", "bob"), |_| {})
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(lost.is_cancelled());
        held.release().await.unwrap();
        let (now, _) = read(store.as_ref())
            .await
            .unwrap()
            .expect("bob's lock stays");
        assert_eq!(now.holder.user, "bob");
        assert_eq!(bob.info().holder.user, "bob");
    }
}
