//! Engine unit tests with an in-memory provider: classification, policies,
//! ordering, the parallelism bound, retries, failures, cancellation, and a
//! crash after every single mutation followed by a converging rerun.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stack::{DesiredGraph, Policy, Props, Resource, ResourceId, Target, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::apply::{ApplyOptions, Quiet, RetryPolicy, apply};
use super::journal::{ApplyStatus, Journal, StepStatus};
use super::lock::Holder;
use super::plan::{Action, Mode, plan};
use super::provider::{
    ErrorClass, Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx,
};
use super::store::{MemoryStore, StateStore};

#[derive(Clone, Debug, PartialEq)]
struct Thing {
    uid: u64,
    id: ResourceId,
    kind: String,
    props: Props,
    policy: Policy,
    generation: u64,
}

/// The fake world and its fault injection.
#[derive(Default)]
struct World {
    things: Mutex<Vec<Thing>>,
    next_uid: AtomicUsize,
    calls: Mutex<Vec<String>>,
    /// Remaining failures per id, and their class.
    failures: Mutex<BTreeMap<String, (u32, ErrorClass)>>,
    /// Delay per operation.
    delay: Mutex<Duration>,
    /// Per-id delay overrides.
    slow: Mutex<BTreeMap<String, Duration>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    mutations: AtomicUsize,
    /// Crash right after this many mutations.
    crash_after: Mutex<Option<usize>>,
    crashed: Notify,
}

const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: "mem.net",
        replace_on: &["cidr"],
        order: 10,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: "mem.host",
        replace_on: &["zone"],
        order: 20,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: "mem.app",
        replace_on: &[],
        order: 30,
        create_before_delete: true,
        volatile_outputs: &[],
    },
];

struct Mem(Arc<World>);

impl Mem {
    async fn enter(&self, what: &str, id: &ResourceId) -> Result<(), ProviderError> {
        self.0.calls.lock().unwrap().push(format!("{what} {id}"));
        let now = self.0.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.max_running.fetch_max(now, Ordering::SeqCst);
        let delay = self
            .0
            .slow
            .lock()
            .unwrap()
            .get(id.as_str())
            .copied()
            .unwrap_or(*self.0.delay.lock().unwrap());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        let mut failures = self.0.failures.lock().unwrap();
        if let Some((left, class)) = failures.get_mut(id.as_str())
            && *left > 0
        {
            *left -= 1;
            return Err(ProviderError {
                class: *class,
                operation: what.to_string(),
                message: "injected".into(),
                hint: None,
            });
        }
        Ok(())
    }

    /// Count a mutation; at the crash point, never return (the test drops the apply).
    async fn mutated(&self) {
        let n = self.0.mutations.fetch_add(1, Ordering::SeqCst) + 1;
        if *self.0.crash_after.lock().unwrap() == Some(n) {
            self.0.crashed.notify_one();
            std::future::pending::<()>().await;
        }
    }

    fn observed(t: &Thing) -> Observed {
        let mut o = Observed::new(t.id.clone(), &t.kind, t.props.clone());
        o.outputs
            .insert("uid".into(), Value::str(format!("u-{}", t.uid)));
        o.policy = t.policy.clone();
        o.generation = t.generation;
        o.handle = Some(format!("u-{}", t.uid));
        o
    }
}

impl Provider for Mem {
    fn kinds(&self) -> &[KindSpec] {
        KINDS
    }

    async fn observe(&self) -> Result<Inventory, ProviderError> {
        let mut inv = Inventory::default();
        for t in self.0.things.lock().unwrap().iter() {
            inv.add(Self::observed(t));
        }
        Ok(inv)
    }

    async fn create(&self, ctx: &StepCtx, d: &Resource) -> Result<Observed, ProviderError> {
        self.enter("create", &d.id).await?;
        assert!(
            d.props.values().all(Value::is_resolved),
            "references are resolved before create"
        );
        let uid = self.0.next_uid.fetch_add(1, Ordering::SeqCst) as u64 + 1;
        let t = Thing {
            uid,
            id: d.id.clone(),
            kind: d.kind.clone(),
            props: d.props.clone(),
            policy: d.policy.clone(),
            generation: ctx.generation,
        };
        self.0.things.lock().unwrap().push(t.clone());
        self.mutated().await;
        Ok(Self::observed(&t))
    }

