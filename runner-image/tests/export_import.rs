//! Export a box with its SHA-256 and restore it under the same id on another
//! runner — only when the control plane announced the import, and never
//! through an archive that reaches out of the box.

mod common;

use common::{FakeCp, Options, Runner};
use std::time::Duration;

use protocol::{BoxState, IMPORT_TOKEN_HEADER};
use runner_image::admin::AdminRequest;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_under_the_same_id_on_another_runner() {
    let a = Runner::start(Options::default()).await;
    let (cp, b) = announcing_runner().await;
    let id = a.create_box(128, false).await;
    // Files written, an image file deleted (whiteout), a directory replaced (opaque),
    // a symlink and a hard link.
    let (_, code) = a
        .sh(
            id,
            "mkdir -p /root/work && echo payload > /root/work/file && ln -s /root/work/file /root/link \
             && ln /root/work/file /root/hard && rm /etc/os-release \
             && rm -rf /home && mkdir /home && echo fresh > /home/only",
        )
        .await;
    assert_eq!(code, 0);
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/api/boxes/{id}/export", a.url()))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let sha = resp
        .headers()
        .get("x-boxlite-sha256")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&body)),
        sha,
        "header matches body"
    );
    // The box kept running through the export (it was frozen only meanwhile).
    let (out, _) = a.sh(id, "echo after-export").await;
    assert_eq!(out.trim(), "after-export");
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(a.state.join("tmp")).unwrap().count(), 0);

    // A corrupted archive or wrong checksum is refused and leaves nothing behind.
    let mut bad = body.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let resp = client
        .post(format!("{}/api/boxes/{id}/import", b.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", &sha)
        .header(IMPORT_TOKEN_HEADER, cp.announce_import(id, TTL))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: protocol::ApiError = resp.json().await.unwrap();
    assert_eq!(e.code, "checksum_mismatch");
    assert!(!b.box_dir(&id).exists());
    assert!(b.status().await.boxes.is_empty());
    let resp = client
        .post(format!("{}/api/boxes/{id}/import", b.url()))
        .bearer_auth(common::KEY)
        .header(IMPORT_TOKEN_HEADER, cp.announce_import(id, TTL))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "the checksum header is required");
    // Under another id: refused (the archive names its box).
    let other = uuid::Uuid::new_v4();
    let resp = client
        .post(format!("{}/api/boxes/{other}/import", b.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", &sha)
        .header(IMPORT_TOKEN_HEADER, cp.announce_import(other, TTL))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(!b.box_dir(&other).exists());

    // The real thing.
    let resp = client
        .post(format!("{}/api/boxes/{id}/import", b.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", &sha)
        .header(IMPORT_TOKEN_HEADER, cp.announce_import(id, TTL))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let st = b.status().await;
    assert_eq!(st.boxes.len(), 1);
    assert_eq!((st.boxes[0].id, st.boxes[0].state), (id, BoxState::Stopped));
    b.admin(AdminRequest::Start { id }).await;
    let (out, code) = b
        .sh(
            id,
            "cat /root/work/file; readlink /root/link; cat /root/hard; \
             ls /etc/os-release 2>&1; ls /home; echo $BOX_GREETING",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "payload");
    assert_eq!(lines[1], "/root/work/file");
    assert_eq!(lines[2], "payload");
    assert!(
        lines[3].contains("No such file"),
        "whiteout restored: {out}"
    );
    assert_eq!(lines[4], "only", "opaque directory restored: {out}");
    assert_eq!(lines[5], "hello", "spec restored");
    // Importing an id that exists is refused, even announced, and loses nothing.
    let resp = client
        .post(format!("{}/api/boxes/{id}/import", b.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", &sha)
        .header(IMPORT_TOKEN_HEADER, cp.announce_import(id, TTL))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let (out, _) = b.sh(id, "cat /root/work/file").await;
    assert_eq!(out.trim(), "payload");
}

/// How long test import tokens are valid.
const TTL: time::Duration = time::Duration::minutes(2);

/// A runner whose (fake) control plane announces imports.
async fn announcing_runner() -> (FakeCp, Runner) {
    let cp = FakeCp::start("bxr_import-token", common::KEY).await;
    let r = Runner::start(Options {
        control_plane: Some(cp.url.clone()),
        token: Some("bxr_import-token".into()),
        ..Default::default()
    })
    .await;
    cp.wait_for(Duration::from_secs(15), |_| true).await;
    (cp, r)
}

/// A box archive for `id` with a valid metadata entry, then whatever `entries` appends.
fn archive_with(
    id: uuid::Uuid,
    entries: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>),
) -> (Vec<u8>, String) {
    archive_of(common::spec(id, 128, false), entries)
}

/// A box archive of `spec` with a valid metadata entry, then whatever `entries` appends.
fn archive_of(
    spec: protocol::BoxSpec,
    entries: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>),
) -> (Vec<u8>, String) {
    use runner_image::export::{ExportMeta, FORMAT, META_ENTRY};
    let id = spec.id;
    let meta = ExportMeta {
        format: FORMAT,
        box_id: id,
        spec,
        image_digest: String::new(),
        created_at: "2030-01-01T00:00:00Z".into(),
        exported_at: "2030-01-01T00:00:00Z".into(),
        source_runner: "elsewhere".into(),
    };
    let json = serde_json::to_vec(&meta).unwrap();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(json.len() as u64);
    b.append_data(&mut h, META_ENTRY, &json[..]).unwrap();
    entries(&mut b);
    let bytes = b.into_inner().unwrap().finish().unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    (bytes, sha)
}

type Tar = tar::Builder<flate2::write::GzEncoder<Vec<u8>>>;

fn dir(b: &mut Tar, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn file(b: &mut Tar, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn link(b: &mut Tar, kind: tar::EntryType, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// Owner, mode and entries of a directory, to compare before and after.
fn fingerprint(p: &std::path::Path) -> (u32, u32, u32, Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (m.uid(), m.gid(), m.mode(), names)
}

/// POST an archive to the import endpoint with `token`; the status and `code: message`.
async fn post_import(
    r: &Runner,
    id: uuid::Uuid,
    body: Vec<u8>,
    sha: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/boxes/{id}/import", r.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", sha);
    if let Some(t) = token {
        req = req.header(IMPORT_TOKEN_HEADER, t);
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let code = serde_json::from_str::<protocol::ApiError>(&text)
        .map(|e| format!("{}: {}", e.code, e.message))
        .unwrap_or(text);
    (status, code)
}

/// Finding 1 of issue 12: an archive whose `upper` is not a directory — a
/// symlink to a host directory (standing for /etc) or to the image every box
/// shares, a file — is refused, and the target keeps its owner, mode and
/// content. Entries that try to write through a symlink or hard-link out of
/// the box are refused too. Nothing stays behind in the runner's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_archives_that_reach_out_of_the_box() {
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType::{Link, Symlink};
    let (cp, r) = announcing_runner().await;
    // A root-owned host directory standing for /etc.
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("etc");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let v = victim.to_str().unwrap().to_string();
    let rootfs = r.state.join("images/default/rootfs");
    assert!(rootfs.is_dir());
    let rootfs_s = rootfs.to_str().unwrap().to_string();
    let victim_before = fingerprint(&victim);
    assert_eq!(victim_before.0, 0, "the stand-in for /etc is root's");
    let rootfs_before = fingerprint(&rootfs);

    type Case = (&'static str, Box<dyn FnOnce(&mut Tar)>);
    let (v1, v2, v3, v4, v5, r1) = (
        v.clone(),
        v.clone(),
        v.clone(),
        v.clone(),
        v.clone(),
        rootfs_s,
    );
    let cases: Vec<Case> = vec![
        (
            "upper is a symlink to a host directory",
            Box::new(move |b| link(b, Symlink, "upper", &v1)),
        ),
        (
            "upper is a symlink to the shared image",
            Box::new(move |b| link(b, Symlink, "upper", &r1)),
        ),
        (
            "upper is a relative symlink to the shared image",
            Box::new(|b| link(b, Symlink, "upper", "../../images/default/rootfs")),
        ),
        (
            "upper is a regular file",
            Box::new(|b| file(b, "upper", b"not a directory")),
        ),
        (
            "upper is a directory first, then replaced by a symlink",
            Box::new(move |b| {
                dir(b, "upper/");
                file(b, "upper/f", b"x");
                link(b, Symlink, "upper", &v2);
            }),
        ),
        (
            "a symlink below upper, then an entry written through it",
            Box::new(move |b| {
                dir(b, "upper/");
                link(b, Symlink, "upper/evil", &v3);
                file(b, "upper/evil/pwned", b"x");
            }),
        ),
        (
            "a symlink below upper resolving to a directory the archive made",
            Box::new(move |b| {
                dir(b, "upper/");
                link(b, Symlink, "upper/evil", &v4);
                dir(b, &format!("{}/", v4.trim_start_matches('/')));
                file(b, "upper/evil/pwned", b"x");
            }),
        ),
        (
            "a hard link to a host file",
            Box::new(move |b| {
                dir(b, "upper/");
                link(b, Link, "upper/h", &format!("{v5}/hosts"));
            }),
        ),
    ];
    for (what, entries) in cases {
        let id = uuid::Uuid::new_v4();
        let (body, sha) = archive_with(id, entries);
        let token = cp.announce_import(id, TTL);
        let (status, err) = post_import(&r, id, body, &sha, Some(&token)).await;
        assert_eq!(status, 400, "{what}: {err}");
        assert!(err.starts_with("bad_request"), "{what}: {err}");
        assert_eq!(
            fingerprint(&victim),
            victim_before,
            "{what}: host directory changed"
        );
        assert_eq!(
            fingerprint(&rootfs),
            rootfs_before,
            "{what}: shared image changed"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::metadata(victim.join("hosts")).unwrap().nlink(),
            1,
            "{what}"
        );
        assert!(!r.box_dir(&id).exists(), "{what}");
        let left: Vec<_> = std::fs::read_dir(r.state.join("boxes")).unwrap().collect();
        assert!(left.is_empty(), "{what}: left behind {left:?}");
        assert_eq!(std::fs::read_dir(r.state.join("tmp")).unwrap().count(), 0);
        assert!(r.status().await.boxes.is_empty(), "{what}");
    }
    // The refusal names the problem.
    let id = uuid::Uuid::new_v4();
    let (body, sha) = archive_with(id, |b| link(b, Symlink, "upper", &v));
    let token = cp.announce_import(id, TTL);
    let (_, err) = post_import(&r, id, body, &sha, Some(&token)).await;
    assert!(err.contains("`upper`") && err.contains("symlink"), "{err}");
    // A well-formed archive still imports.
    let id = uuid::Uuid::new_v4();
    let (body, sha) = archive_with(id, |b| {
        dir(b, "upper/");
        dir(b, "upper/root/");
        file(b, "upper/root/note", b"kept\n");
    });
    let token = cp.announce_import(id, TTL);
    let (status, err) = post_import(&r, id, body, &sha, Some(&token)).await;
    assert_eq!(status, 201, "{err}");
    assert_eq!(
        common::read_in_disk(&r, &id, "root/note").as_deref(),
        Some(&b"kept\n"[..])
    );
    r.admin(AdminRequest::Start { id }).await;
    let (out, code) = r
        .sh(
            id,
            "cat /root/note && echo new > /root/new && cat /root/new",
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "kept\nnew\n"));
}

/// Issue 12: an import is accepted only with the one-time token the control
/// plane announced for that box in the runner's healthcheck answer — not
/// without one, not with another, not after it expired, not twice, not for
/// another box — and a refused import writes nothing. The announcement may
/// reach the runner after the import: it checks in at once and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_only_when_announced() {
    let (cp, r) = announcing_runner().await;
    let good = |id| {
        archive_with(id, |b| {
            dir(b, "upper/");
            dir(b, "upper/root/");
            file(b, "upper/root/note", b"moved\n");
        })
    };
    let nothing_written = |r: &Runner, what: &str| {
        let left: Vec<_> = std::fs::read_dir(r.state.join("boxes")).unwrap().collect();
        assert!(left.is_empty(), "{what}: left behind {left:?}");
        assert_eq!(
            std::fs::read_dir(r.state.join("tmp")).unwrap().count(),
            0,
            "{what}"
        );
    };
    let id = uuid::Uuid::new_v4();
    let (body, sha) = good(id);

    let (s, e) = post_import(&r, id, body.clone(), &sha, None).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (400, "import_token_required"),
        "{e}"
    );
    nothing_written(&r, "no token");
    // The runner's bearer key alone is not enough: nothing was announced.
    let t0 = std::time::Instant::now();
    let (s, e) = post_import(&r, id, body.clone(), &sha, Some("bxi_made-up")).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (403, "import_not_announced"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(9), "bounded wait");
    nothing_written(&r, "not announced");

    let token = cp.announce_import(id, TTL);
    let (s, e) = post_import(&r, id, body.clone(), &sha, Some("bxi_wrong")).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (403, "import_token_invalid"),
        "{e}"
    );
    // The token of one box does not import another.
    let other = uuid::Uuid::new_v4();
    let (ob, osha) = good(other);
    let (s, e) = post_import(&r, other, ob, &osha, Some(&token)).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (403, "import_not_announced"),
        "{e}"
    );
    nothing_written(&r, "wrong token");
    // Expired.
    let late = uuid::Uuid::new_v4();
    let (lb, lsha) = good(late);
    let expired = cp.announce_import(late, -time::Duration::seconds(1));
    let (s, e) = post_import(&r, late, lb, &lsha, Some(&expired)).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (403, "import_token_expired"),
        "{e}"
    );
    nothing_written(&r, "expired");

    // Announced a moment ago (the runner has not checked in since, and knows
    // only the earlier token): it checks in at once, and accepts.
    let token = cp.announce_import(id, TTL);
    let (s, e) = post_import(&r, id, body.clone(), &sha, Some(&token)).await;
    assert_eq!(s, 201, "{e}");
    assert!(common::read_in_disk(&r, &id, "root/note").is_some());

    // Once only: a token spent on an import that failed cannot be replayed.
    let again = uuid::Uuid::new_v4();
    let (ab, asha) = good(again);
    let once = cp.announce_import(again, TTL);
    let mut corrupt = ab.clone();
    let n = corrupt.len() / 2;
    corrupt[n] ^= 0xff;
    let (s, e) = post_import(&r, again, corrupt, &asha, Some(&once)).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (400, "checksum_mismatch"),
        "{e}"
    );
    // (still announced by the control plane, level-triggered)
    let (s, e) = post_import(&r, again, ab, &asha, Some(&once)).await;
    assert_eq!(
        (s, e.split(':').next().unwrap()),
        (403, "import_token_used"),
        "{e}"
    );
    assert!(!r.box_dir(&again).exists());
    // A box the runner has: refused whatever the token, and kept.
    let fresh = cp.announce_import(id, TTL);
    let (s, e) = post_import(&r, id, body, &sha, Some(&fresh)).await;
    assert_eq!(s, 409, "{e}");
    assert!(common::read_in_disk(&r, &id, "root/note").is_some());
    assert_eq!(r.status().await.boxes.len(), 1);
}

