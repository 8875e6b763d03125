//! Apply: walk the plan's dependency DAG with bounded parallelism, retry what
//! may succeed later, stop scheduling at the first hard failure (or on
//! cancellation) while in-flight steps finish, and journal every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use stack::{DesiredGraph, Resource, ResourceId, Value};
use tokio_util::sync::CancellationToken;

use super::journal::{ApplyStatus, Journal, StepStatus};
use super::plan::{Action, Change, Mode, Plan, resolve_refs};
use super::provider::{Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx};

/// Retry schedule for retryable errors: exponential backoff with full jitter.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Delay cap of the first retry.
    pub base: Duration,
    /// Largest delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(250),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (attempt counts from 1): uniform in
    /// [0, min(max_delay, base * 2^(attempt-1))].
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max_delay);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// Apply settings.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Steps running at once.
    pub parallelism: usize,
    /// Retry schedule.
    pub retry: RetryPolicy,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            parallelism: 10,
            retry: RetryPolicy::default(),
        }
    }
}

/// A step as progress output sees it.
#[derive(Clone, Debug)]
pub struct StepView {
    /// Resource.
    pub id: ResourceId,
    /// Kind.
    pub kind: String,
    /// Action.
    pub action: Action,
    /// 1-based position in start order.
    pub number: usize,
    /// Steps in all.
    pub total: usize,
}

/// Receives progress while an apply runs.
pub trait Progress: Sync {
    /// A step started.
    fn started(&self, _step: &StepView) {}
    /// A step will be tried again after `delay`.
    fn retrying(&self, _step: &StepView, _attempt: u32, _error: &ProviderError, _delay: Duration) {}
    /// A step ended.
    fn finished(&self, _step: &StepView, _result: &Result<(), ProviderError>, _elapsed: Duration) {}
    /// Scheduling stopped (first failure or cancellation); in-flight steps finish.
    fn stopping(&self, _why: &str, _in_flight: usize) {}
}

/// Progress that reports nothing.
pub struct Quiet;

impl Progress for Quiet {}

/// What an apply did.
#[derive(Debug)]
pub struct ApplyReport {
    /// Overall outcome.
    pub status: ApplyStatus,
    /// Steps that succeeded.
    pub succeeded: Vec<ResourceId>,
    /// Steps that failed, with why.
    pub failed: Vec<(ResourceId, Action, ProviderError)>,
    /// Steps never started.
    pub skipped: Vec<(ResourceId, Action)>,
    /// Stage outputs after the apply, where known.
    pub outputs: BTreeMap<String, Value>,
    /// Outputs of every resource after the apply.
    pub resource_outputs: BTreeMap<ResourceId, BTreeMap<String, Value>>,
}

struct Step<'p> {
    /// The change this step applies; `None` for a barrier, which only orders
    /// other steps and completes at once.
    change: Option<&'p Change>,
    deps: Vec<usize>,
}