    async fn update(
        &self,
        _ctx: &StepCtx,
        d: &Resource,
        cur: &Observed,
        _changed: &[String],
    ) -> Result<Observed, ProviderError> {
        self.enter("update", &d.id).await?;
        let updated = {
            let mut things = self.0.things.lock().unwrap();
            let t = things
                .iter_mut()
                .find(|t| Some(format!("u-{}", t.uid)) == cur.handle)
                .ok_or_else(|| ProviderError::hard("update", "gone"))?;
            t.props = d.props.clone();
            t.policy = d.policy.clone();
            t.clone()
        };
        self.mutated().await;
        Ok(Self::observed(&updated))
    }

    async fn delete(&self, _ctx: &StepCtx, cur: &Observed) -> Result<(), ProviderError> {
        self.enter("delete", &cur.id).await?;
        let removed = {
            let mut things = self.0.things.lock().unwrap();
            let before = things.len();
            things.retain(|t| Some(format!("u-{}", t.uid)) != cur.handle);
            before != things.len()
        };
        if removed {
            self.mutated().await;
        }
        Ok(())
    }
}

fn graph(resources: Vec<Resource>) -> DesiredGraph {
    let mut g = DesiredGraph::new("test", "dev", Target::Local);
    for r in resources {
        g.add(r).unwrap();
    }
    g.check().unwrap();
    g
}

/// A small stage: a network, two hosts on it, an app per host, a protected host.
fn stage() -> DesiredGraph {
    graph(vec![
        Resource::new("net/main", "mem.net").prop("cidr", "10.0.0.0/16"),
        Resource::new("host/a", "mem.host")
            .prop("zone", "a")
            .prop("net", Value::reference("net/main", "uid"))
            .prop("size", "small"),
        Resource::new("host/b", "mem.host")
            .prop("zone", "b")
            .prop("net", Value::reference("net/main", "uid"))
            .prop("size", "small"),
        Resource::new("app/a", "mem.app")
            .prop("host", Value::reference("host/a", "uid"))
            .prop("config", "line 1\nline 2\n"),
        Resource::new("app/b", "mem.app").prop("host", Value::reference("host/b", "uid")),
        Resource::new("runner/runner-1", "mem.host")
            .prop("zone", "a")
            .prop("ami", "ami-1")
            .protect()
            .ignore_changes(&["ami"]),
    ])
}

fn opts(parallelism: usize) -> ApplyOptions {
    ApplyOptions {
        parallelism,
        retry: RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        },
    }
}

async fn deploy(
    world: &Arc<World>,
    g: &DesiredGraph,
    parallelism: usize,
) -> super::apply::ApplyReport {
    let p = Mem(world.clone());
    let inv = p.observe().await.unwrap();
    let pl = plan(g, &inv, KINDS, Mode::Deploy);
    assert!(pl.errors.is_empty(), "{:?}", pl.errors);
    apply(
        &p,
        g,
        &pl,
        &inv,
        None,
        &opts(parallelism),
        &Quiet,
        &CancellationToken::new(),
    )
    .await
}

/// The world holds exactly the graph: one thing per id, same kind and props
/// (with references resolved), nothing else.
fn assert_converged(world: &World, g: &DesiredGraph) {
    let things = world.things.lock().unwrap().clone();
    let mut ids: Vec<&str> = things.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    let expected: Vec<&str> = g.resources.keys().map(ResourceId::as_str).collect();
    assert_eq!(ids, expected, "exactly the declared resources, none twice");
    let uid_of = |id: &str| {
        things
            .iter()
            .find(|t| t.id.as_str() == id)
            .map(|t| format!("u-{}", t.uid))
    };
    for t in &things {
        let d = &g.resources[&t.id];
        assert_eq!(t.kind, d.kind);
        for (k, v) in &d.props {
            let expect = match v {
                Value::Ref(r) => Value::str(uid_of(r.id.as_str()).unwrap()),
                other => other.clone(),
            };
            assert_eq!(t.props.get(k), Some(&expect), "{}.{k}", t.id);
        }
    }
}

