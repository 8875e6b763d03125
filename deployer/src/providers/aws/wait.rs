//! Bounded waits for AWS to settle (a NAT gateway becoming available, a
//! database getting its endpoint, a certificate being issued): polled with
//! growing intervals, progress reported on standard error, and a hard error
//! naming what was awaited when the time runs out. Never unbounded.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use stack::ResourceId;

use crate::engine::provider::ProviderError;
use crate::render::human_duration;

/// One look at the thing awaited.
pub enum Poll<T> {
    /// Done, with its result.
    Ready(T),
    /// Not yet; the state seen, for progress lines.
    Pending(String),
}

/// How long to wait and how often to look.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Give up after this long.
    pub timeout: Duration,
    /// First interval between looks (doubles up to `max_interval`).
    pub first_interval: Duration,
    /// Longest interval between looks.
    pub max_interval: Duration,
    /// Print a progress line at most this often.
    pub report_every: Duration,
}

impl Bounds {
    /// Wait up to `timeout`, looking every 1 s at first and every 15 s at most.
    pub fn up_to(timeout: Duration) -> Bounds {
        Bounds {
            timeout,
            first_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(15),
            report_every: Duration::from_secs(30),
        }
    }
}

/// Call `look` until it is ready, fails hard, or `bounds.timeout` passes.
/// Retryable errors count as "not yet". `what` reads like "NAT gateway to be
/// available"; `hint` says what to do after a timeout.
pub async fn until<T, F, Fut>(
    id: &ResourceId,
    op: &str,
    what: &str,
    bounds: Bounds,
    hint: &str,
    mut look: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, ProviderError>>,
{
    let started = Instant::now();
    let mut interval = bounds.first_interval;
    let mut last_report = Instant::now();
    loop {
        let state = match look().await {
            Ok(Poll::Ready(v)) => return Ok(v),
            Ok(Poll::Pending(s)) => s,
            Err(e) if e.is_retryable() => format!("retrying after: {}", e.message),
            Err(e) => return Err(e),
        };
        let elapsed = started.elapsed();
        if elapsed >= bounds.timeout {
            return Err(ProviderError::hard(
                op,
                format!(
                    "{id}: gave up after {} waiting for {what} (last state: {state})",
                    human_duration(elapsed)
                ),
            )
            .with_hint(hint));
        }
        if last_report.elapsed() >= bounds.report_every {
            eprintln!(
                "      wait  {id}: {what}: {state} ({} of at most {})",
                human_duration(elapsed),
                human_duration(bounds.timeout)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(interval.min(bounds.timeout.saturating_sub(elapsed))).await;
        interval = (interval * 2).min(bounds.max_interval);
    }
}

/// Repeat a delete while AWS answers that something still uses the resource
/// (a load balancer's interfaces leaving a subnet, a NAT gateway holding its
/// address): such answers are retryable, and are retried here for at most
/// `timeout` before the error is reported.
pub async fn while_in_use<F, Fut>(
    id: &ResourceId,
    op: &str,
    timeout: Duration,
    mut call: F,
) -> Result<(), ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), ProviderError>>,
{
    until(
        id,
        op,
        "what still uses it to let go",
        Bounds::up_to(timeout),
        "find what still uses it in the console (network interfaces, instances, load balancers) and remove it, then run the command again",
        || {
            let f = call();
            async move { f.await.map(Poll::Ready) }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ready_after_a_few_looks() {
        let id = ResourceId::from("nat/a");
        let mut n = 0;
        let v = until(
            &id,
            "DescribeNatGateways",
            "x",
            Bounds::up_to(Duration::from_secs(60)),
            "h",
            || {
                n += 1;
                let k = n;
                async move {
                    Ok(if k < 3 {
                        Poll::Pending("pending".into())
                    } else {
                        Poll::Ready(k)
                    })
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_timeout_naming_what_it_awaited() {
        let id = ResourceId::from("certvalidation/api");
        let e = until::<(), _, _>(
            &id,
            "DescribeCertificate",
            "the certificate to be issued",
            Bounds::up_to(Duration::from_secs(120)),
            "publish the validation records",
            || async { Ok(Poll::Pending("PENDING_VALIDATION".into())) },
        )
        .await
        .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.message.contains("certvalidation/api"), "{}", e.message);
        assert!(e.message.contains("PENDING_VALIDATION"), "{}", e.message);
        assert_eq!(e.hint.as_deref(), Some("publish the validation records"));
    }
}
