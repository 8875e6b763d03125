//! Upgrade benchmark: deploy 3 local runners with boxes, roll a new runner
//! build over them with `boxctl runner upgrade`, and print the rollout time,
//! each runner's unavailability window (its API probed every 10 ms) and the
//! boxes lost. Goals: under 2 s unavailable per runner, zero boxes lost.
//!
//! Uses the binaries next to this bench (build them first):
//!     cargo build --release --bins && cargo bench -p e2e --bench upgrade

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Stage, stderr, variant_runner};

/// Probe `port` until `stop`; the longest stretch it did not answer healthy.
fn probe(port: u16, stop: Arc<AtomicBool>) -> Duration {
    let mut worst = Duration::ZERO;
    let mut down_since: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let up = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(50),
        )
        .ok()
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
            s.write_all(b"GET /api/health HTTP/1.0\r\n\r\n").ok()?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).ok()?;
            Some(buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"))
        })
        .unwrap_or(false);
        match (up, down_since) {
            (false, None) => down_since = Some(Instant::now()),
            (true, Some(t)) => {
                worst = worst.max(t.elapsed());
                down_since = None;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(t) = down_since {
        worst = worst.max(t.elapsed());
    }
    worst
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let stage = Stage::new(3, "");
    let out = stage.boxctl(&["deploy", "--stage", "dev"]);
    assert!(out.status.success(), "deploy failed: {}", stderr(&out));
    let mut boxes = Vec::new();
    for _ in 0..6 {
        boxes.push(
            stage
                .ok(&["box", "create", "--stage", "dev"])
                .trim()
                .to_string(),
        );
    }
    let build = variant_runner(stage.dir.path(), "bench");
    let graph: serde_json::Value =
        serde_json::from_str(&stage.ok(&["graph", "--stage", "dev"])).unwrap();
    let ports: Vec<(String, u16)> = (1..=3)
        .map(|n| {
            let health = graph["resources"][format!("runner/runner-{n}")]["props"]["health"]
                .as_str()
                .unwrap()
                .to_string();
            let port = health
                .rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (format!("runner-{n}"), port)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = ports
        .iter()
        .map(|(name, port)| {
            let (stop, port, name) = (stop.clone(), *port, name.clone());
            std::thread::spawn(move || (name, probe(port, stop)))
        })
        .collect();
    let t0 = Instant::now();
    let out = stage.boxctl(&[
        "runner",
        "upgrade",
        "--stage",
        "dev",
        "--artifact",
        build.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    assert!(out.status.success(), "upgrade failed: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lost = boxes
        .iter()
        .filter(|id| {
            !stage
                .boxctl(&["box", "exec", "--stage", "dev", id, "--", "true"])
                .status
                .success()
        })
        .count();
    println!(
        "upgrade of 3 local runners (max concurrency 1), {} boxes running:",
        boxes.len()
    );
    println!(
        "  rollout, confirmed through the control plane: {:.2} s",
        took.as_secs_f64()
    );
    for (p, r) in probes
        .into_iter()
        .zip(report["runners"].as_array().unwrap())
    {
        let (name, window) = p.join().unwrap();
        println!(
            "  {name}: upgraded in {:.2} s, unavailable {:>4} ms   goal < 2000 ms: {}",
            r["took_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            window.as_millis(),
            if window < Duration::from_secs(2) {
                "met"
            } else {
                "NOT MET"
            }
        );
    }
    println!(
        "  boxes lost: {lost}   goal 0: {}",
        if lost == 0 { "met" } else { "NOT MET" }
    );
}