/// Build the step DAG of a plan. Creates, updates and replacements follow the
/// graph. Deletes wait for all of those (a declared resource may still have
/// pointed at an undeclared one), then go by kind order, highest first, and
/// within a kind, dependents first. Barriers keep the edge count linear.
fn steps<'p>(plan: &'p Plan, kinds: &[KindSpec]) -> Vec<Step<'p>> {
    let order = |kind: &str| kinds.iter().find(|k| k.kind == kind).map_or(0, |k| k.order);
    let mut out: Vec<Step<'p>> = Vec::new();
    let mut index: BTreeMap<&ResourceId, usize> = BTreeMap::new();
    for c in plan
        .changes
        .iter()
        .filter(|c| matches!(c.action, Action::Create | Action::Update | Action::Replace))
    {
        index.insert(&c.id, out.len());
        out.push(Step {
            change: Some(c),
            deps: Vec::new(),
        });
    }
    for s in &mut out {
        let id = &s.change.expect("converge step").id;
        if let Some(deps) = plan.deps.get(id) {
            s.deps = deps.iter().filter_map(|d| index.get(d).copied()).collect();
        }
    }

    let mut buckets: BTreeMap<u32, Vec<&Change>> = BTreeMap::new();
    for c in plan.changes.iter().filter(|c| c.action == Action::Delete) {
        buckets.entry(order(&c.kind)).or_default().push(c);
    }
    if buckets.is_empty() {
        return out;
    }
    let mut previous_barrier = (plan.mode == Mode::Deploy && !out.is_empty()).then(|| {
        out.push(Step {
            change: None,
            deps: (0..out.len()).collect(),
        });
        out.len() - 1
    });
    // Who depends on whom, among declared resources.
    let mut dependents_of: BTreeMap<&ResourceId, Vec<&ResourceId>> = BTreeMap::new();
    for (id, deps) in &plan.deps {
        for d in deps {
            dependents_of.entry(d).or_default().push(id);
        }
    }
    for bucket in buckets.values().rev() {
        let first = out.len();
        let mut in_bucket: BTreeMap<&ResourceId, usize> = BTreeMap::new();
        for c in bucket {
            in_bucket.insert(&c.id, out.len());
            out.push(Step {
                change: Some(c),
                deps: previous_barrier.into_iter().collect(),
            });
        }
        for step in &mut out[first..] {
            let id = &step.change.expect("delete step").id;
            let extra: Vec<usize> = dependents_of
                .get(id)
                .into_iter()
                .flatten()
                .filter(|d| **d != id)
                .filter_map(|d| in_bucket.get(d).copied())
                .collect();
            step.deps.extend(extra);
        }
        out.push(Step {
            change: None,
            deps: (first..out.len()).collect(),
        });
        previous_barrier = Some(out.len() - 1);
    }
    out
}

type StepFuture<'a> =
    Pin<Box<dyn Future<Output = (usize, Result<Option<Observed>, ProviderError>, u32)> + 'a>>;

