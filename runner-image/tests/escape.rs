//! The escape suite: every way out of a box we know of, tried for real
//! (bubblewrap, overlayfs, cgroups, nftables, network namespaces, loop
//! devices), each asserting it is refused. `docs/security.md` maps each
//! layer to its test; the attacks on the platform's own surfaces live beside
//! the code they attack: imports in `export_import.rs`, the runner's key,
//! health and socket in `lifecycle.rs`, exec output in `exec_api.rs` and the
//! control plane's API suite, local process identity in the deployer's
//! local-provider tests. (Run as root: the agent mounts and creates cgroups.)

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
    let upper = r.upper(&id).await;
    assert!(upper.join("etc/box-file").exists());
    assert!(!r.state.join("images/default/rootfs/etc/box-file").exists());
    // Root in the box is an unprivileged uid on the host: the first of the box's own range.
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(upper.join("etc/box-file")).unwrap().uid();
    assert_eq!(uid, common::box_ids(&r, &id).base);
    assert!(uid > runner_image::config::DEFAULT_BOX_UID);
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
    // No device nodes, no kernel knobs, no nested user namespaces even past seccomp's back.
    let (out, _) = r
        .sh(
            id,
            "mknod /tmp/sda b 8 0 2>&1; echo rc=$?; mknod /tmp/mem c 1 1 2>&1; echo rc=$?; \
             echo 1 > /proc/sys/kernel/sysrq 2>&1; echo rc=$?; echo 1 > /proc/sys/vm/drop_caches 2>&1; echo rc=$?; \
             cat /proc/sys/user/max_user_namespaces",
        )
        .await;
    assert_eq!(out.matches("rc=").count(), 4, "{out}");
    assert!(!out.contains("rc=0"), "{out}");
    assert!(
        out.trim_end().ends_with('0'),
        "nested user namespaces capped at 0: {out}"
    );
}

