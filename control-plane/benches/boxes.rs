//! Benchmark: 10,000 boxes on a real PostgreSQL server (and, for comparison,
//! SQLite), through the HTTP API on a real socket. Prints create throughput
//! and get/list latency percentiles. Run with
//! `cargo bench -p control-plane --bench boxes` (`BENCH_BOXES=N` to change
//! the count, `BENCH_SQLITE=0` to skip SQLite).

use std::time::{Duration, Instant};

use control_plane::clock::Clock;
use control_plane::config::Config;
use control_plane::server::Server;
use futures::StreamExt;
use protocol::*;
use serde_json::json;
use testkit::postgres::{PostgresOptions, PostgresServer};
use uuid::Uuid;

const CONCURRENCY: usize = 16;
const GETS: usize = 5_000;
const LISTS: usize = 1_000;

struct Stats(Vec<Duration>);

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort();
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_secs_f64() * 1000.0
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what:<34} n={:<6} p50={:>7.3} ms  p90={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
            self.0.len(),
            self.pct(0.50),
            self.pct(0.90),
            self.pct(0.99),
            self.pct(1.0)
        )
    }
}

async fn run(label: &str, database_url: String, boxes: usize) -> f64 {
    let admin = control_plane::tokens::generate(API_KEY_PREFIX);
    let mut config = Config::new(database_url.clone(), admin.clone());
    config.runner_unresponsive_after = Duration::from_secs(24 * 3600);
    config.database_max_connections = 20;
    let server = Server::new(config, Clock::system())
        .await
        .expect("start the control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    // An organization and a runner big enough for every box.
    let org: CreateOrganizationResponse = http
        .post(format!("{base}/api/admin/organizations"))
        .bearer_auth(&admin)
        .json(&json!({ "name": "bench" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = org.api_key.key;
    for i in 0..4 {
        let token = control_plane::tokens::generate(RUNNER_TOKEN_PREFIX);
        let r = http
            .post(format!("{base}/api/admin/runners"))
            .bearer_auth(&admin)
            .json(&json!({ "name": format!("runner-{i}"), "token_sha256": control_plane::tokens::sha256_hex(&token) }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let hc = HealthcheckRequest {
            version: "bench".into(),
            address: "http://127.0.0.1:9".into(),
            capacity: Resources {
                cpu_millicores: 100_000_000,
                memory_mib: 100_000_000,
                disk_mib: 1_000_000_000,
            },
            usage: Resources::default(),
            binary_sha256: None,
            agent_instance: None,
            boxes: vec![],
        };
        let r = http
            .post(format!("{base}/api/runners/healthcheck"))
            .bearer_auth(&token)
            .json(&hc)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    // Create.
    let started = Instant::now();
    let results: Vec<(Uuid, Duration)> = futures::stream::iter(0..boxes)
        .map(|i| {
            let http = http.clone();
            let base = base.clone();
            let key = key.clone();
            async move {
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/api/boxes"))
                    .bearer_auth(&key)
                    .json(&json!({
                        "cpu_millicores": 100, "memory_mib": 64, "disk_mib": 64,
                        "labels": { "team": format!("t{}", i % 10), "n": i.to_string() },
                        "env": { "I": i.to_string() },
                    }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), reqwest::StatusCode::CREATED);
                let b: BoxInfo = r.json().await.unwrap();
                (b.id, t.elapsed())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let throughput = boxes as f64 / elapsed.as_secs_f64();
    let ids: Vec<Uuid> = results.iter().map(|r| r.0).collect();
    let create = Stats(results.iter().map(|r| r.1).collect());

    println!("\n== {label}: {boxes} boxes, create concurrency {CONCURRENCY} ==");
    println!(
        "create throughput                  {throughput:.0} boxes/s ({:.2} s total)",
        elapsed.as_secs_f64()
    );
    println!("{}", create.line("create latency"));
    println!("-- reads right after the load (no planner statistics yet) --");
    reads(&http, &base, &key, &ids).await;
    // Autovacuum analyzes a table within a minute of this much change; do it now.
    let db = control_plane::db::Db::connect(&database_url, 1)
        .await
        .unwrap();
    sqlx::query("ANALYZE").execute(db.pool()).await.unwrap();
    db.close().await;
    println!("-- reads after ANALYZE (what autovacuum leaves in production) --");
    reads(&http, &base, &key, &ids).await;

    let _ = stop_tx.send(());
    let _ = task.await;
    throughput
}

async fn reads(http: &reqwest::Client, base: &str, key: &str, ids: &[Uuid]) {
    // Get: sequential, random ids.
    let mut gets = Vec::with_capacity(GETS);
    for _ in 0..GETS {
        let id = ids[rand::random_range(0..ids.len())];
        let t = Instant::now();
        let r = http
            .get(format!("{base}/api/boxes/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let _ = r.bytes().await.unwrap();
        gets.push(t.elapsed());
    }

    // List: first pages, pages deep in the set (by cursor), and label-filtered pages.
    let mut sorted = ids.to_vec();
    sorted.sort();
    let mut first = Vec::new();
    let mut deep = Vec::new();
    let mut filtered = Vec::new();
    for i in 0..LISTS {
        let (url, bucket) = match i % 3 {
            0 => (format!("{base}/api/boxes?limit=50"), &mut first),
            1 => {
                let after = sorted[rand::random_range(0..sorted.len())];
                let cursor = control_plane::boxes::encode_cursor(after);
                (
                    format!("{base}/api/boxes?limit=50&cursor={cursor}"),
                    &mut deep,
                )
            }
            _ => (
                format!(
                    "{base}/api/boxes?limit=50&label=team=t{}",
                    rand::random_range(0..10)
                ),
                &mut filtered,
            ),
        };
        let t = Instant::now();
        let r = http.get(url).bearer_auth(key).send().await.unwrap();
        assert!(r.status().is_success());
        let page: BoxPage = r.json().await.unwrap();
        bucket.push(t.elapsed());
        assert!(!page.boxes.is_empty() || i % 3 == 1);
    }

    println!("{}", Stats(gets).line("get latency (sequential)"));
    println!("{}", Stats(first).line("list latency (first page, 50)"));
    println!("{}", Stats(deep).line("list latency (cursor page, 50)"));
    println!(
        "{}",
        Stats(filtered).line("list latency (label filter, 50)")
    );
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // `cargo test --benches` runs this with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let boxes: usize = std::env::var("BENCH_BOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200 } else { 10_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    // Durable settings (fsync on): the numbers include real commit costs.
    let pg = PostgresServer::start_with(PostgresOptions {
        durable: true,
        ..Default::default()
    })
    .expect("start PostgreSQL");
    println!(
        "PostgreSQL {} on 127.0.0.1:{} (fsync on)",
        pg.version(),
        pg.port()
    );
    let url = pg.create_database("bench").unwrap();
    rt.block_on(run("PostgreSQL", url, boxes));
    drop(pg);

    if std::env::var("BENCH_SQLITE").as_deref() != Ok("0") {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/bench.db?mode=rwc", dir.path().display());
        rt.block_on(run("SQLite (WAL)", url, boxes));
    }
}