/// Issue 12, finding 3: a sparse file stays sparse through a move (it used
/// to turn into real blocks, as many as its length), and an archive holding
/// more than the target box's disk is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_survive_a_move_and_archives_bigger_than_the_disk_are_refused() {
    let a = Runner::start(Options::default()).await;
    let (cp, b) = announcing_runner().await;
    let mut spec = common::spec(uuid::Uuid::new_v4(), 128, false);
    spec.resources.disk_mib = 64;
    let id = spec.id;
    a.try_create(spec).await.unwrap();
    // A 2 GiB file in a 64 MiB box: 4 bytes of data, the rest a hole.
    let (out, code) = a
        .sh(id, "printf data > /sparse && dd if=/dev/zero of=/sparse bs=1 count=1 seek=2147483647 conv=notrunc 2>&1 && ls -l /sparse")
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2147483648"), "{out}");
    a.admin(AdminRequest::Stop { id }).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/boxes/{id}/export", a.url()))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let sha = resp.headers()["x-boxlite-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap().to_vec();
    assert!(
        body.len() < 1 << 20,
        "the archive carries the hole: {} bytes",
        body.len()
    );
    let token = cp.announce_import(id, TTL);
    let (status, err) = post_import(&b, id, body, &sha, Some(&token)).await;
    assert_eq!(status, 201, "{err}");
    let image = runner_image::disk::image_path(&b.box_dir(&id));
    let used = runner_image::disk::usage_bytes(&image).unwrap();
    assert!(
        used < 16 << 20,
        "the imported disk takes {used} bytes of the host"
    );
    b.admin(AdminRequest::Start { id }).await;
    let (out, code) = b.sh(id, "ls -l /sparse && head -c 4 /sparse").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2147483648") && out.ends_with("data"), "{out}");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(b.upper(&id).await.join("sparse")).unwrap();
    assert_eq!(m.len(), 2 << 30);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );

    // 32 MiB of content for a 16 MiB disk: refused, nothing left behind.
    let mut small = common::spec(uuid::Uuid::new_v4(), 128, false);
    small.resources.disk_mib = 16;
    let big = small.id;
    let (body, sha) = archive_of(small, |t| {
        dir(t, "upper/");
        file(t, "upper/big", &vec![7u8; 32 << 20]);
    });
    let token = cp.announce_import(big, TTL);
    let (status, err) = post_import(&b, big, body, &sha, Some(&token)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("more than the box's 16 MiB disk"), "{err}");
    assert!(!b.box_dir(&big).exists());
    assert_eq!(std::fs::read_dir(b.state.join("tmp")).unwrap().count(), 0);
}