/// Finding 5: a box process cannot hold more than its share of the host's file table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_processes_have_bounded_open_files_and_no_core_dumps() {
    let mut r = Runner::start(Options {
        extra: "nofile_per_process = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let probe = common::build_static(work.path(), "probe", common::PROBE_SOURCE);
    let layout = work.path().join("probe.tar");
    common::busybox_image_with(&layout, &[("probe", std::fs::read(&probe).unwrap(), 0o755)]);
    r.import_image("probe", &layout).await;
    let mut s = common::spec(uuid::Uuid::new_v4(), 128, false);
    s.image = "probe".into();
    let id = s.id;
    r.try_create(s).await.unwrap();
    let (out, _) = r.sh(id, "/probe nofile; grep -E 'open files|core file' /proc/self/limits; ulimit -n 5000 2>&1; echo rc=$?").await;
    assert!(out.contains("nofile=997 "), "0, 1, 2 and 997 more: {out}");
    assert!(out.contains("Too many open files"), "{out}");
    let limits: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("Max "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        limits
            .iter()
            .any(|l| l[..3] == ["Max", "open", "files"] && l[3] == "1000" && l[4] == "1000"),
        "{out}"
    );
    assert!(
        limits
            .iter()
            .any(|l| l[..4] == ["Max", "core", "file", "size"] && l[4] == "1" && l[5] == "1"),
        "{out}"
    );
    assert!(!out.contains("rc=0"), "raising the limit: {out}");
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

/// A TCP server on `addr` answering every connection with `body`.
fn serve(addr: &str, body: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            use std::io::Write;
            let mut c = c;
            let _ = c.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    port
}

/// `wget` `url` from inside box `id`: its output and ` rc=N` (no `-T`:
/// busybox 1.35's wget crashes with it on a refused connection).
async fn fetch(r: &Runner, id: uuid::Uuid, url: &str) -> String {
    r.sh(
        id,
        &format!("timeout 4 wget -q -O - {url} 2>&1; echo \" rc=$?\""),
    )
    .await
    .0
}

/// [`fetch`] of every URL at once (each may take its full timeout), in order.
async fn fetch_all(r: &Runner, id: uuid::Uuid, urls: &[String]) -> Vec<String> {
    let mut script = String::from("mkdir -p /tmp\n");
    for (i, u) in urls.iter().enumerate() {
        script.push_str(&format!(
            "(o=$(timeout 4 wget -q -O - {u} 2>&1); echo \"$o rc=$?\" > /tmp/fetch-{i}) &\n"
        ));
    }
    script.push_str("wait\n");
    for i in 0..urls.len() {
        script.push_str(&format!("echo \"@@{i}\"; cat /tmp/fetch-{i}\n"));
    }
    let (out, _) = r.sh(id, &script).await;
    (0..urls.len())
        .map(|i| {
            let start = out
                .find(&format!("@@{i}\n"))
                .map(|p| p + 3 + i.to_string().len());
            let end = out.find(&format!("@@{}\n", i + 1)).unwrap_or(out.len());
            start
                .map(|s| out[s..end].to_string())
                .unwrap_or_else(|| format!("no result in {out}"))
        })
        .collect()
}

/// The address of box `id`'s `eth0` and its gateway.
async fn box_addresses(r: &Runner, id: uuid::Uuid) -> (String, String) {
    let (out, _) = r
        .sh(id, "ip -4 -o addr show dev eth0 | awk '{print $4}'; ip -4 route show default | awk '{print $3}'")
        .await;
    let mut l = out.lines();
    let addr = l
        .next()
        .unwrap_or_default()
        .trim_end_matches("/32")
        .to_string();
    let gw = l.next().unwrap_or_default().to_string();
    assert!(!addr.is_empty() && !gw.is_empty(), "no address: {out}");
    (addr, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_box_reaches_the_host_other_boxes_or_private_networks() {
    let inet = common::Internet::start();
    let loopback_port = serve("127.0.0.1:0", "host-loopback");
    let any_port = serve("0.0.0.0:0", "host-any");
    // The host's own abstract unix socket, shared by every process of its network namespace.
    let abstract_name = format!("bxt-abstract-{}", rand::random::<u32>());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt;
        let a =
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&a).unwrap()
    };
    let mut r = Runner::start(Options {
        extra: format!(
            "box_dns = \"{}\"\negress_allow = [\"10.199.0.0/16\"]\n",
            inet.addr
        ),
        ..Default::default()
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let probe = common::build_static(work.path(), "probe", common::PROBE_SOURCE);
    let layout = work.path().join("probe.tar");
    common::busybox_image_with(
        &layout,
        &[
            ("probe", std::fs::read(&probe).unwrap(), 0o755),
            ("www/index.html", b"box-server".to_vec(), 0o644),
        ],
    );
    r.import_image("probe", &layout).await;
    let make = |network: bool, allow: &[&str]| {
        let mut s = common::spec(uuid::Uuid::new_v4(), 128, network);
        s.image = "probe".into();
        s.egress_allow = allow.iter().map(|a| a.parse().unwrap()).collect();
        s
    };
    let (a, b, allowed, none) = (
        make(true, &[]),
        make(true, &[]),
        make(true, &[&format!("{}/32", inet.private_addr)]),
        make(false, &[]),
    );
    for s in [&a, &b, &allowed, &none] {
        r.try_create(s.clone()).await.unwrap();
    }
    let (a, b, allowed, none) = (a.id, b.id, allowed.id, none.id);
    let (a_addr, gw) = box_addresses(&r, a).await;
    let (b_addr, _) = box_addresses(&r, b).await;
    assert_ne!(a_addr, b_addr);

    // The internet works, by address and through the resolver path.
    let out = fetch(&r, a, &format!("http://{}:8080/", inet.addr)).await;
    assert!(out.contains(&format!("internet:{}", inet.addr)), "{out}");
    let (out, _) = r.sh(a, "cat /etc/resolv.conf").await;
    assert!(out.contains(&format!("nameserver {gw}")), "{out}");
    let (out, _) = r.sh(a, &format!("/probe udp {gw} 53 hello")).await;
    assert!(
        out.contains("udp=dns-echo:hello"),
        "the resolver path: {out}"
    );

    // Nothing of the host: its loopback services, its addresses (also the
    // gateway's), the runner's API, other ports of the gateway, metadata.
    let urls = [
        format!("http://127.0.0.1:{loopback_port}/"),
        format!("http://127.0.0.1:{}/api/health", r.port),
        format!("http://{gw}:{any_port}/"),
        format!("http://{gw}:{}/api/health", r.port),
        format!("http://{}:{any_port}/", inet.host_addr),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://{}:8080/", inet.private_addr),
    ];
    for (url, out) in urls.iter().zip(fetch_all(&r, a, &urls).await) {
        assert!(out.contains(" rc="), "{url}: no result: {out}");
        assert!(
            !out.contains("host-") && !out.contains("internet:") && !out.contains("\"status\""),
            "{url}: {out}"
        );
        assert!(!out.contains(" rc=0"), "{url} answered: {out}");
    }
    let (out, _) = r
        .sh(
            a,
            &format!(
                "/probe udp {gw} 54 hello; /probe udp {} 53 direct",
                inet.host_addr
            ),
        )
        .await;
    assert!(!out.contains("dns-echo"), "{out}");
    let (out, _) = r.sh(a, &format!("/probe abstract {abstract_name}")).await;
    assert!(
        out.contains("abstract=refused"),
        "the host's abstract socket: {out}"
    );
    drop(abstract_listener);

    // Not another box: box B serves on its own address, A cannot connect.
    let (ws, _) = Ws::open(
        &r,
        b,
        &ExecStart {
            command: vec![
                "busybox".into(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "9000".into(),
                "-h".into(),
                "/www".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    ws.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = fetch(&r, b, "http://127.0.0.1:9000/").await;
    assert!(
        out.contains("box-server rc=0"),
        "box B's own server runs: {out}"
    );
    let out = fetch(&r, a, &format!("http://{b_addr}:9000/")).await;
    assert!(
        !out.contains("box-server") && !out.contains(" rc=0"),
        "box A reached box B: {out}"
    );
    // A box listening on a port is not listening on the host.
    assert!(std::net::TcpStream::connect(("127.0.0.1", 9000)).is_err());

    // A box cannot give itself another address (to borrow B's allowances).
    let (out, _) = r
        .sh(
            a,
            &format!("ip addr add {b_addr}/32 dev eth0 2>&1; echo rc=$?"),
        )
        .await;
    assert!(!out.contains("rc=0"), "{out}");

    // The allow-list opens exactly the private destination it names.
    let out = fetch(&r, allowed, &format!("http://{}:8080/", inet.private_addr)).await;
    assert!(
        out.contains(&format!("internet:{}", inet.private_addr)),
        "{out}"
    );
    let out = fetch(&r, allowed, &format!("http://127.0.0.1:{loopback_port}/")).await;
    assert!(!out.contains("host-loopback"), "{out}");

    // A `none` box has its loopback and nothing else.
    let (out, _) = r.sh(none, "ip -o link | awk '{print $2}'").await;
    assert_eq!(out.trim(), "lo:", "{out}");
    let out = fetch(&r, none, &format!("http://{}:8080/", inet.addr)).await;
    assert!(!out.contains("internet:"), "{out}");

    // Refused up front: an allow-list outside the stage's, or on a none box,
    // or naming what nothing may reach.
    for (network, allow) in [
        (true, "192.168.0.0/16"),
        (false, "10.199.0.0/16"),
        (true, "169.254.169.254/32"),
    ] {
        let e = r.try_create(make(network, &[allow])).await.unwrap_err();
        assert!(e.contains("egress_allow"), "{allow}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_have_no_vsock_raw_sockets_or_exotic_families() {
    let mut r = Runner::start(Options::default()).await;
    let work = tempfile::tempdir().unwrap();
    let probe = common::build_static(work.path(), "probe", common::PROBE_SOURCE);
    let layout = work.path().join("probe.tar");
    common::busybox_image_with(&layout, &[("probe", std::fs::read(&probe).unwrap(), 0o755)]);
    r.import_image("probe", &layout).await;
    let mut s = common::spec(uuid::Uuid::new_v4(), 128, true);
    s.image = "probe".into();
    let id = s.id;
    r.try_create(s).await.unwrap();
    // AF_VSOCK (40), AF_PACKET (17), AF_BLUETOOTH (31), AF_ALG (38), AF_XDP (44), AF_CAN (29).
    for family in [40, 17, 31, 38, 44, 29] {
        let (out, code) = r.sh(id, &format!("/probe socket {family}")).await;
        assert_ne!(code, 0, "family {family}: {out}");
        assert!(
            out.contains("Address family not supported"),
            "family {family}: {out}"
        );
    }
    // The allowed ones still work.
    for family in [1, 2, 10, 16] {
        let (out, code) = r.sh(id, &format!("/probe socket {family}")).await;
        assert_eq!(code, 0, "family {family}: {out}");
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_have_ids_of_their_own_and_own_no_image() {
    let mut r = Runner::start(Options::default()).await;
    let work = tempfile::tempdir().unwrap();
    let probe = common::build_static(work.path(), "probe", common::PROBE_SOURCE);
    let layout = work.path().join("probe.tar");
    common::busybox_image_with(&layout, &[("probe", std::fs::read(&probe).unwrap(), 0o755)]);
    r.import_image("probe", &layout).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut s = common::spec(uuid::Uuid::new_v4(), 128, false);
        s.image = "probe".into();
        ids.push(s.id);
        r.try_create(s).await.unwrap();
    }
    let (a, b) = (ids[0], ids[1]);
    // Each box maps a range of its own, and nothing else.
    let (ra, rb) = (common::box_ids(&r, &a), common::box_ids(&r, &b));
    assert_ne!(ra.base, rb.base);
    assert!(ra.base.abs_diff(rb.base) >= 65536);
    for (id, range) in [(a, ra), (b, rb)] {
        let (out, _) = r.sh(id, "cat /proc/self/uid_map /proc/self/gid_map").await;
        let want = format!("0 {} 65536", range.base);
        let lines: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(lines, [want.clone(), want], "{out}");
    }
    // The image belongs to host root, not to any box; boxes see it as their root's.
    use std::os::unix::fs::MetadataExt;
    let rootfs = r.state.join("images/probe/rootfs");
    for f in ["bin/busybox", "probe", "bin"] {
        let m = std::fs::symlink_metadata(rootfs.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{f}");
    }
    let (out, _) = r.sh(a, "ls -ln /bin/busybox /probe").await;
    assert!(
        out.lines()
            .all(|l| l.split_whitespace().nth(2) == Some("0")),
        "{out}"
    );
    // A box may write into what its image holds (copied up into its own layer).
    let (out, code) = r
        .sh(a, "mkdir -p /etc && echo x > /etc/mine && cat /etc/mine")
        .await;
    assert_eq!((out.trim(), code), ("x", 0));
    // Kernel per-user limits are per box: A takes every inotify instance a
    // user may have and holds them; B still gets its own.
    let max: u32 = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (mut hog, _) = Ws::open(
        &r,
        a,
        &ExecStart {
            command: vec![
                "/probe".into(),
                "inotify".into(),
                (max + 10).to_string(),
                "30".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    assert!(hog.read_until("inotify=", Duration::from_secs(10)).await);
    let text = String::from_utf8_lossy(&hog.stdout).into_owned();
    assert!(
        text.contains(&format!("inotify={max} ")),
        "box A hit the per-user limit: {text}"
    );
    let (out, _) = r.sh(b, "/probe inotify 16").await;
    assert!(
        out.contains("inotify=16 ok"),
        "box B lost its inotify instances to box A: {out}"
    );
    hog.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_from_before_ranges_and_disks_moves_onto_them_at_its_next_start() {
    let mut r = Runner::start(Options::default()).await;
    let id = r.create_box(128, false).await;
    r.admin(runner_image::admin::AdminRequest::Stop { id })
        .await;
    r.kill9();
    // What an older runner left: no range in the record, no disk, its
    // writable layer a directory owned by the single box uid.
    let legacy = runner_image::config::DEFAULT_BOX_UID;
    let dir = r.box_dir(&id);
    let rec_path = dir.join("box.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    let old = common::box_ids(&r, &id);
    rec.as_object_mut().unwrap().remove("ids");
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    std::fs::remove_file(dir.join("disk.img")).unwrap();
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("data/d")).unwrap();
    std::fs::create_dir_all(dir.join("work/work")).unwrap();
    std::fs::write(upper.join("data/d/f"), "kept\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", upper.join("data/l")).unwrap();
    let chown_all = |root: &std::path::Path| {
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            std::os::unix::fs::lchown(&p, Some(legacy), Some(legacy)).unwrap();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
    };
    chown_all(&upper);
    // And its image, as older runners stored them: owned by the box uid, no ids recorded.
    let image = r.state.join("images/default");
    chown_all(&image.join("rootfs"));
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("image.json")).unwrap()).unwrap();
    info.as_object_mut().unwrap().remove("ids");
    std::fs::write(image.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    runner_image::ids::IdPool::new(
        legacy,
        std::path::Path::new(runner_image::config::DEFAULT_ID_CLAIMS_DIR),
    )
    .release(old, &dir);
    r.spawn().await;
    r.admin(runner_image::admin::AdminRequest::Start { id })
        .await;
    let new = common::box_ids(&r, &id);
    assert!(new.base > legacy && new.count == 65536);
    assert!(dir.join("disk.img").is_file() && !upper.exists() && !dir.join("work").exists());
    let (out, code) = r
        .sh(id, "cat /data/d/f && echo more >> /data/d/f && ls -ln /data && ls -ln /bin/busybox && echo y > /etc/new")
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("kept\n"), "{out}");
    let busybox = out
        .lines()
        .find(|l| l.ends_with("/bin/busybox"))
        .unwrap_or_default();
    assert_eq!(
        busybox.split_whitespace().nth(2),
        Some("0"),
        "the old image is the box root's: {out}"
    );
    use std::os::unix::fs::MetadataExt;
    let upper = r.upper(&id).await;
    for p in ["", "data", "data/d", "data/d/f", "data/l", "etc/new"] {
        let m = std::fs::symlink_metadata(upper.join(p)).unwrap();
        assert_eq!(m.uid(), new.base, "{p}");
    }
    assert_eq!(
        std::fs::read_link(upper.join("data/l")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
}

/// Finding 3: a box cannot write past its disk: it gets ENOSPC, and its disk
/// takes no more of the host than its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_cannot_write_past_its_disk() {
    let r = Runner::start(Options::default()).await;
    let mut spec = common::spec(uuid::Uuid::new_v4(), 128, false);
    spec.resources.disk_mib = 64;
    let id = spec.id;
    r.try_create(spec).await.unwrap();
    let (out, _) = r
        .sh(
            id,
            "dd if=/dev/zero of=/fill bs=1M count=200 2>&1; echo rc=$?; df -k / | tail -1",
        )
        .await;
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("rc=0"), "{out}");
    let image = runner_image::disk::image_path(&r.box_dir(&id));
    let used = runner_image::disk::usage_bytes(&image).unwrap();
    assert!(used <= 65 << 20, "the disk took {used} bytes of the host");
    // The box goes on working once it frees space.
    let (out, code) = r.sh(id, "rm /fill && echo ok > /after && cat /after").await;
    assert_eq!((out.trim(), code), ("ok", 0));
    // The box's mounts name no host path.
    let (out, _) = r.sh(id, "cat /proc/self/mountinfo").await;
    let state = r.state.display().to_string();
    assert!(
        !out.contains(&state) && !out.contains("/boxes/") && !out.contains("disk.img"),
        "{out}"
    );
    assert!(out.contains("upperdir=/proc/self/fd/"), "{out}");
}
