//! The runner host recipe (`templates/runner/`), rendered the way boxctl
//! renders it and checked with the real tools: `cloud-init schema` and
//! `systemd-analyze verify`. The AppArmor profile is held to the rules of
//! Ubuntu 25.04's `bwrap-userns-restrict` (Debian 12's apparmor_parser is too
//! old to parse `userns`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use stack::template::Template;

macro_rules! tpl {
    ($path:literal) => {
        Template {
            name: $path,
            text: include_str!(concat!("../../templates/", $path)),
        }
    };
}

const CLOUD_INIT: Template = tpl!("runner/cloud-init.yaml");
const UNIT: Template = tpl!("runner/boxlite-runner.service");
const SLICE: Template = tpl!("runner/boxlite.slice");
const PROFILE: Template = tpl!("runner/bwrap-userns-restrict");
const CONFIG: Template = tpl!("runner/runner.toml");
const BOOTSTRAP: Template = tpl!("runner/bootstrap.sh");
const SOCKET: Template = tpl!("runner/boxlite-runner.socket");

/// Every variable the runner templates use, with sample values.
fn vars() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("name", "runner-2".to_string()),
        ("stage", "prod".to_string()),
        ("port", "7100".to_string()),
        ("advertise_url", "http://10.42.1.17:7100".to_string()),
        ("control_plane_url", "https://api.example.com".to_string()),
        (
            "artifact_url",
            "s3://boxlite-prod-artifacts/runner/0.1.0/boxlite-runner.tar.gz".to_string(),
        ),
        ("artifact_sha256", "ab".repeat(32)),
        ("region", "eu-west-1".to_string()),
        (
            "token_parameter",
            "/boxlite/prod/runner-2/token".to_string(),
        ),
    ])
}

fn render(t: &Template) -> String {
    let out = t.render(&vars()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.contains("{{") && !out.contains("}}"), "{}", t.name);
    out
}

/// The `content: |` block of a `write_files` entry, de-indented.
fn written_file(cloud_init: &str, path: &str) -> String {
    let marker = format!("  - path: {path}\n");
    let start = cloud_init
        .find(&marker)
        .unwrap_or_else(|| panic!("{path} not in write_files"));
    let rest = &cloud_init[start + marker.len()..];
    let body_start = rest.find("    content: |\n").unwrap() + "    content: |\n".len();
    let mut out = String::new();
    for line in rest[body_start..].lines() {
        if line.is_empty() {
            out.push('\n');
        } else if let Some(l) = line.strip_prefix("      ") {
            out.push_str(l);
            out.push('\n');
        } else {
            break;
        }
    }
    // Blank lines at the end belong to the YAML, not the file.
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

#[test]
fn cloud_init_is_valid_and_carries_exact_copies_of_the_files() {
    let ci = render(&CLOUD_INIT);
    assert!(ci.starts_with("#cloud-config\n"));
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("user-data.yaml");
    std::fs::write(&f, &ci).unwrap();
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&f)
        .output()
        .expect("cloud-init (Debian package cloud-init) is needed for this test");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, t) in [
        ("/etc/apparmor.d/bwrap-userns-restrict", &PROFILE),
        ("/etc/systemd/system/boxlite.slice", &SLICE),
        ("/etc/systemd/system/boxlite-runner.service", &UNIT),
        ("/etc/boxlite/runner.toml", &CONFIG),
        ("/usr/local/lib/boxlite/bootstrap.sh", &BOOTSTRAP),
        ("/etc/systemd/system/boxlite-runner.socket", &SOCKET),
    ] {
        assert_eq!(
            written_file(&ci, path),
            render(t),
            "{path} differs from {}",
            t.name
        );
    }
    for pkg in [
        "bubblewrap",
        "busybox-static",
        "nftables",
        "iproute2",
        "e2fsprogs",
    ] {
        assert!(ci.contains(&format!("  - {pkg}\n")), "{pkg} not installed");
    }
    // The host-wide user namespace restriction stays on.
    assert!(ci.contains("kernel.apparmor_restrict_unprivileged_userns = 1"));
    assert!(!ci.contains("apparmor_restrict_unprivileged_userns = 0"));
    assert!(!ci.contains("apparmor_restrict_unprivileged_userns=0"));
    assert!(ci.contains("runcmd:\n  - [/usr/local/lib/boxlite/bootstrap.sh]"));
}

