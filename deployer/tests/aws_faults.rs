//! Deploy through a proxy that answers every third AWS call with throttling
//! or a server error, in each protocol's own shape: it still converges.

mod aws_support;

use aws_support::{Env, expected};
use testkit::aws_proxy::Faults;

#[test]
fn a_deploy_through_throttling_and_server_errors_converges() {
    let env = Env::new();
    env.proxy.set_faults(Faults::EveryNth(3));
    let r = env
        .run(&["deploy", "--stage", "prod"])
        .expect(0, "deploy with faults");
    assert!(r.stderr.contains("Apply complete"), "{}", r.stderr);
    let faulted = env.proxy.faulted();
    assert!(
        faulted * 4 >= env.proxy.total(),
        "about a third of {} calls failed, only {faulted} did",
        env.proxy.total()
    );
    // Still through failing calls: a rerun plans nothing.
    env.run(&["diff", "--stage", "prod", "--exit-code"])
        .expect(0, "diff with faults");
    env.proxy.set_faults(Faults::None);
    assert_eq!(env.inventory(), expected("prod"));
    env.run(&["diff", "--stage", "prod", "--exit-code"])
        .expect(0, "diff without faults");
}
