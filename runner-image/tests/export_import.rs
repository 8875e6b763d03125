//! Export a box with its SHA-256 and restore it under the same id on another runner.

mod common;

use common::{Options, Runner};
use protocol::BoxState;
use runner_image::admin::AdminRequest;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_under_the_same_id_on_another_runner() {
    let a = Runner::start(Options::default()).await;
    let b = Runner::start(Options::default()).await;
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
    // Importing an id that exists is refused, and loses nothing.
    let resp = client
        .post(format!("{}/api/boxes/{id}/import", b.url()))
        .bearer_auth(common::KEY)
        .header("x-boxlite-sha256", &sha)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let (out, _) = b.sh(id, "cat /root/work/file").await;
    assert_eq!(out.trim(), "payload");
}