#[tokio::test]
async fn plan_classifies_every_resource_with_field_level_reasons() {
    let world = Arc::new(World::default());
    let g = stage();
    assert_eq!(deploy(&world, &g, 10).await.status, ApplyStatus::Succeeded);

    let mut changed = g.clone();
    let set = |g: &mut DesiredGraph, id: &str, k: &str, v: &str| {
        g.resources
            .get_mut(&ResourceId::from(id))
            .unwrap()
            .props
            .insert(k.into(), Value::str(v));
    };
    set(&mut changed, "host/a", "size", "large"); // in place
    set(&mut changed, "host/b", "zone", "c"); // forces replacement
    set(&mut changed, "runner/runner-1", "ami", "ami-2"); // ignored drift
    changed.resources.remove(&ResourceId::from("app/a"));
    changed
        .add(Resource::new("app/c", "mem.app").prop("host", Value::reference("host/b", "uid")))
        .unwrap();

    let inv = Mem(world.clone()).observe().await.unwrap();
    let p = plan(&changed, &inv, KINDS, Mode::Deploy);
    let action = |id: &str| p.changes.iter().find(|c| c.id.as_str() == id).unwrap();
    assert_eq!(action("host/a").action, Action::Update);
    assert_eq!(action("host/a").fields.len(), 1);
    assert_eq!(action("host/a").fields[0].old, Some(Value::str("small")));
    assert_eq!(action("host/a").fields[0].new, Some(Value::str("large")));
    assert_eq!(action("host/b").action, Action::Replace);
    assert!(
        action("host/b")
            .fields
            .iter()
            .any(|f| f.name == "zone" && f.forces_replace)
    );
    // app/b points at host/b, which is replaced: its reference is unknown until apply.
    assert_eq!(action("app/b").action, Action::Update);
    assert!(action("app/b").fields[0].known_after_apply);
    assert_eq!(action("runner/runner-1").action, Action::IgnoredDrift);
    assert!(action("runner/runner-1").fields[0].ignored);
    assert_eq!(action("app/a").action, Action::Delete);
    assert_eq!(action("app/c").action, Action::Create);
    assert_eq!(action("net/main").action, Action::Unchanged);
    assert_eq!(
        (
            p.summary.create,
            p.summary.update,
            p.summary.replace,
            p.summary.delete,
            p.summary.unchanged,
            p.summary.ignored_drift
        ),
        (1, 2, 1, 1, 1, 1)
    );
    assert!(p.errors.is_empty());

    let report = apply(
        &Mem(world.clone()),
        &changed,
        &p,
        &inv,
        None,
        &opts(4),
        &Quiet,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    // The ignored drift was not acted on: the runner keeps its old AMI.
    let runner = world
        .things
        .lock()
        .unwrap()
        .iter()
        .find(|t| t.id.as_str() == "runner/runner-1")
        .cloned()
        .unwrap();
    assert_eq!(runner.props["ami"], Value::str("ami-1"));
    world.things.lock().unwrap().iter_mut().for_each(|t| {
        if t.id.as_str() == "runner/runner-1" {
            t.props.insert("ami".into(), Value::str("ami-2"));
        }
    });
    assert_converged(&world, &changed);
    let again = plan(
        &changed,
        &Mem(world.clone()).observe().await.unwrap(),
        KINDS,
        Mode::Deploy,
    );
    assert!(
        !again.has_changes(),
        "a second plan is empty: {:?}",
        again.summary
    );
}

#[tokio::test]
async fn protected_resources_are_never_replaced_or_deleted_by_deploy() {
    let world = Arc::new(World::default());
    let g = stage();
    deploy(&world, &g, 10).await;
    let inv = Mem(world.clone()).observe().await.unwrap();

    let mut replace = g.clone();
    replace
        .resources
        .get_mut(&ResourceId::from("runner/runner-1"))
        .unwrap()
        .props
        .insert("zone".into(), Value::str("b"));
    let p = plan(&replace, &inv, KINDS, Mode::Deploy);
    assert_eq!(p.errors.len(), 1);
    assert!(
        p.errors[0]
            .message
            .contains("runner/runner-1 is protected and would be replaced"),
        "{}",
        p.errors[0].message
    );
    assert!(
        p.errors[0]
            .hint
            .contains("boxctl decommission runner-1 --stage dev"),
        "{}",
        p.errors[0].hint
    );

    // Protection is read from the world too: removing the declaration does not lift it.
    let mut removed = g.clone();
    removed
        .resources
        .remove(&ResourceId::from("runner/runner-1"));
    let p = plan(&removed, &inv, KINDS, Mode::Deploy);
    assert_eq!(p.errors.len(), 1);
    assert!(
        p.errors[0].message.contains("no longer declared"),
        "{}",
        p.errors[0].message
    );
    assert!(p.errors[0].hint.contains("boxctl decommission runner-1"));
}

#[tokio::test]
async fn destroy_keeps_what_a_retained_resource_depends_on() {
    let world = Arc::new(World::default());
    let mut g = stage();
    g.resources
        .get_mut(&ResourceId::from("app/a"))
        .unwrap()
        .policy
        .retain = true;
    deploy(&world, &g, 10).await;
    let inv = Mem(world.clone()).observe().await.unwrap();
    let p = plan(&g, &inv, KINDS, Mode::Destroy);
    let of = |id: &str| {
        p.changes
            .iter()
            .find(|c| c.id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} not in plan"))
    };
    // app/a stands on host/a, which stands on net/main: all three stay.
    assert_eq!(of("app/a").action, Action::Retain);
    assert_eq!(of("host/a").action, Action::Retain);
    assert_eq!(of("host/a").reason.as_deref(), Some("app/a depends on it"));
    assert_eq!(of("net/main").action, Action::Retain);
    for gone in ["app/b", "host/b", "runner/runner-1"] {
        assert_eq!(of(gone).action, Action::Delete, "{gone}");
    }
}

#[tokio::test]
async fn destroy_deletes_dependents_first_and_keeps_retained_resources() {
    let world = Arc::new(World::default());
    let mut g = stage();
    g.resources
        .get_mut(&ResourceId::from("net/main"))
        .unwrap()
        .policy
        .retain = true;
    deploy(&world, &g, 10).await;
    let p_ = Mem(world.clone());
    let inv = p_.observe().await.unwrap();
    let p = plan(&g, &inv, KINDS, Mode::Destroy);
    let retained: Vec<&str> = p
        .changes
        .iter()
        .filter(|c| c.action == Action::Retain)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(retained, ["net/main"]);
    world.calls.lock().unwrap().clear();
    let report = apply(
        &p_,
        &g,
        &p,
        &inv,
        None,
        &opts(10),
        &Quiet,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.status, ApplyStatus::Succeeded);
    let calls = world.calls.lock().unwrap().clone();
    let pos = |c: &str| {
        calls
            .iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("{c} in {calls:?}"))
    };
    assert!(pos("delete app/a") < pos("delete host/a"));
    assert!(pos("delete app/b") < pos("delete host/b"));
    let left: Vec<String> = world
        .things
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(left, ["net/main"]);
}