/// Run `plan` against `provider`. `inventory` is what the plan was made from.
#[allow(clippy::too_many_arguments)]
pub async fn apply<P: Provider>(
    provider: &P,
    graph: &DesiredGraph,
    plan: &Plan,
    inventory: &Inventory,
    journal: Option<&Journal>,
    opts: &ApplyOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> ApplyReport {
    let kinds = provider.kinds();
    let steps = steps(plan, kinds);
    let total = steps.iter().filter(|s| s.change.is_some()).count();
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.deps.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for &d in &s.deps {
            dependents[d].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..steps.len()).filter(|&i| waiting[i] == 0).collect();
    let mut outputs: BTreeMap<ResourceId, BTreeMap<String, Value>> = inventory
        .resources
        .values()
        .map(|o| (o.id.clone(), o.outputs.clone()))
        .collect();
    let mut in_flight: FuturesUnordered<StepFuture<'_>> = FuturesUnordered::new();
    let mut views: BTreeMap<usize, (StepView, Instant)> = BTreeMap::new();
    let mut launched: BTreeSet<usize> = BTreeSet::new();
    let mut report = ApplyReport {
        status: ApplyStatus::Succeeded,
        succeeded: Vec::new(),
        failed: Vec::new(),
        skipped: Vec::new(),
        outputs: BTreeMap::new(),
        resource_outputs: BTreeMap::new(),
    };
    let mut stopping = false;
    let parallelism = opts.parallelism.max(1);
    let mut started = 0usize;

    loop {
        while !stopping && in_flight.len() < parallelism {
            let Some(i) = ready.pop_front() else { break };
            launched.insert(i);
            let Some(change) = steps[i].change else {
                // A barrier completes at once and releases what waits on it.
                for &d in &dependents[i] {
                    waiting[d] -= 1;
                    if waiting[d] == 0 {
                        ready.push_back(d);
                    }
                }
                continue;
            };
            started += 1;
            let view = StepView {
                id: change.id.clone(),
                kind: change.kind.clone(),
                action: change.action,
                number: started,
                total,
            };
            progress.started(&view);
            if let Some(j) = journal {
                j.step_started(change.id.as_str(), change.action).await;
            }
            let resolved = match resolve_desired(change, &outputs) {
                Ok(r) => r,
                Err(e) => {
                    in_flight.push(Box::pin(async move { (i, Err(e), 0) }));
                    views.insert(i, (view, Instant::now()));
                    continue;
                }
            };
            let ctx = StepCtx {
                stack: plan.stack.clone(),
                stage: plan.stage.clone(),
                generation: change.observed.as_ref().map_or(0, |o| o.generation),
                attempt: 1,
            };
            let spec = provider.kind_spec(&change.kind).cloned();
            in_flight.push(Box::pin(run_step(
                provider,
                i,
                change,
                resolved,
                ctx,
                spec,
                opts.retry.clone(),
                progress,
                view.clone(),
                cancel.clone(),
            )));
            views.insert(i, (view, Instant::now()));
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some((i, result, attempts)) = in_flight.next() => {
                let (view, t0) = views.remove(&i).expect("launched step has a view");
                let change = steps[i].change.expect("only changes are launched");
                let unit = result.as_ref().map(|_| ()).map_err(Clone::clone);
                progress.finished(&view, &unit, t0.elapsed());
                match result {
                    Ok(observed) => {
                        if let Some(j) = journal {
                            j.step_finished(change.id.as_str(), StepStatus::Succeeded, attempts, None).await;
                        }
                        match observed {
                            Some(o) => { outputs.insert(o.id.clone(), o.outputs); }
                            // A deleted duplicate shares its id with a declared
                            // resource whose outputs stay.
                            None if !graph.resources.contains_key(&change.id) => { outputs.remove(&change.id); }
                            None => {}
                        }
                        report.succeeded.push(change.id.clone());
                        for &d in &dependents[i] {
                            waiting[d] -= 1;
                            if waiting[d] == 0 {
                                ready.push_back(d);
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(j) = journal {
                            j.step_finished(change.id.as_str(), StepStatus::Failed, attempts, Some(e.to_string())).await;
                        }
                        report.failed.push((change.id.clone(), change.action, e));
                        if !stopping {
                            stopping = true;
                            progress.stopping("a step failed", in_flight.len());
                        }
                    }
                }
            }
            _ = cancel.cancelled(), if !stopping => {
                stopping = true;
                report.status = ApplyStatus::Interrupted;
                progress.stopping("interrupted", in_flight.len());
            }
        }
    }

    for (i, s) in steps.iter().enumerate() {
        if let Some(c) = s.change
            && !launched.contains(&i)
        {
            report.skipped.push((c.id.clone(), c.action));
        }
    }
    if let Some(j) = journal {
        let skipped: Vec<(String, Action)> = report
            .skipped
            .iter()
            .map(|(id, a)| (id.to_string(), *a))
            .collect();
        j.steps_skipped(&skipped);
    }
    if report.failed.is_empty() && !cancel.is_cancelled() && !report.skipped.is_empty() {
        // Nothing failed and nobody stopped us, yet steps never became ready:
        // their dependencies form a cycle. That is a failure, not a success.
        let (id, action) = report.skipped[0].clone();
        let stuck: Vec<String> = report
            .skipped
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        report.failed.push((
            id,
            action,
            ProviderError::hard(
                "schedule",
                format!(
                    "steps never became ready (a dependency cycle): {}",
                    stuck.join(", ")
                ),
            ),
        ));
    }
    if !report.failed.is_empty() {
        report.status = ApplyStatus::Failed;
    } else if cancel.is_cancelled() {
        report.status = ApplyStatus::Interrupted;
    }
    report.outputs = graph
        .outputs
        .iter()
        .filter_map(|(k, v)| {
            resolve_refs(v, &|r: &stack::Ref| {
                outputs.get(&r.id).and_then(|o| o.get(&r.output)).cloned()
            })
            .ok()
            .map(|v| (k.clone(), v))
        })
        .collect();
    report.resource_outputs = outputs;
    report
}

fn resolve_desired(
    change: &Change,
    outputs: &BTreeMap<ResourceId, BTreeMap<String, Value>>,
) -> Result<Option<Resource>, ProviderError> {
    let Some(desired) = &change.desired else {
        return Ok(None);
    };
    let lookup = |r: &stack::Ref| outputs.get(&r.id).and_then(|o| o.get(&r.output)).cloned();
    let mut resolved = desired.clone();
    for (k, v) in &desired.props {
        let value = resolve_refs(v, &lookup).map_err(|r| {
            ProviderError::hard(
                "resolve",
                format!(
                    "{}.{k} refers to {r}, which has no value (its resource did not report it)",
                    desired.id
                ),
            )
        })?;
        resolved.props.insert(k.clone(), value);
    }
    Ok(Some(resolved))
}

/// Call `op` until it succeeds, fails hard, runs out of attempts, or the apply
/// is cancelled during a backoff; returns the result and attempts made.
async fn with_retries<T>(
    retry: &RetryPolicy,
    progress: &dyn Progress,
    view: &StepView,
    cancel: &CancellationToken,
    attempts: &mut u32,
    mut op: impl AsyncFnMut(u32) -> Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    loop {
        *attempts += 1;
        match op(*attempts).await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.is_retryable() && *attempts < retry.max_attempts && !cancel.is_cancelled() =>
            {
                let delay = retry.delay(*attempts);
                progress.retrying(view, *attempts, &e, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_step<P: Provider>(
    provider: &P,
    index: usize,
    change: &Change,
    desired: Option<Resource>,
    ctx: StepCtx,
    spec: Option<KindSpec>,
    retry: RetryPolicy,
    progress: &dyn Progress,
    view: StepView,
    cancel: CancellationToken,
) -> (usize, Result<Option<Observed>, ProviderError>, u32) {
    let mut attempts = 0u32;
    let at = |attempt: u32| StepCtx {
        attempt,
        ..ctx.clone()
    };
    let result = match change.action {
        Action::Create => {
            let d = desired.expect("create has a desired resource");
            with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                provider.create(&at(a), &d).await
            })
            .await
            .map(Some)
        }
        Action::Update => {
            let d = desired.expect("update has a desired resource");
            let o = change
                .observed
                .as_ref()
                .expect("update has an observed resource");
            let changed: Vec<String> = change
                .fields
                .iter()
                .filter(|f| !f.ignored)
                .map(|f| f.name.clone())
                .collect();
            with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                provider.update(&at(a), &d, o, &changed).await
            })
            .await
            .map(Some)
        }
        Action::Replace => {
            let d = desired.expect("replace has a desired resource");
            let o = change
                .observed
                .as_ref()
                .expect("replace has an observed resource");
            let next = StepCtx {
                generation: o.generation + 1,
                ..ctx.clone()
            };
            let next_at = |attempt: u32| StepCtx {
                attempt,
                ..next.clone()
            };
            let before = spec.as_ref().is_some_and(|s| s.create_before_delete);
            if before {
                match with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                    provider.create(&next_at(a), &d).await
                })
                .await
                {
                    Ok(new) => {
                        with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                            provider.delete(&at(a), o).await
                        })
                        .await
                        .map(|()| Some(new))
                    }
                    Err(e) => Err(e),
                }
            } else {
                match with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                    provider.delete(&at(a), o).await
                })
                .await
                {
                    Ok(()) => {
                        with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                            provider.create(&next_at(a), &d).await
                        })
                        .await
                        .map(Some)
                    }
                    Err(e) => Err(e),
                }
            }
        }
        Action::Delete => {
            let o = change
                .observed
                .as_ref()
                .expect("delete has an observed resource");
            with_retries(&retry, progress, &view, &cancel, &mut attempts, async |a| {
                provider.delete(&at(a), o).await
            })
            .await
            .map(|()| None)
        }
        Action::Unchanged | Action::IgnoredDrift | Action::Retain => Ok(None),
    };
    (index, result, attempts)
}
