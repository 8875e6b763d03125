//! The deploy lock of an aws stage, in its S3 bucket: conditional writes
//! against moto, a second deploy that fails naming the holder or waits for
//! it, and a lock whose holder died that the next deploy takes over.

mod aws_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_support::{Env, wait};
use deployer::engine::lock::{Holder, LockInfo};
use deployer::engine::store::{Condition, StateStore, StoreError};
use deployer::providers::aws::store::{S3Store, STATE_PREFIX};
use testkit::aws_proxy::AwsProxy;

fn bucket() -> String {
    stack::resolve::aws::bucket_name("boxlite", "prod", "ap-southeast-1", "boxlite.example.com")
}

fn lock_key() -> String {
    format!("{STATE_PREFIX}lock.json")
}

/// The lock document in moto, read directly.
fn lock_in_moto(env: &Env) -> Option<LockInfo> {
    let c = env.clients();
    env.rt().block_on(async {
        let o =
            c.s3.get_object()
                .bucket(bucket())
                .key(lock_key())
                .send()
                .await
                .ok()?;
        let body = o.body.collect().await.ok()?.into_bytes();
        serde_json::from_slice(&body).ok()
    })
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_s3_store_makes_conditional_writes_and_deletes_atomic() {
    let env = Env::new();
    let c = env.clients();
    let rt = env.rt();
    rt.block_on(async {
        c.s3.create_bucket()
            .bucket("lock-contract")
            .create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::ApSoutheast1)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let store: Arc<dyn StateStore> = Arc::new(S3Store::new(c.s3.clone(), "lock-contract"));
        assert_eq!(store.get("lock.json").await.unwrap(), None);
        let e1 = store
            .put("lock.json", b"a".to_vec(), Condition::IfAbsent)
            .await
            .unwrap();
        assert_eq!(
            store
                .put("lock.json", b"b".to_vec(), Condition::IfAbsent)
                .await,
            Err(StoreError::PreconditionFailed),
            "If-None-Match: * refuses an existing object"
        );
        let e2 = store
            .put("lock.json", b"b".to_vec(), Condition::IfMatch(e1.clone()))
            .await
            .unwrap();
        assert_ne!(e1, e2);
        assert_eq!(
            store
                .put("lock.json", b"c".to_vec(), Condition::IfMatch(e1.clone()))
                .await,
            Err(StoreError::PreconditionFailed),
            "If-Match refuses a stale version"
        );
        assert_eq!(
            store.get("lock.json").await.unwrap(),
            Some((b"b".to_vec(), e2.clone()))
        );
        assert_eq!(
            store.delete("lock.json", Condition::IfMatch(e1)).await,
            Err(StoreError::PreconditionFailed),
            "a conditional delete of a stale version is refused"
        );
        store
            .delete("lock.json", Condition::IfMatch(e2.clone()))
            .await
            .unwrap();
        assert_eq!(store.get("lock.json").await.unwrap(), None);
        assert_eq!(
            store
                .put("lock.json", b"d".to_vec(), Condition::IfMatch(e2))
                .await,
            Err(StoreError::PreconditionFailed),
            "If-Match on a deleted object"
        );
        store
            .put("journal/2", b"x".to_vec(), Condition::None)
            .await
            .unwrap();
        store
            .put("journal/1", b"x".to_vec(), Condition::None)
            .await
            .unwrap();
        assert_eq!(
            store.list("journal/").await.unwrap(),
            ["journal/1", "journal/2"]
        );
        assert!(store.location().starts_with("s3://lock-contract/"));
        // A missing bucket reads as "no lock, no journal".
        let none = S3Store::new(c.s3.clone(), "no-such-bucket");
        assert_eq!(none.get("lock.json").await.unwrap(), None);
        assert!(none.list("journal/").await.unwrap().is_empty());
    });
}