#[tokio::test(start_paused = true)]
async fn creates_follow_dependencies_and_resolve_references() {
    let world = Arc::new(World::default());
    *world.delay.lock().unwrap() = Duration::from_millis(10);
    let g = stage();
    let report = deploy(&world, &g, 10).await;
    assert_eq!(report.status, ApplyStatus::Succeeded);
    let calls = world.calls.lock().unwrap().clone();
    let pos = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(pos("create net/main") < pos("create host/a"));
    assert!(pos("create host/a") < pos("create app/a"));
    assert!(pos("create host/b") < pos("create app/b"));
    assert_converged(&world, &g);
}

#[tokio::test(start_paused = true)]
async fn parallelism_is_bounded_and_used() {
    for parallelism in [1, 4, 10] {
        let world = Arc::new(World::default());
        *world.delay.lock().unwrap() = Duration::from_millis(50);
        let g = graph(
            (0..40)
                .map(|i| Resource::new(format!("app/{i}"), "mem.app").prop("n", i as i64))
                .collect(),
        );
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            deploy(&world, &g, parallelism).await.status,
            ApplyStatus::Succeeded
        );
        assert_eq!(world.max_running.load(Ordering::SeqCst), parallelism);
        // Paused time advances only by the sleeps: 40 steps of 50 ms in waves.
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(50) * (40usize.div_ceil(parallelism) as u32)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_until_success() {
    let world = Arc::new(World::default());
    world
        .failures
        .lock()
        .unwrap()
        .insert("host/a".into(), (3, ErrorClass::Retryable));
    let g = stage();
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let p = Mem(world.clone());
    let inv = p.observe().await.unwrap();
    let pl = plan(&g, &inv, KINDS, Mode::Deploy);
    let journal = Journal::start(
        store.clone(),
        &pl,
        "deploy",
        Holder::current("boxctl deploy"),
        vec![],
    )
    .await
    .unwrap();
    let report = apply(
        &p,
        &g,
        &pl,
        &inv,
        Some(&journal),
        &opts(10),
        &Quiet,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.status, ApplyStatus::Succeeded);
    let calls = world
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| *c == "create host/a")
        .count();
    assert_eq!(calls, 4);
    let doc = journal.snapshot();
    let step = doc.steps.iter().find(|s| s.id == "host/a").unwrap();
    assert_eq!((step.status, step.attempts), (StepStatus::Succeeded, 4));
    assert_converged(&world, &g);
}

