//! Engine benchmarks, printed as figures:
//! - plan + render of a synthetic stage of 10,000 resources (goal < 100 ms);
//! - apply of 200 independent 50 ms steps at parallelism 1 and 10 (goal ≥ 8×).
//!
//! Run with `cargo bench -p deployer --bench engine`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deployer::engine::apply::{ApplyOptions, Quiet, apply};
use deployer::engine::plan::{Mode, plan};
use deployer::engine::provider::{Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx};
use deployer::render::{ColorChoice, Style, plan_json, plan_text};
use stack::{DesiredGraph, Resource, Target, Value};
use tokio_util::sync::CancellationToken;

const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: "bench.net",
        replace_on: &["cidr"],
        order: 10,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: "bench.host",
        replace_on: &["zone"],
        order: 20,
        create_before_delete: false,
        volatile_outputs: &[],
    },
];

/// 100 networks, each with 99 hosts referencing it: 10,000 resources.
fn synthetic() -> DesiredGraph {
    let mut g = DesiredGraph::new("bench", "prod", Target::Aws);
    for n in 0..100 {
        let net = format!("net/n{n}");
        g.add(
            Resource::new(&net, "bench.net")
                .prop("cidr", format!("10.{n}.0.0/16"))
                .prop("name", net.as_str()),
        )
        .unwrap();
        for h in 0..99 {
            g.add(
                Resource::new(format!("host/n{n}-h{h}"), "bench.host")
                    .prop("zone", if h % 2 == 0 { "a" } else { "b" })
                    .prop("net", Value::reference(&net, "id"))
                    .prop("size", "c7i.large")
                    .prop(
                        "user_data",
                        format!("#cloud-config\nhostname: n{n}-h{h}\nruncmd:\n  - echo {h}\n"),
                    )
                    .prop("tags", Value::str_map([("team", "infra"), ("n", "x")])),
            )
            .unwrap();
        }
    }
    g
}

/// The world: everything exists; 1 % of hosts drifted in size, 0.5 % in user
/// data, 50 missing, 20 undeclared extras.
fn inventory(g: &DesiredGraph) -> Inventory {
    let mut inv = Inventory::default();
    for (i, r) in g.resources.values().enumerate() {
        if i % 200 == 7 {
            continue;
        }
        let mut props = r.props.clone();
        if let Some(Value::Ref(re)) = props.get("net").cloned() {
            props.insert("net".into(), Value::str(format!("id-{}", re.id)));
        }
        if i % 100 == 3 {
            props.insert("size".into(), Value::str("c7i.xlarge"));
        }
        if i % 200 == 5 {
            props.insert(
                "user_data".into(),
                Value::str("#cloud-config\nhostname: old\n"),
            );
        }
        let mut o = Observed::new(r.id.clone(), &r.kind, props);
        o.outputs
            .insert("id".into(), Value::str(format!("id-{}", r.id)));
        inv.add(o);
    }
    for e in 0..20 {
        inv.add(Observed::new(
            format!("host/extra-{e}").as_str().into(),
            "bench.host",
            BTreeMap::new(),
        ));
    }
    inv
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn bench_plan() {
    let g = synthetic();
    let inv = inventory(&g);
    let style = Style::new(ColorChoice::Never, false);
    let mut plan_times = Vec::new();
    let mut render_times = Vec::new();
    let mut total_times = Vec::new();
    let mut lines = 0;
    for _ in 0..15 {
        let t0 = Instant::now();
        let p = plan(&g, &inv, KINDS, Mode::Deploy);
        let t1 = Instant::now();
        let text = plan_text(&p, &style);
        let json = serde_json::to_string(&plan_json(&p)).unwrap();
        let t2 = Instant::now();
        lines = text.lines().count() + json.len() / 1_000_000;
        plan_times.push(t1 - t0);
        render_times.push(t2 - t1);
        total_times.push(t2 - t0);
    }
    plan_times.sort();
    render_times.sort();
    total_times.sort();
    let p = plan(&g, &inv, KINDS, Mode::Deploy);
    println!(
        "plan+render, {} resources ({} create, {} update, {} delete, {} unchanged; {lines} lines of text):",
        g.resources.len(),
        p.summary.create,
        p.summary.update,
        p.summary.delete,
        p.summary.unchanged
    );
    println!(
        "  plan   p50 {:>7.2} ms   max {:>7.2} ms",
        percentile(&plan_times, 0.5).as_secs_f64() * 1e3,
        plan_times.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "  render p50 {:>7.2} ms   max {:>7.2} ms   (text and JSON)",
        percentile(&render_times, 0.5).as_secs_f64() * 1e3,
        render_times.last().unwrap().as_secs_f64() * 1e3
    );
    let p50 = percentile(&total_times, 0.5);
    println!(
        "  total  p50 {:>7.2} ms   goal < 100 ms: {}",
        p50.as_secs_f64() * 1e3,
        if p50 < Duration::from_millis(100) {
            "met"
        } else {
            "NOT MET"
        }
    );
}

/// Every operation sleeps 50 ms: a stand-in for an API call's latency.
struct Sleepy;

impl Provider for Sleepy {
    fn kinds(&self) -> &[KindSpec] {
        KINDS
    }
    async fn observe(&self) -> Result<Inventory, ProviderError> {
        Ok(Inventory::default())
    }
    async fn create(&self, _ctx: &StepCtx, d: &Resource) -> Result<Observed, ProviderError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Observed::new(d.id.clone(), &d.kind, d.props.clone()))
    }
    async fn update(
        &self,
        _: &StepCtx,
        d: &Resource,
        _: &Observed,
        _: &[String],
    ) -> Result<Observed, ProviderError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Observed::new(d.id.clone(), &d.kind, d.props.clone()))
    }
    async fn delete(&self, _: &StepCtx, _: &Observed) -> Result<(), ProviderError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

async fn bench_apply() {
    let mut g = DesiredGraph::new("bench", "dev", Target::Local);
    for i in 0..200 {
        g.add(Resource::new(format!("host/h{i}"), "bench.host").prop("n", i as i64))
            .unwrap();
    }
    let inv = Inventory::default();
    let p = plan(&g, &inv, KINDS, Mode::Deploy);
    let mut times = BTreeMap::new();
    for parallelism in [1usize, 10] {
        let opts = ApplyOptions {
            parallelism,
            ..ApplyOptions::default()
        };
        let t0 = Instant::now();
        let r = apply(
            &Sleepy,
            &g,
            &p,
            &inv,
            None,
            &opts,
            &Quiet,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(r.succeeded.len(), 200);
        times.insert(parallelism, t0.elapsed());
    }
    let speedup = times[&1].as_secs_f64() / times[&10].as_secs_f64();
    println!("apply, 200 independent steps of 50 ms:");
    println!("  parallelism  1: {:>7.2} s", times[&1].as_secs_f64());
    println!("  parallelism 10: {:>7.2} s", times[&10].as_secs_f64());
    println!(
        "  speedup {speedup:.1}x   goal >= 8x: {}",
        if speedup >= 8.0 { "met" } else { "NOT MET" }
    );
}

fn main() {
    // `cargo test --benches` runs benches in test mode; keep that quick.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    bench_plan();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(bench_apply());
}
