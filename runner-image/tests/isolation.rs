//! A box is really isolated: real bubblewrap, overlayfs and cgroups.
//! (Run as root: the agent mounts and creates cgroups.)

mod common;

use std::time::Duration;

use common::{Options, Runner, Ws};
use protocol::{ExecRequest, ExecStart};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_cannot_read_host_files_outside_its_root() {
    let r = Runner::start(Options::default()).await;
    let id = r.create_box(128, false).await;
    // A secret on the host, in a world-readable place.
    let secret_dir = tempfile::Builder::new()
        .prefix("host-secret-")
        .tempdir_in("/tmp")
        .unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "TOP-SECRET-HOST-DATA").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = secret.to_string_lossy();
    let (out, _) = r
        .sh(id, &format!("cat {p} 2>&1; cat /proc/1/root{p} 2>&1; ls /tmp; find / -name secret.txt 2>/dev/null; echo done"))
        .await;
    assert!(!out.contains("TOP-SECRET"), "{out}");
    assert!(out.contains("done"), "{out}");
    // The box's root is its image plus its own layer: no host state dir, no host /etc/shadow.
    let (out, _) = r.sh(id, "ls /; cat /etc/shadow 2>&1; ls /run 2>&1").await;
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("boxes") && !out.contains("releases"), "{out}");
    // What it writes lands in its own upper layer, not in the image or elsewhere on the host.
    let (_, code) = r
        .sh(id, "echo mine > /etc/box-file && echo x > /tmp/t")
        .await;
    assert_eq!(code, 0);
    assert!(r.box_dir(&id).join("upper/etc/box-file").exists());
    assert!(!r.state.join("images/default/rootfs/etc/box-file").exists());
    // Root in the box is an unprivileged uid on the host.
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(r.box_dir(&id).join("upper/etc/box-file"))
        .unwrap()
        .uid();
    assert_eq!(uid, runner_image::config::DEFAULT_BOX_UID);
    // No capabilities, no_new_privs, seccomp filters active.
    let (out, _) = r
        .sh(
            id,
            "grep -E 'CapEff|CapBnd|NoNewPrivs|Seccomp:' /proc/self/status",
        )
        .await;
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // Only stdin, stdout and stderr reach a process in the box, and its PID 1 holds nothing.
    let (out, _) = r
        .sh(id, "ls /proc/self/fd; echo pid1:; ls /proc/1/fd 2>&1")
        .await;
    let fds: Vec<&str> = out.lines().take_while(|l| *l != "pid1:").collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "(3 is ls's own directory) {out}");
    assert!(out.ends_with("pid1:\n"), "{out}");
    // Namespaces and mounts stay closed.
    let (out, _) = r
        .sh(
            id,
            "unshare -U true 2>&1; echo rc=$?; mount -t tmpfs none /mnt 2>&1; echo rc=$?",
        )
        .await;
    assert!(!out.contains("rc=0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_cannot_see_host_or_other_boxes_processes() {
    let r = Runner::start(Options::default()).await;
    let a = r.create_box(128, false).await;
    let b = r.create_box(128, false).await;
    // A long-running marker process in box A, started detached.
    let (ws, _) = Ws::open(
        &r,
        a,
        &ExecStart {
            command: vec!["sleep".into(), "31337".into()],
            ..Default::default()
        },
    )
    .await;
    ws.disconnect().await;
    let (out_a, _) = r.sh(a, "ps -o pid,args").await;
    assert!(out_a.contains("sleep 31337"), "{out_a}");
    // Host pid of that sleep, as the host sees it.
    let host_pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmd == b"sleep\x0031337\x00").then(|| e.file_name().to_string_lossy().into_owned())
        })
        .expect("the sleep runs on the host");
    let (out_b, _) = r
        .sh(
            b,
            &format!("ps -o pid,args; ls /proc/{host_pid} 2>&1; kill -0 {host_pid} 2>&1; echo end"),
        )
        .await;
    assert!(!out_b.contains("31337"), "box B sees box A: {out_b}");
    assert!(
        !out_b.contains("boxlite-runner"),
        "box B sees the host: {out_b}"
    );
    // Only its own few processes: PID 1, the shell, ps.
    let (count, _) = r.sh(b, "ls -d /proc/[0-9]* | wc -l").await;
    let n: u32 = count.trim().parse().unwrap();
    assert!(n <= 4, "box sees {n} processes");
    let (pid1, _) = r.sh(b, "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(
        pid1.contains("/proc/self/fd/"),
        "PID 1 is the box init: {pid1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_has_no_network_unless_asked() {
    // A service on the host's loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            use std::io::Write;
            let mut c = c;
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nhost-here");
        }
    });
    let r = Runner::start(Options::default()).await;
    let closed = r.create_box(128, false).await;
    let open = r.create_box(128, true).await;
    let probe = format!(
        "ip -o link | awk '{{print $2}}'; timeout 5 wget -q -O - http://127.0.0.1:{port}/ 2>&1; echo rc=$?"
    );
    let (out, _) = r.sh(closed, &probe).await;
    assert!(out.contains("lo:"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with(':')).count(),
        1,
        "only loopback: {out}"
    );
    assert!(!out.contains("host-here"), "{out}");
    assert!(!out.contains("rc=0"), "{out}");
    let (out, _) = r.sh(open, &probe).await;
    assert!(
        out.contains("host-here"),
        "network box reaches the host: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_dies_inside_the_box() {
    let r = Runner::start(Options {
        extra: "pids_per_box = 64".into(),
        ..Default::default()
    })
    .await;
    let bomb = r.create_box(256, false).await;
    let bystander = r.create_box(128, false).await;
    let pids_max = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/boxlite/{}/{bomb}/pids.max",
        r.name
    ))
    .unwrap();
    assert_eq!(pids_max.trim(), "64");
    // The classic bomb. Under pids.max every fork beyond the limit fails, so
    // the bomb starves and dies out; if it has not after 20 s the exec's
    // timeout kills its whole process group.
    let t0 = std::time::Instant::now();
    let bomb_run = r.exec_req(
        bomb,
        ExecRequest {
            command: vec!["sh".into(), "-c".into(), "b() { b | b & }; b".into()],
            timeout_secs: Some(20),
            ..Default::default()
        },
    );
    // While it runs, the host and the other box are fine.
    let during = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (out, code) = r.sh(bystander, "echo still-here").await;
        assert_eq!((out.trim(), code), ("still-here", 0));
        assert!(r.health().await.unwrap().0.is_success());
    };
    let (res, ()) = tokio::join!(bomb_run, during);
    assert!(res.stderr.contains("can't fork"), "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(40));
    // The host is fine while and after the bomb runs: the agent answers, the other box works.
    let (out, code) = r.sh(bystander, "echo still-here").await;
    assert_eq!((out.trim(), code), ("still-here", 0));
    assert!(r.health().await.unwrap().0.is_success());
    // The bomb is contained by pids.max and dies: the box recovers.
    let events = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/boxlite/{}/{bomb}/pids.events",
        r.name
    ))
    .unwrap_or_default();
    assert!(
        events.contains("max") && !events.contains("max 0"),
        "pids limit never hit: {events}"
    );
    let mut ok = false;
    for _ in 0..100 {
        let cur: u64 = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/pids/boxlite/{}/{bomb}/pids.current",
            r.name
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        assert!(cur <= 64);
        if cur <= 3 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "bomb processes linger");
    let (out, _) = r.sh(bomb, "echo recovered").await;
    assert_eq!(out.trim(), "recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_killed_alone() {
    let r = Runner::start(Options::default()).await;
    let hog = r.create_box(48, false).await;
    let other = r.create_box(128, false).await;
    let limit =
        std::fs::read_to_string(r.memory_cgroup(&hog).join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim().parse::<u64>().unwrap(), 48 << 20);
    // dd allocates its whole block: 200 MiB in a 48 MiB box.
    let res = r
        .exec(
            hog,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
        )
        .await;
    assert_eq!(res.exit_code, 128 + 9, "the hog is killed: {res:?}");
    let oom = std::fs::read_to_string(r.memory_cgroup(&hog).join("memory.oom_control")).unwrap();
    assert!(
        oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "{oom}"
    );
    // Only the hog died: the box, its shim, the agent and the other box live on.
    let (out, _) = r.sh(hog, "echo alive").await;
    assert_eq!(out.trim(), "alive");
    let (out, _) = r.sh(other, "echo fine").await;
    assert_eq!(out.trim(), "fine");
    let st = r.status().await;
    assert!(
        st.boxes
            .iter()
            .all(|b| b.state == protocol::BoxState::Running)
    );
}