#[tokio::test(start_paused = true)]
async fn retries_give_up_after_the_last_attempt() {
    let world = Arc::new(World::default());
    world
        .failures
        .lock()
        .unwrap()
        .insert("net/main".into(), (99, ErrorClass::Retryable));
    let report = deploy(&world, &stage(), 10).await;
    assert_eq!(report.status, ApplyStatus::Failed);
    assert_eq!(
        world
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == "create net/main")
            .count(),
        5
    );
    // Everything depends on the network except the runner, which ran in parallel.
    let skipped: Vec<&str> = report.skipped.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(skipped, ["host/a", "app/a", "host/b", "app/b"]);
}

#[tokio::test(start_paused = true)]
async fn a_hard_failure_stops_scheduling_while_in_flight_steps_finish() {
    let world = Arc::new(World::default());
    let g = graph(
        (0..6)
            .map(|i| Resource::new(format!("app/{i}"), "mem.app"))
            .collect(),
    );
    world
        .failures
        .lock()
        .unwrap()
        .insert("app/0".into(), (1, ErrorClass::Hard));
    world
        .slow
        .lock()
        .unwrap()
        .insert("app/1".into(), Duration::from_secs(5));
    world
        .slow
        .lock()
        .unwrap()
        .insert("app/0".into(), Duration::from_millis(10));
    let report = deploy(&world, &g, 2).await;
    assert_eq!(report.status, ApplyStatus::Failed);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0.as_str(), "app/0");
    // app/1 was in flight when app/0 failed: it finished; nothing else started.
    assert_eq!(
        report
            .succeeded
            .iter()
            .map(ResourceId::as_str)
            .collect::<Vec<_>>(),
        ["app/1"]
    );
    assert_eq!(report.skipped.len(), 4);
    // A hard error is not retried.
    assert_eq!(
        world
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == "create app/0")
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn cancellation_lets_in_flight_steps_finish_and_skips_the_rest() {
    let world = Arc::new(World::default());
    *world.delay.lock().unwrap() = Duration::from_secs(1);
    let g = graph(
        (0..10)
            .map(|i| Resource::new(format!("app/{i}"), "mem.app"))
            .collect(),
    );
    let p = Mem(world.clone());
    let inv = p.observe().await.unwrap();
    let pl = plan(&g, &inv, KINDS, Mode::Deploy);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c2.cancel();
    });
    let report = apply(&p, &g, &pl, &inv, None, &opts(3), &Quiet, &cancel).await;
    assert_eq!(report.status, ApplyStatus::Interrupted);
    // First wave (3) done at 1 s, second wave (3) in flight at 1.5 s and finished.
    assert_eq!(report.succeeded.len(), 6);
    assert_eq!(report.skipped.len(), 4);
    assert!(report.failed.is_empty());
}

#[tokio::test]
async fn duplicates_left_by_a_crash_are_deleted() {
    let world = Arc::new(World::default());
    let g = stage();
    deploy(&world, &g, 10).await;
    let dup = {
        let things = world.things.lock().unwrap();
        let mut d = things
            .iter()
            .find(|t| t.id.as_str() == "app/b")
            .unwrap()
            .clone();
        d.uid = 999;
        d
    };
    world.things.lock().unwrap().push(dup);
    let inv = Mem(world.clone()).observe().await.unwrap();
    assert_eq!(inv.duplicates.len(), 1);
    let p = plan(&g, &inv, KINDS, Mode::Deploy);
    assert_eq!(p.summary.delete, 1);
    assert!(
        p.changes.iter().any(|c| c.action == Action::Delete
            && c.reason.as_deref().unwrap_or("").contains("duplicate"))
    );
    let report = deploy(&world, &g, 10).await;
    assert_converged(&world, &g);
    // The duplicate's deletion leaves the declared resource's outputs in place.
    assert!(
        report
            .resource_outputs
            .contains_key(&ResourceId::from("app/b"))
    );
}