/// The runner API's socket is systemd's, so an agent restart or upgrade
/// never leaves the port closed (or free for anyone else to bind), and the
/// bootstrap checks the tools box isolation needs before starting anything.
#[test]
fn the_api_socket_outlives_agent_restarts_and_the_host_has_what_boxes_need() {
    let socket = render(&SOCKET);
    let config = runner_image::config::Config::parse(&render(&CONFIG), Path::new("/")).unwrap();
    assert!(
        socket.contains(&format!("ListenStream={}", config.listen)),
        "the socket listens where runner.toml says: {socket}"
    );
    let unit = render(&UNIT);
    assert!(unit.contains("Requires=boxlite-runner.socket"), "{unit}");
    let b = render(&BOOTSTRAP);
    for t in ["ip", "nft", "mkfs.ext4", "e2fsck", "/dev/loop-control"] {
        assert!(b.contains(t), "{t} not checked");
    }
    let check = b.find("for t in ip nft").unwrap();
    let start = b.find("systemctl enable --now boxlite-runner.socket boxlite-runner.service");
    assert!(start.is_some_and(|s| check < s), "{b}");
    // Nothing of the old shared-network firewall is left.
    assert!(!render(&CLOUD_INIT).contains("skuid"));
}

#[test]
fn bootstrap_checks_the_artifact_before_installing_it() {
    let b = render(&BOOTSTRAP);
    let check = b.find("sha256sum -c").expect("checksum check");
    let install = b.find("install -D -m 0755").expect("install");
    let start = b
        .find("systemctl enable --now boxlite-runner.socket boxlite-runner.service")
        .unwrap();
    assert!(check < install && install < start);
    assert!(b.starts_with("#!/bin/bash\n"));
    assert!(b.contains("set -euo pipefail"));
    // The token comes from SSM, not from the user data.
    assert!(b.contains("aws ssm get-parameter"));
    assert!(!b.contains("bxr_"));
    // It is a shell script bash accepts.
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("bootstrap.sh");
    std::fs::write(&f, &b).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success());
}

#[test]
fn runner_config_parses_with_the_agents_own_loader() {
    let c = runner_image::config::Config::parse(&render(&CONFIG), Path::new("/")).unwrap();
    assert_eq!(c.name, "runner-2");
    assert_eq!(c.listen.port(), 7100);
    assert_eq!(c.state_dir, Path::new("/var/lib/boxlite/runner"));
    assert_eq!(c.cgroup_mode, runner_image::config::CgroupMode::Systemd);
}