const TIOCSTI_PROBE: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(void) {
    int injected = 0, tried = 0;
    char c = 'X';
    for (int fd = 0; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) < 0) continue;
        tried++;
        /* plain request, and with high bits set (CVE-2019-10063) */
        if (ioctl(fd, TIOCSTI, &c) == 0) { injected++; printf("fd %d: injected\n", fd); }
        else printf("fd %d: %s\n", fd, strerror(errno));
        if (syscall(16 /* ioctl */, fd, 0xffffffff00005412UL, &c) == 0) { injected++; printf("fd %d high: injected\n", fd); }
    }
    int t = open("/dev/tty", O_RDWR);
    if (t >= 0) {
        if (ioctl(t, TIOCSTI, &c) == 0) { injected++; printf("/dev/tty: injected\n"); }
        else printf("/dev/tty: %s\n", strerror(errno));
    } else printf("/dev/tty: %s\n", strerror(errno));
    printf("tried=%d injected=%d\n", tried, injected);
    return injected ? 1 : 0;
}
"#;

/// The agent runs on a terminal (like an operator starting it by hand); a box
/// tries to push keystrokes into every terminal it can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_cannot_inject_input_into_the_runners_terminal() {
    let work = tempfile::tempdir().unwrap();
    let probe = common::build_static(work.path(), "tiocsti", TIOCSTI_PROBE);
    // An image with busybox and the probe.
    let image = work.path().join("probe.tar");
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8], mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        add(
            "bin/busybox",
            &std::fs::read("/bin/busybox").unwrap(),
            0o755,
        );
        add("probe", &std::fs::read(&probe).unwrap(), 0o755);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "bin/sh", "busybox").unwrap();
        b.into_inner().unwrap()
    };
    runner_image::images::write_oci_layout(&image, &[layer], &["PATH=/bin"]).unwrap();

    // The runner's terminal: a pty whose slave is the agent's stdio and controlling tty.
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    assert_eq!(
        unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        },
        0
    );
    let mut r = Runner::start(Options::default()).await;
    r.kill9();
    let st = std::process::Command::new(common::bin())
        .args(["image", "import", "probe"])
        .arg(&image)
        .arg("--config")
        .arg(&r.config)
        .current_dir(r.dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(common::bin());
        cmd.arg("--config").arg(&r.config).current_dir(r.dir.path());
        let s = slave;
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::ioctl(s, libc::TIOCSCTTY, 0);
                libc::dup2(s, 0);
                libc::dup2(s, 1);
                libc::dup2(s, 2);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // Let the harness guard clean this agent up like its own.
        std::mem::forget(child);
    }
    r.wait_healthy(Duration::from_secs(60)).await;
    let id = uuid::Uuid::new_v4();
    let mut spec = common::spec(id, 128, false);
    spec.image = "probe".into();
    r.admin(runner_image::admin::AdminRequest::Create { spec })
        .await;

    // Without a terminal (one-shot) and with one (interactive session).
    let res = r.exec(id, &["/probe"]).await;
    assert_eq!(res.exit_code, 0, "{res:?}");
    assert!(res.stdout.contains("injected=0"), "{}", res.stdout);
    assert!(
        res.stdout.contains("/dev/tty: No such device"),
        "{}",
        res.stdout
    );
    let (mut ws, _) = Ws::open(
        &r,
        id,
        &ExecStart {
            command: vec!["/probe".into()],
            tty: true,
            ..Default::default()
        },
    )
    .await;
    let code = ws.exit_code(Duration::from_secs(20)).await;
    let out = String::from_utf8_lossy(&ws.stdout).into_owned();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("injected=0"), "{out}");
    // Nothing arrived on the runner's terminal (reads are non-blocking).
    unsafe { libc::fcntl(master, libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n as usize]);
    }
    // The terminal echoes injected input; the agent's own log lines are fine.
    let text = String::from_utf8_lossy(&seen);
    assert!(
        !text.contains("XX"),
        "keystrokes reached the runner's terminal: {text}"
    );
    let mut input = [0u8; 1];
    unsafe { libc::fcntl(slave, libc::F_SETFL, libc::O_NONBLOCK) };
    let n = unsafe { libc::read(slave, input.as_mut_ptr().cast(), 1) };
    assert!(n <= 0, "input was injected into the runner's terminal");
    unsafe {
        libc::close(master);
        libc::close(slave);
    }
}
