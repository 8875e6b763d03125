//! A local stage for end-to-end tests: its own state directory and ports,
//! the workspace's real binaries, torn down (processes, boxes) on drop.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A stack with one `dev` stage on the local target.
pub struct Stage {
    pub dir: tempfile::TempDir,
    pub stack: String,
    pub api_port: u16,
    pub runners: u32,
}

/// Where cargo put the platform binaries (`BOXLITE_BIN_DIR` overrides).
pub fn bin_dir() -> PathBuf {
    let dir =
        std::env::var_os("BOXLITE_BIN_DIR").map_or_else(testkit::target_bin_dir, PathBuf::from);
    for b in ["boxctl", "boxlite-control-plane", "boxlite-runner"] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: run the suite with `cargo test --workspace` (tests/run) so every binary is built",
            dir.join(b).display()
        );
    }
    dir
}

impl Stage {
    /// A stage with `runners` runners and extra stage TOML (services, …).
    pub fn new(runners: u32, extra: &str) -> Stage {
        // Unique stack name: /proc scans and cgroups of parallel tests never meet.
        let stack = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        Stage::named(&stack, runners, extra)
    }

    /// A `dev` stage of `stack` in a state directory of its own: two of the
    /// same name are two stages that must never touch each other.
    pub fn named(stack: &str, runners: u32, extra: &str) -> Stage {
        let dir = tempfile::Builder::new()
            .prefix("boxlite-e2e-")
            .tempdir()
            .unwrap();
        let stack = stack.to_string();
        let api_port = testkit::free_port();
        let base = consecutive_free(runners.max(1) as u16, api_port) - 1;
        let text = format!(
            "name = \"{stack}\"\n[stages.dev]\ntarget = \"local\"\nrunners = {runners}\n\
             [stages.dev.local]\napi_port = {api_port}\nrunner_port_base = {base}\nbin_dir = \"{}\"\n{extra}",
            bin_dir().display()
        );
        std::fs::write(dir.path().join("stack.toml"), text).unwrap();
        Stage {
            dir,
            stack,
            api_port,
            runners,
        }
    }

    /// The stage directory.
    pub fn stage_dir(&self) -> PathBuf {
        self.dir.path().join("state").join(&self.stack).join("dev")
    }

    /// A boxctl command in the stack's directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("boxctl"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("BOXCTL_STATE_DIR", self.dir.path().join("state"))
            .env("NO_COLOR", "1")
            .env_remove("BOXLITE_API_URL")
            .env_remove("BOXLITE_API_KEY")
            .stdin(Stdio::null());
        c
    }

    /// Run boxctl and wait.
    pub fn boxctl(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run boxctl")
    }

    /// Run boxctl with `input` on stdin.
    pub fn boxctl_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Run boxctl, asserting success; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.boxctl(args);
        assert!(
            out.status.success(),
            "boxctl {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The admin API key (read from the stage's secret file).
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.stage_dir().join("secrets/admin-api-key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// GET an admin/API path of the control plane as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        reqwest::blocking_get(
            &format!("http://127.0.0.1:{}{path}", self.api_port),
            &self.admin_key(),
        )
    }

    /// Live processes of this stage: boxctl's marker, working under this
    /// stage's directory (another stage of the same name has its own).
    pub fn processes(&self) -> Vec<u32> {
        let needle = format!("BOXCTL_RESOURCE={}/dev/", self.stack);
        let root = std::fs::canonicalize(self.dir.path()).unwrap();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
                && env
                    .split(|b| *b == 0)
                    .any(|v| v.starts_with(needle.as_bytes()))
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|c| c.starts_with(&root))
            {
                out.push(pid);
            }
        }
        out
    }

    /// The pid and marker value of the process boxctl started for `id`
    /// (`runner/runner-1`), by its marker.
    pub fn marked(&self, id: &str) -> Option<(u32, String)> {
        let prefix = format!("BOXCTL_RESOURCE={}/dev/{id}@", self.stack);
        self.processes().into_iter().find_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let var = env
                .split(|b| *b == 0)
                .find(|v| v.starts_with(prefix.as_bytes()))?;
            let value = String::from_utf8_lossy(&var["BOXCTL_RESOURCE=".len()..]).into_owned();
            session_leader(pid).then_some((pid, value))
        })
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if self.stage_dir().exists() {
            let _ = self.cmd(&["destroy", "--stage", "dev", "--yes"]).output();
        }
        // Whatever a failed test left: the stage's processes and box shims.
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let state = self.dir.path().join("state");
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&*state.to_string_lossy())
                && let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Tiny blocking HTTP helper for the control plane's JSON API.
pub mod reqwest {
    /// GET `url` with a bearer key; the JSON body.
    pub fn blocking_get(url: &str, key: &str) -> serde_json::Value {
        let url = url.to_string();
        let key = key.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                ::reqwest::Client::new()
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap()
                    .json::<serde_json::Value>()
                    .await
                    .unwrap()
            })
        })
        .join()
        .unwrap()
    }
}

/// `method url` with an optional bearer key; the status and body text.
pub fn http_call(method: &str, url: &str, key: Option<&str>) -> (u16, String) {
    let (method, url, key) = (
        ::reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        url.to_string(),
        key.map(str::to_string),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut req = ::reqwest::Client::new().request(method, &url);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        })
    })
    .join()
    .unwrap()
}

/// The first of `n` consecutive free ports on 127.0.0.1 (runner N listens on
/// base + N), none of them `avoid`.
pub fn consecutive_free(n: u16, avoid: u16) -> u16 {
    loop {
        let first = testkit::free_port();
        if first > 65000 || (first..first + n).contains(&avoid) {
            continue;
        }
        let held: Vec<_> = (first..first + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return first;
        }
    }
}

/// True when `pid` leads its session (as every process boxctl starts does).
pub fn session_leader(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 1..].to_string();
            rest.split_whitespace().nth(3)?.parse::<u32>().ok()
        })
        == Some(pid)
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A copy of the workspace's runner with bytes appended: a different build
/// (different digest) that runs the same.
pub fn variant_runner(dir: &Path, tag: &str) -> PathBuf {
    let path = dir.join(format!("boxlite-runner-{tag}"));
    let mut bytes = std::fs::read(bin_dir().join("boxlite-runner")).unwrap();
    bytes.extend_from_slice(format!("\nvariant {tag}\n").as_bytes());
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}
