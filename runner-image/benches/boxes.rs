//! Benchmark of the real agent (release build): `cargo bench -p runner-image --bench boxes`.
//!
//! Prints:
//! - create → first exec latency for N boxes (default 100): the time from
//!   asking the agent to create a box (admin socket, the same code path as
//!   a control-plane `create` action) until a one-shot exec of `true` in it
//!   has returned over the HTTP API;
//! - exec round trip: one-shot exec of `true` over the HTTP API in a running box;
//! - host memory per idle box: proportional set size of each box's shim,
//!   bubblewrap and PID 1, the box's own cgroup charge, and the drop of
//!   MemAvailable divided by the number of boxes.
//!
//! Goals: create → first exec p50 < 30 ms, exec round trip p50 < 5 ms.
//! Environment: `BOXES=N` (default 100), `EXECS=N` (default 500),
//! `BENCH_LOG` (agent log filter), `BENCH_LOG_FILE` (keep the agent log). Needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::{BoxSpec, ExecRequest, ExecResponse, Resources};
use runner_image::admin::{AdminClient, AdminRequest};

const KEY: &str = "bench-key";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<28} n={:<4} p50={:>10} p90={:>10} p99={:>10} max={:>10} mean={:>10}",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.9)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap()),
        ms(mean)
    );
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Pids of processes whose command line mentions `needle`, plus their descendants.
fn processes_of(needle: &str) -> Vec<u32> {
    let mut all: Vec<(u32, u32, String)> = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        all.push((pid, ppid, cmd));
    }
    let mut set: Vec<u32> = all
        .iter()
        .filter(|(_, _, c)| c.contains(needle))
        .map(|(p, _, _)| *p)
        .collect();
    loop {
        let more: Vec<u32> = all
            .iter()
            .filter(|(p, pp, _)| set.contains(pp) && !set.contains(p))
            .map(|(p, _, _)| *p)
            .collect();
        if more.is_empty() {
            break;
        }
        set.extend(more);
    }
    set
}

struct Cleanup {
    state: PathBuf,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let marker = self.state.to_string_lossy().into_owned();
        for _ in 0..50 {
            let pids = processes_of(&marker);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for ctrl in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
            let base = PathBuf::from(format!("/sys/fs/cgroup/{ctrl}/boxlite/{}", self.name));
            if let Ok(rd) = std::fs::read_dir(&base) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        for _ in 0..50 {
                            if std::fs::remove_dir(e.path()).is_ok() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            }
            let _ = std::fs::remove_dir(&base);
        }
    }
}

async fn exec(client: &reqwest::Client, url: &str, id: uuid::Uuid) -> ExecResponse {
    let r = client
        .post(format!("{url}/api/boxes/{id}/exec"))
        .bearer_auth(KEY)
        .json(&ExecRequest {
            command: vec!["true".into()],
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run());
}

async fn run() {
    let n: usize = std::env::var("BOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let execs: usize = std::env::var("EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::Builder::new()
        .prefix("boxlite-bench-")
        .tempdir()
        .unwrap();
    let state = dir.path().join("state");
    let name = format!("bench-{:06x}", rand::random::<u32>() & 0xffffff);
    let _cleanup = Cleanup {
        state: state.clone(),
        name: name.clone(),
    };
    let port = testkit::free_port();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("api_key"), KEY).unwrap();
    std::fs::write(dir.path().join("token"), "bxr_bench").unwrap();
    let cfg = dir.path().join("runner.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nadvertise_url = \"http://127.0.0.1:{port}\"\n\
             control_plane_url = \"http://127.0.0.1:{}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n",
            testkit::free_port()
        ),
    )
    .unwrap();
    let log_path = std::env::var("BENCH_LOG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("agent.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_boxlite-runner"))
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir.path())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{url}/api/health"))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut admin = AdminClient::connect(&state.join("admin.sock"))
        .await
        .unwrap();
    println!(
        "boxlite-runner benchmark: {n} boxes, {execs} execs, {}",
        admin.status().await.unwrap().cgroups
    );

    // Warm-up: one box created and deleted (page cache, first-use paths).
    let warm = uuid::Uuid::new_v4();
    admin
        .call_ok(&AdminRequest::Create { spec: spec(warm) })
        .await
        .unwrap();
    exec(&client, &url, warm).await;
    admin
        .call_ok(&AdminRequest::Delete { id: warm })
        .await
        .unwrap();

    let avail_before = mem_available_kib();
    let mut create_to_exec = Vec::with_capacity(n);
    let mut create_only = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = uuid::Uuid::new_v4();
        let t0 = Instant::now();
        admin
            .call_ok(&AdminRequest::Create { spec: spec(id) })
            .await
            .unwrap();
        let t1 = Instant::now();
        let r = exec(&client, &url, id).await;
        assert_eq!(r.exit_code, 0);
        create_to_exec.push(t0.elapsed());
        create_only.push(t1 - t0);
        ids.push(id);
    }
    summary("create -> first exec", create_to_exec);
    summary("  of which create", create_only);

    let mut rtt = Vec::with_capacity(execs);
    for i in 0..execs {
        let t0 = Instant::now();
        exec(&client, &url, ids[i % ids.len()]).await;
        rtt.push(t0.elapsed());
    }
    summary("exec round trip (HTTP)", rtt);

    // Idle memory: let things settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let avail_after = mem_available_kib();
    let mut pss_total = 0u64;
    let mut rss_total = 0u64;
    let mut procs = 0usize;
    for pid in processes_of(&format!("{}/boxes/", state.display())) {
        if let Some((rss, pss)) = runner_image::sys::process_memory_kib(pid) {
            rss_total += rss;
            pss_total += pss;
            procs += 1;
        }
    }
    let mut cg_total = 0u64;
    for id in &ids {
        let p = Path::new("/sys/fs/cgroup/memory/boxlite")
            .join(&name)
            .join(id.to_string())
            .join("memory.usage_in_bytes");
        cg_total += std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    println!(
        "host memory per idle box     PSS {:.0} KiB (shim + bwrap + PID 1: {} processes, RSS {:.0} KiB), \
         cgroup charge {:.0} KiB, MemAvailable drop {:.0} KiB",
        pss_total as f64 / n as f64,
        procs,
        rss_total as f64 / n as f64,
        cg_total as f64 / 1024.0 / n as f64,
        (avail_before.saturating_sub(avail_after)) as f64 / n as f64
    );

    let t0 = Instant::now();
    for id in &ids {
        admin
            .call_ok(&AdminRequest::Delete { id: *id })
            .await
            .unwrap();
    }
    println!("delete {n} boxes               {}", ms(t0.elapsed()));
    let _ = agent.kill();
    let _ = agent.wait();
}

fn spec(id: uuid::Uuid) -> BoxSpec {
    BoxSpec {
        id,
        image: "default".into(),
        resources: Resources {
            cpu_millicores: 500,
            memory_mib: 128,
            disk_mib: 1024,
        },
        env: Default::default(),
        network: protocol::NetworkMode::None,
        egress_allow: vec![],
    }
}
