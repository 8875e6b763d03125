//! A deploy SIGKILLed at ten different points, each rerun picking up where
//! the world is: at the end moto holds exactly the declared resources, none
//! twice (counted by listing moto, not by asking boxctl), and a diff is clean.

mod aws_support;

use std::time::Duration;

use aws_support::{Env, expected, wait};
use testkit::aws_proxy::KillPoint::{AfterForwarding, BeforeForwarding};

#[test]
fn a_deploy_killed_at_ten_points_converges_with_no_duplicates() {
    let env = Env::new();
    // The N-th call that changes something, counted per run; "after" means
    // AWS acted on it and the process died before hearing back.
    let points = [
        (1, AfterForwarding),
        (3, BeforeForwarding),
        (5, AfterForwarding),
        (8, AfterForwarding),
        (2, BeforeForwarding),
        (10, AfterForwarding),
        (4, AfterForwarding),
        (7, BeforeForwarding),
        (3, AfterForwarding),
        (2, AfterForwarding),
    ];
    for (n, (mutation, point)) in points.into_iter().enumerate() {
        env.proxy.reset_counts();
        // No --yes: a plan that deletes anything (a duplicate) would stop here.
        let child = env
            .boxctl(&["deploy", "--stage", "prod"])
            .spawn()
            .expect("spawn boxctl");
        env.proxy.kill_at(child.id(), mutation, point);
        let run = wait(child, Duration::from_secs(300));
        env.proxy.disarm();
        assert_eq!(
            env.proxy.killed_at(),
            Some(mutation),
            "kill {n} at change {mutation} did not fire; the run ended {:?}:\n{}",
            run.code,
            run.stderr
        );
        assert_eq!(run.code, None, "killed by a signal");
        assert!(
            !run.stdout.contains("DELETE") && !run.stdout.contains("REPLACE"),
            "run {n} planned to destroy something:\n{}",
            run.stdout
        );
    }
    let last = env
        .run(&["deploy", "--stage", "prod"])
        .expect(0, "the deploy after the last kill");
    assert!(
        last.stderr.contains("ended without finishing"),
        "{}",
        last.stderr
    );
    assert_eq!(
        env.inventory(),
        expected("prod"),
        "exactly the declared resources"
    );
    env.run(&["diff", "--stage", "prod", "--exit-code"])
        .expect(0, "nothing left to do");
}
