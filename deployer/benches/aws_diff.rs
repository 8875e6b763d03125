//! A no-op `boxctl diff` of an aws stage at 1 and at 50 runners, against a
//! real moto server: the AWS calls it makes (counted by a proxy, per API
//! action) and its wall time (median of several runs). Goal: the same
//! number of calls, and time within 1.5×.
//!
//! moto answers under one Python interpreter lock, so a diff's wall time is
//! about the emulator's CPU time plus boxctl's own critical path. The bench
//! prints both (the emulator's CPU from `/proc`, boxctl's from its rusage),
//! so a gap can be told apart: the emulator's cost of large answers, or ours.
//!
//! Run with `cargo bench -p deployer --bench aws_diff` (needs
//! `BOXLITE_MOTO_SERVER`, as `tests/run` sets it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::aws_proxy::AwsProxy;
use testkit::moto::{Moto, SERVER_ENV};

const RUNS: usize = 7;

fn stack(runners: u32) -> String {
    format!(
        r#"
name = "bench"

[stages.prod]
target = "aws"
region = "ap-southeast-1"
domain = "bench.example.com"
runners = {runners}

[stages.prod.runner]
artifact_url = "https://downloads.example.com/boxlite-runner-0.1.0.tar.gz"
artifact_sha256 = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[stages.prod.control_plane]
image = "registry.example.com/boxlite/control-plane:0.1.0"
"#
    )
}

fn boxctl() -> PathBuf {
    std::env::var_os("BOXCTL_TEST_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_boxctl")),
            PathBuf::from,
        )
}

fn run(dir: &std::path::Path, endpoint: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(boxctl())
        .arg("--stack")
        .arg(dir.join("stack.toml"))
        .arg("--endpoint-url")
        .arg(endpoint)
        .arg("--color")
        .arg("never")
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .stdin(Stdio::null())
        .output()
        .expect("run boxctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Figures {
    calls: u64,
    actions: BTreeMap<String, u64>,
    upstream: BTreeMap<String, Duration>,
    median: Duration,
    min: Duration,
    /// Median emulator CPU time per diff.
    emulator_cpu: Duration,
    /// Median boxctl CPU time (user and system) per diff.
    boxctl_cpu: Duration,
}

fn measure(moto: &Moto, proxy: &AwsProxy, runners: u32) -> Figures {
    moto.reset();
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("stack.toml"), stack(runners)).expect("write stack.toml");
    let (ok, out) = run(dir.path(), proxy.url(), &["deploy", "--stage", "prod"]);
    assert!(ok, "deploy of {runners} runner(s) failed:\n{out}");
    // One warm-up run, then the measured ones.
    let (ok, out) = run(
        dir.path(),
        proxy.url(),
        &["diff", "--stage", "prod", "--exit-code"],
    );
    assert!(ok, "diff after deploy is not clean:\n{out}");
    let mut times = Vec::new();
    let mut calls = Vec::new();
    let mut actions = BTreeMap::new();
    let mut upstream = BTreeMap::new();
    let mut emulator = Vec::new();
    let mut own = Vec::new();
    for _ in 0..RUNS {
        proxy.reset_counts();
        let (cpu0, own0) = (moto.cpu_time(), testkit::children_cpu_time());
        let t0 = Instant::now();
        let (ok, out) = run(
            dir.path(),
            proxy.url(),
            &["diff", "--stage", "prod", "--exit-code"],
        );
        times.push(t0.elapsed());
        emulator.push(moto.cpu_time().saturating_sub(cpu0));
        own.push(testkit::children_cpu_time().saturating_sub(own0));
        assert!(ok, "diff is not clean:\n{out}");
        calls.push(proxy.total());
        actions = proxy.actions();
        upstream = proxy.upstream_time();
    }
    calls.sort_unstable();
    calls.dedup();
    assert_eq!(
        calls.len(),
        1,
        "a no-op diff made a varying number of calls: {calls:?}"
    );
    times.sort();
    emulator.sort();
    own.sort();
    Figures {
        emulator_cpu: emulator[RUNS / 2],
        boxctl_cpu: own[RUNS / 2],
        calls: calls[0],
        actions,
        upstream,
        median: times[RUNS / 2],
        min: times[0],
    }
}

fn main() {
    if std::env::var_os(SERVER_ENV).is_none() {
        eprintln!(
            "aws_diff: {SERVER_ENV} is not set; skipping (run through tests/run, or set it to moto_server)"
        );
        return;
    }
    let moto = Moto::start();
    let proxy = AwsProxy::start(moto.url());
    let one = measure(&moto, &proxy, 1);
    let fifty = measure(&moto, &proxy, 50);

    println!(
        "no-op `boxctl diff` of an aws stage (moto, {RUNS} runs each, process start included)"
    );
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>14} {:>12}",
        "runners", "AWS calls", "median", "fastest", "emulator CPU", "boxctl CPU"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (n, f) in [(1, &one), (50, &fifty)] {
        println!(
            "{n:>8} {:>10} {:>10.0}ms {:>10.0}ms {:>12.0}ms {:>10.0}ms",
            f.calls,
            ms(f.median),
            ms(f.min),
            ms(f.emulator_cpu),
            ms(f.boxctl_cpu)
        );
    }
    println!("\ncalls per action (1 runner → 50 runners):");
    let keys: std::collections::BTreeSet<&String> =
        one.actions.keys().chain(fifty.actions.keys()).collect();
    for k in keys {
        let a = one.actions.get(k).copied().unwrap_or(0);
        let b = fifty.actions.get(k).copied().unwrap_or(0);
        let mark = if a == b { "" } else { "   <- differs" };
        println!("  {k:<36} {a:>3} → {b:>3}{mark}");
    }
    let total = |f: &Figures| f.upstream.values().sum::<Duration>().as_secs_f64() * 1000.0;
    println!(
        "\nemulator answer time (summed over concurrent calls, queueing included; last run): {:.0}ms → {:.0}ms; largest at 50 runners:",
        total(&one),
        total(&fifty)
    );
    let mut slow: Vec<(&String, &Duration)> = fifty.upstream.iter().collect();
    slow.sort_by(|a, b| b.1.cmp(a.1));
    for (k, t) in slow.into_iter().take(6) {
        let before = one.upstream.get(k).copied().unwrap_or_default();
        println!(
            "  {k:<36} {:>5.0}ms → {:>5.0}ms",
            before.as_secs_f64() * 1000.0,
            t.as_secs_f64() * 1000.0
        );
    }
    let ratio = fifty.median.as_secs_f64() / one.median.as_secs_f64();
    let outside = |f: &Figures| f.median.saturating_sub(f.emulator_cpu).as_secs_f64();
    let outside_ratio = outside(&fifty) / outside(&one).max(1e-3);
    println!(
        "time outside the emulator's CPU (median wall − emulator CPU): {:.0}ms → {:.0}ms (×{outside_ratio:.2})",
        outside(&one) * 1000.0,
        outside(&fifty) * 1000.0,
    );
    println!(
        "\ncalls: {} → {} ({}); time: ×{ratio:.2} (goal ≤ 1.5); boxctl's share: ×{outside_ratio:.2}",
        one.calls,
        fifty.calls,
        if one.calls == fifty.calls {
            "the same"
        } else {
            "NOT the same"
        }
    );
}
