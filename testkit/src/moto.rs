//! A real moto server (the AWS emulator from PyPI) for tests: started from
//! `BOXLITE_MOTO_SERVER` on a free 127.0.0.1 port with an Ubuntu 24.04 AMI
//! supplied through `MOTO_AMIS_PATH`, reset between tests through
//! `POST /moto-api/reset`, and killed when dropped (or, for the server shared
//! by a test binary, when the test process exits).
//!
//! Emulator settings (not boxctl's): certificates are issued at once
//! (`MOTO_ACM_VALIDATION_WAIT=0`; real ACM needs the DNS records published)
//! and AWS managed IAM policies exist (`MOTO_IAM_LOAD_MANAGED_POLICIES`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::{ChildGuard, free_port, wait_for_port, wait_until};

/// Environment variable naming the `moto_server` executable (set by `tests/run`).
pub const SERVER_ENV: &str = "BOXLITE_MOTO_SERVER";
/// Region the tests deploy to.
pub const REGION: &str = "ap-southeast-1";
/// Canonical's account id, owner of the Ubuntu images.
pub const CANONICAL: &str = "099720109477";
/// Name of the newest Ubuntu 24.04 image the emulator offers.
pub const UBUNTU_NOBLE: &str = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250610";
/// Its image id.
pub const UBUNTU_NOBLE_ID: &str = "ami-0b0c0a0e0a0b0c0d1";
/// An older Ubuntu 24.04 image (never the newest match).
pub const UBUNTU_NOBLE_OLD_ID: &str = "ami-0b0c0a0e0a0b0c0d0";
/// A Debian image, for tests that change the AMI name pattern.
pub const DEBIAN_ID: &str = "ami-0d0e0b0a0a0e0b0c2";
/// Debian's image name.
pub const DEBIAN: &str = "debian-12-amd64-20250601-2137";
/// Debian's account id.
pub const DEBIAN_OWNER: &str = "136693071363";

/// A running moto server.
pub struct Moto {
    url: String,
    port: u16,
    guard: Mutex<ChildGuard>,
    _dir: tempfile::TempDir,
}

fn amis_json() -> String {
    let ami = |id: &str, name: &str, owner: &str, date: &str| {
        serde_json::json!({
            "ami_id": id,
            "name": name,
            "description": name,
            "owner_id": owner,
            "public": true,
            "state": "available",
            "architecture": "x86_64",
            "virtualization_type": "hvm",
            "hypervisor": "xen",
            "image_type": "machine",
            "image_location": format!("{owner}/{name}"),
            "root_device_type": "ebs",
            "root_device_name": "/dev/sda1",
            "sriov": "simple",
            "creation_date": date,
            "platform": null,
        })
    };
    serde_json::to_string_pretty(&serde_json::json!([
        ami(
            UBUNTU_NOBLE_OLD_ID,
            "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20240423",
            CANONICAL,
            "2024-04-23T10:00:00.000Z"
        ),
        ami(
            UBUNTU_NOBLE_ID,
            UBUNTU_NOBLE,
            CANONICAL,
            "2025-06-10T10:00:00.000Z"
        ),
        ami(DEBIAN_ID, DEBIAN, DEBIAN_OWNER, "2025-06-01T21:37:00.000Z"),
    ]))
    .expect("AMI list serializes")
}

fn server_path() -> PathBuf {
    let Some(path) = std::env::var_os(SERVER_ENV).filter(|p| !p.is_empty()) else {
        panic!(
            "{SERVER_ENV} is not set: the aws tests need a moto server. Run them through \
             ./tests/run (which installs moto[server] into a virtualenv), or: \
             python3 -m venv ~/.cache/boxlite/moto-venv && \
             ~/.cache/boxlite/moto-venv/bin/pip install 'moto[server]==5.2.5' && \
             export {SERVER_ENV}=~/.cache/boxlite/moto-venv/bin/moto_server"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{SERVER_ENV}={} does not exist; install moto[server] there (see tests/run)",
        path.display()
    );
    path
}

impl Moto {
    /// Start a moto server; it is killed when the value is dropped.
    pub fn start() -> Moto {
        let server = server_path();
        let dir = tempfile::tempdir().expect("temporary directory");
        let amis = dir.path().join("amis.json");
        std::fs::write(&amis, amis_json()).expect("write the AMI list");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log file");
        let mut cmd = Command::new(&server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_AMIS_PATH", &amis)
            .env("MOTO_ACM_VALIDATION_WAIT", "0")
            .env("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // Dies with the thread that started it, so a server shared by a whole
        // test binary never outlives the binary.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let guard = ChildGuard::new("moto_server", child);
        let url = format!("http://127.0.0.1:{port}");
        let ready = wait_for_port(port, Duration::from_secs(60))
            && wait_until(Duration::from_secs(30), || {
                http_status("GET", &format!("{url}/moto-api/")).is_some_and(|s| s < 500)
            });
        if !ready {
            let log = std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default();
            panic!("moto_server did not start on port {port}:\n{log}");
        }
        Moto {
            url,
            port,
            guard: Mutex::new(guard),
            _dir: dir,
        }
    }

    /// One server per test binary, started on first use by a thread that
    /// lives as long as the process (the server dies with it).
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("moto-keeper".into())
                .spawn(move || {
                    let r = std::panic::catch_unwind(Moto::start);
                    let failed = r.is_err();
                    let _ = tx.send(r);
                    if !failed {
                        loop {
                            std::thread::park();
                        }
                    }
                })
                .expect("spawn the moto keeper thread");
            match rx.recv().expect("moto keeper answers") {
                Ok(m) => m,
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    }

    /// The shared server, reset, held exclusively until the guard drops: tests
    /// of one binary take turns on it.
    pub fn exclusive() -> (MutexGuard<'static, ()>, &'static Moto) {
        static TURN: Mutex<()> = Mutex::new(());
        let guard = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let m = Moto::shared();
        m.reset();
        (guard, m)
    }

    /// Base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Forget every resource (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let status = http_status("POST", &format!("{}/moto-api/reset", self.url));
        assert_eq!(status, Some(200), "moto reset failed");
    }

    /// CPU time the server has used so far (user and system), from `/proc`.
    pub fn cpu_time(&self) -> std::time::Duration {
        let pid = self.guard.lock().unwrap_or_else(|e| e.into_inner()).pid();
        crate::cpu_time_of(pid)
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_running()
    }
}

/// Status of a bodiless HTTP/1.1 request to 127.0.0.1, without an HTTP client.
fn http_status(method: &str, url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}