#[test]
fn a_second_deploy_names_the_holder_or_waits_for_it() {
    let env = Env::new();
    // B talks through its own proxy, so holding A's calls does not hold B's.
    let other = AwsProxy::start(env.moto.url());
    let a = env
        .boxctl(&["deploy", "--stage", "prod"])
        .spawn()
        .expect("spawn deploy A");
    let a_pid = a.id();
    wait_for("A to take the lock", Duration::from_secs(120), || {
        lock_in_moto(&env).is_some_and(|l| l.holder.pid == a_pid)
    });
    // A holds the lock and cannot progress until released.
    env.proxy.pause();

    let b = wait(
        env.boxctl_via(other.url(), &["deploy", "--stage", "prod"])
            .spawn()
            .unwrap(),
        Duration::from_secs(120),
    )
    .expect(1, "B without waiting");
    assert!(b.stderr.contains("is locked by"), "{}", b.stderr);
    assert!(b.stderr.contains(&format!("pid {a_pid}")), "{}", b.stderr);
    assert!(
        b.stderr.contains("boxctl deploy --stage prod"),
        "{}",
        b.stderr
    );

    other.reset_counts();
    let waiter = env
        .boxctl_via(
            other.url(),
            &["deploy", "--stage", "prod", "--lock-timeout", "5m"],
        )
        .spawn()
        .unwrap();
    // B has looked at the held lock more than once: it is waiting.
    wait_for("B to poll the lock", Duration::from_secs(120), || {
        other
            .actions()
            .get("S3 GET Object")
            .is_some_and(|n| *n >= 3)
    });
    env.proxy.resume();
    let a = wait(a, Duration::from_secs(300)).expect(0, "A");
    assert!(a.stderr.contains("Apply complete"), "{}", a.stderr);
    let waited = wait(waiter, Duration::from_secs(300)).expect(0, "B waiting");
    assert!(
        waited
            .stderr
            .contains("waiting for the deploy lock, held by"),
        "{}",
        waited.stderr
    );
    assert!(waited.stdout.contains("No changes."), "{}", waited.stdout);
    assert!(lock_in_moto(&env).is_none(), "released");
}

#[test]
fn a_lock_whose_holder_died_is_taken_over() {
    let env = Env::new();
    let a = env
        .boxctl(&["deploy", "--stage", "prod"])
        .spawn()
        .expect("spawn deploy A");
    let a_pid = a.id();
    wait_for("A to take the lock", Duration::from_secs(120), || {
        lock_in_moto(&env).is_some_and(|l| l.holder.pid == a_pid)
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let a = wait(a, Duration::from_secs(60));
    assert_eq!(a.code, None, "killed");
    assert!(
        lock_in_moto(&env).is_some(),
        "a dead holder leaves its lock behind"
    );

    // On this machine a holder whose process is gone is stale at once.
    let b = env
        .run(&["deploy", "--stage", "prod"])
        .expect(0, "B after A died");
    assert!(b.stderr.contains("Apply complete"), "{}", b.stderr);

    // A holder on another machine: its lease must run out.
    let now = time::OffsetDateTime::now_utc();
    let foreign = LockInfo {
        id: "foreign".into(),
        stack: "boxlite".into(),
        stage: "prod".into(),
        holder: Holder {
            user: "ci".into(),
            host: "build-7.example".into(),
            pid: 4242,
            command: "boxctl deploy --stage prod".into(),
        },
        acquired_at: now,
        expires_at: now + Duration::from_secs(15),
    };
    let c = env.clients();
    env.rt().block_on(async {
        c.s3.put_object()
            .bucket(bucket())
            .key(lock_key())
            .body(serde_json::to_vec(&foreign).unwrap().into())
            .send()
            .await
            .unwrap();
    });
    let refused = env
        .run(&["deploy", "--stage", "prod"])
        .expect(1, "held by build-7");
    assert!(
        refused.stderr.contains("ci@build-7.example"),
        "{}",
        refused.stderr
    );
    let taken = env
        .run(&["deploy", "--stage", "prod", "--lock-timeout", "2m"])
        .expect(0, "after the lease ran out");
    assert!(
        taken
            .stderr
            .contains("waiting for the deploy lock, held by ci@build-7.example"),
        "{}",
        taken.stderr
    );
    assert!(lock_in_moto(&env).is_none(), "released");
}