#[test]
fn systemd_units_verify_and_restarts_spare_the_boxes() {
    let unit = render(&UNIT);
    let slice = render(&SLICE);
    // Restarting or stopping the agent signals only its main process; boxes
    // are in their own delegated scopes.
    let service: Vec<&str> = unit.lines().map(str::trim).collect();
    assert!(service.contains(&"KillMode=process"));
    assert!(service.contains(&"Delegate=yes"));
    assert!(service.contains(&"Restart=always"));
    for forbidden in [
        "PrivateTmp=",
        "ProtectSystem=",
        "PrivateMounts=",
        "KillMode=control-group",
    ] {
        assert!(!unit.contains(forbidden), "{forbidden}");
    }
    // A root with the host's systemd units and a stand-in binary at the
    // unit's ExecStart path, so verify checks everything it can.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
    let st = Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(r.join("lib/systemd/"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(
        env!("CARGO_BIN_EXE_boxlite-runner"),
        r.join("usr/local/bin/boxlite-runner"),
    )
    .unwrap();
    std::fs::write(r.join("etc/systemd/system/boxlite-runner.service"), &unit).unwrap();
    std::fs::write(r.join("etc/systemd/system/boxlite.slice"), &slice).unwrap();
    std::fs::write(
        r.join("etc/systemd/system/boxlite-runner.socket"),
        render(&SOCKET),
    )
    .unwrap();
    for u in [
        "boxlite-runner.service",
        "boxlite.slice",
        "boxlite-runner.socket",
    ] {
        let out = Command::new("systemd-analyze")
            .arg(format!("--root={}", r.display()))
            .args(["verify", &format!("/etc/systemd/system/{u}")])
            .output()
            .expect("systemd-analyze (Debian package systemd) is needed for this test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{u}: {stderr}");
        assert!(stderr.trim().is_empty(), "{u}: {stderr}");
    }
}

/// The profile, parsed just enough to hold it to the rules of Ubuntu 25.04's
/// bwrap-userns-restrict. Returns what is wrong.
fn check_profile(text: &str) -> Result<(), String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with("include if exists"))
        .collect();
    let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
    need(
        lines.contains(&"abi <abi/4.0>,"),
        "abi 4.0 (needed for userns rules)",
    )?;
    need(
        lines.contains(&"include <tunables/global>"),
        "include <tunables/global>",
    )?;
    let mut profiles: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for l in &lines {
        if let Some(head) = l.strip_prefix("profile ") {
            need(current.is_none(), "nested profile")?;
            let head = head.trim_end_matches('{').trim();
            let mut parts = head.split_whitespace();
            let name = parts.next().unwrap_or("").to_string();
            let rest: Vec<&str> = parts.collect();
            profiles.insert(name.clone(), (rest.join(" "), vec![]));
            current = Some(name);
            continue;
        }
        if *l == "}" {
            need(current.take().is_some(), "unbalanced braces")?;
            continue;
        }
        match &current {
            Some(c) => {
                need(
                    l.ends_with(','),
                    &format!("rule without trailing comma: {l}"),
                )?;
                profiles.get_mut(c).unwrap().1.push(l.to_string());
            }
            None => need(
                l.starts_with("abi ") || l.starts_with("include "),
                &format!("rule outside a profile: {l}"),
            )?,
        }
    }
    need(current.is_none(), "unbalanced braces")?;
    need(
        profiles.keys().map(String::as_str).collect::<Vec<_>>() == ["bwrap", "unpriv_bwrap"],
        "exactly the bwrap profile and its restricted child profile",
    )?;
    // bwrap: attached to /usr/bin/bwrap only; user namespaces and capabilities
    // (unconfined in effect); what it runs goes to the stacked child profile.
    let (head, rules) = &profiles["bwrap"];
    need(
        head.starts_with("/usr/bin/bwrap "),
        "bwrap attaches to /usr/bin/bwrap only",
    )?;
    need(
        head.contains("attach_disconnected"),
        "bwrap flags attach_disconnected",
    )?;
    for r in [
        "allow userns,",
        "allow capability,",
        "allow file rwlkm /{**,},",
        "allow mount,",
        "allow pivot_root,",
    ] {
        need(rules.iter().any(|x| x == r), &format!("bwrap lacks {r}"))?;
    }
    need(
        rules.iter().any(|x| {
            x == "allow px /** -> bwrap//&unpriv_bwrap,"
                || x == "allow pix /** -> &bwrap//&unpriv_bwrap,"
        }),
        "bwrap must move what it runs to the restricted child profile",
    )?;
    // unpriv_bwrap: reached only through bwrap, no capabilities.
    let (head, rules) = &profiles["unpriv_bwrap"];
    need(!head.contains('/'), "the child profile attaches to no path")?;
    need(
        head.contains("attach_disconnected"),
        "unpriv_bwrap flags attach_disconnected",
    )?;
    need(
        rules.iter().any(|x| x == "audit deny capability,"),
        "unpriv_bwrap denies capabilities",
    )?;
    need(
        !rules.iter().any(|x| x.starts_with("allow capability")),
        "unpriv_bwrap must not allow capabilities",
    )?;
    need(
        rules.iter().any(|x| x == "allow userns,"),
        "unpriv_bwrap allow userns",
    )?;
    need(
        rules.iter().any(|x| x == "allow pix /** -> &unpriv_bwrap,"),
        "unpriv_bwrap keeps its children confined",
    )?;
    need(!text.contains("unconfined"), "no unconfined profile")?;
    Ok(())
}

#[test]
fn apparmor_profile_follows_ubuntus_bwrap_userns_restrict() {
    let text = render(&PROFILE);
    check_profile(&text).unwrap();
    // The check is not vacuous: each of these breaks a rule.
    for (from, to) in [
        ("abi <abi/4.0>,", ""),
        ("  audit deny capability,\n", ""),
        ("profile bwrap /usr/bin/bwrap ", "profile bwrap /usr/bin/* "),
        (
            "  allow pix /** -> &unpriv_bwrap,\n",
            "  allow pix /** -> &unpriv_bwrap,\n  allow capability,\n",
        ),
        ("  allow px /** -> bwrap//&unpriv_bwrap,\n", ""),
        (
            "  allow userns,\n  allow mount,\n  allow umount,\n  allow pivot_root,\n  allow dbus,\n  allow px",
            "  allow mount,\n  allow umount,\n  allow pivot_root,\n  allow dbus,\n  allow px",
        ),
        (
            "profile unpriv_bwrap flags",
            "profile unpriv_bwrap /usr/bin/** flags",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let broken = text.replacen(from, to, 1);
        assert!(
            check_profile(&broken).is_err(),
            "not caught: {from:?} -> {to:?}"
        );
    }
}