/// Start from `before`, deploy `after` but crash right after mutation `k`, then
/// rerun the deploy: the world converges to `after` with nothing duplicated or lost.
async fn crash_then_rerun(before: &DesiredGraph, after: &DesiredGraph) -> usize {
    // Count the mutations of an uninterrupted run.
    let probe = Arc::new(World::default());
    deploy(&probe, before, 10).await;
    let base = probe.mutations.load(Ordering::SeqCst);
    deploy(&probe, after, 10).await;
    let total = probe.mutations.load(Ordering::SeqCst) - base;
    assert!(total > 0);

    for k in 1..=total {
        let world = Arc::new(World::default());
        deploy(&world, before, 10).await;
        *world.crash_after.lock().unwrap() = Some(world.mutations.load(Ordering::SeqCst) + k);
        let p = Mem(world.clone());
        let inv = p.observe().await.unwrap();
        let pl = plan(after, &inv, KINDS, Mode::Deploy);
        let cancel = CancellationToken::new();
        let o = opts(3);
        tokio::select! {
            _ = apply(&p, after, &pl, &inv, None, &o, &Quiet, &cancel) => panic!("crash point {k} of {total} not reached"),
            _ = world.crashed.notified() => {}
        }
        // The process is gone: rerun from a fresh observation.
        *world.crash_after.lock().unwrap() = None;
        let report = deploy(&world, after, 3).await;
        assert_eq!(
            report.status,
            ApplyStatus::Succeeded,
            "crash at {k}: {:?}",
            report.failed
        );
        assert_converged(&world, after);
        let p2 = plan(
            after,
            &Mem(world.clone()).observe().await.unwrap(),
            KINDS,
            Mode::Deploy,
        );
        assert!(
            !p2.has_changes(),
            "crash at {k}: rerun left changes {:?}",
            p2.summary
        );
    }
    total
}

#[tokio::test]
async fn a_crash_after_any_step_then_a_rerun_converges_from_empty() {
    let empty = graph(vec![]);
    let n = crash_then_rerun(&empty, &stage()).await;
    assert_eq!(n, 6);
}

#[tokio::test]
async fn a_crash_after_any_step_then_a_rerun_converges_through_updates_replacements_and_deletes() {
    let before = stage();
    let mut after = stage();
    after
        .resources
        .get_mut(&ResourceId::from("host/a"))
        .unwrap()
        .props
        .insert("size".into(), Value::str("large"));
    after
        .resources
        .get_mut(&ResourceId::from("net/main"))
        .unwrap()
        .props
        .insert("cidr".into(), Value::str("10.1.0.0/16"));
    after.resources.remove(&ResourceId::from("app/b"));
    after
        .add(Resource::new("app/c", "mem.app").prop("host", Value::reference("host/b", "uid")))
        .unwrap();
    let n = crash_then_rerun(&before, &after).await;
    // net/main replaced (delete + create), both hosts updated to the new
    // network, app/c created, app/b deleted; app/a keeps its host and is unchanged.
    assert_eq!(n, 6);
}

#[tokio::test]
async fn steps_that_can_never_run_fail_the_apply_instead_of_passing_as_done() {
    let world = Arc::new(World::default());
    let g = graph(vec![
        Resource::new("app/a", "mem.app"),
        Resource::new("app/b", "mem.app"),
    ]);
    let p = Mem(world.clone());
    let inv = p.observe().await.unwrap();
    let mut pl = plan(&g, &inv, KINDS, Mode::Deploy);
    // A cycle the graph check would refuse, as a hand-made plan could carry it.
    pl.deps
        .insert("app/a".into(), [ResourceId::from("app/b")].into());
    pl.deps
        .insert("app/b".into(), [ResourceId::from("app/a")].into());
    let report = apply(
        &p,
        &g,
        &pl,
        &inv,
        None,
        &opts(4),
        &Quiet,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.status, ApplyStatus::Failed);
    assert_eq!(report.skipped.len(), 2);
    assert!(
        report.failed[0].2.message.contains("dependency cycle"),
        "{:?}",
        report.failed
    );
    assert!(world.things.lock().unwrap().is_empty());
}

