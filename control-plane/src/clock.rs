//! Time as the control plane sees it: the system clock, or a manual clock
//! that tests move forward (runner unresponsiveness without sleeping).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, the unit stored in the database.
pub type Millis = i64;

/// A source of "now".
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// A clock that stays at `start` until [`Clock::advance`] or [`Clock::set`].
    pub fn manual(start: OffsetDateTime) -> Self {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(to_millis(start)))),
        }
    }

    /// Now, in milliseconds since the epoch.
    pub fn now_ms(&self) -> Millis {
        match &self.manual {
            Some(m) => m.load(Ordering::SeqCst),
            None => to_millis(OffsetDateTime::now_utc()),
        }
    }

    /// Now.
    pub fn now(&self) -> OffsetDateTime {
        from_millis(self.now_ms())
    }

    /// Move a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
        }
    }

    /// Set a manual clock (no effect on the system clock).
    pub fn set(&self, at: OffsetDateTime) {
        if let Some(m) = &self.manual {
            m.store(to_millis(at), Ordering::SeqCst);
        }
    }
}

/// Milliseconds since the epoch of `t`.
pub fn to_millis(t: OffsetDateTime) -> Millis {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The time `ms` milliseconds after the epoch (clamped to the representable range).
pub fn from_millis(ms: Millis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = time::macros::datetime!(2030-01-01 00:00 UTC);
        let c = Clock::manual(start);
        assert_eq!(c.now(), start);
        c.advance(Duration::from_secs(61));
        assert_eq!(c.now(), start + Duration::from_secs(61));
        assert_eq!(from_millis(to_millis(start)), start);
    }
}