#[test]
fn what_references_a_volatile_output_of_an_update_changes_with_it() {
    const VOLATILE: &[KindSpec] = &[
        KindSpec {
            kind: "mem.param",
            replace_on: &[],
            order: 10,
            create_before_delete: false,
            volatile_outputs: &["digest"],
        },
        KindSpec {
            kind: "mem.service",
            replace_on: &[],
            order: 20,
            create_before_delete: false,
            volatile_outputs: &[],
        },
    ];
    let desired = |value: &str| {
        graph(vec![
            Resource::new("param/p", "mem.param").prop("value", value),
            Resource::new("service/s", "mem.service")
                .prop("restart_on", Value::reference("param/p", "digest"))
                .prop("stable", Value::reference("param/p", "name")),
        ])
    };
    let mut inv = Inventory::default();
    let mut p = Observed::new("param/p".into(), "mem.param", Props::new());
    p.props.insert("value".into(), Value::str("old"));
    p.outputs.insert("digest".into(), Value::str("d-old"));
    p.outputs.insert("name".into(), Value::str("p"));
    inv.add(p);
    let mut s = Observed::new("service/s".into(), "mem.service", Props::new());
    s.props.insert("restart_on".into(), Value::str("d-old"));
    s.props.insert("stable".into(), Value::str("p"));
    inv.add(s);

    let unchanged = plan(&desired("old"), &inv, VOLATILE, Mode::Deploy);
    assert!(!unchanged.has_changes(), "{:?}", unchanged.changes);

    let pl = plan(&desired("new"), &inv, VOLATILE, Mode::Deploy);
    let action = |id: &str| pl.changes.iter().find(|c| c.id.as_str() == id).unwrap();
    assert_eq!(action("param/p").action, Action::Update);
    let svc = action("service/s");
    assert_eq!(svc.action, Action::Update);
    // Only the volatile output is unknown; the stable one still resolves.
    let names: Vec<(&str, bool)> = svc
        .fields
        .iter()
        .map(|f| (f.name.as_str(), f.known_after_apply))
        .collect();
    assert_eq!(names, [("restart_on", true)]);
}

#[test]
fn a_value_held_by_something_not_owned_blocks_its_create_unless_taken_over() {
    use super::provider::Claim;
    let g = graph(vec![
        Resource::new("net/a", "mem.net").prop("cidr", "10.0.0.0/16"),
        Resource::new("host/h", "mem.host")
            .prop("name", Value::reference("net/a", "uid"))
            .prop("zone", "a"),
    ]);
    let mut inv = Inventory::default();
    let mut net = Observed::new("net/a".into(), "mem.net", Props::new());
    net.props.insert("cidr".into(), Value::str("10.0.0.0/16"));
    net.outputs.insert("uid".into(), Value::str("U-7"));
    inv.add(net);
    let claim = |except: &[&str]| Claim {
        kind: "mem.host".into(),
        prop: "name".into(),
        value: "u-7".into(),
        holder: "a foreign host".into(),
        hint: "adopt {id}".into(),
        except: except.iter().map(|e| ResourceId::from(*e)).collect(),
    };
    inv.claims.push(claim(&[]));
    let pl = plan(&g, &inv, KINDS, Mode::Deploy);
    assert_eq!(pl.errors.len(), 1, "{:?}", pl.errors);
    assert_eq!(pl.errors[0].id.as_str(), "host/h");
    assert!(
        pl.errors[0].message.contains("U-7") && pl.errors[0].message.contains("a foreign host")
    );
    assert_eq!(pl.errors[0].hint, "adopt host/h");
    inv.claims = vec![claim(&["host/h"])];
    assert!(plan(&g, &inv, KINDS, Mode::Deploy).errors.is_empty());
    // A name not yet known (its source is created in the same apply) is checked at create.
    let mut fresh_inv = Inventory::default();
    fresh_inv.claims.push(claim(&[]));
    assert!(plan(&g, &fresh_inv, KINDS, Mode::Deploy).errors.is_empty());
}
