//! Identity in the world: every AWS resource of a stage carries
//! `boxctl:stack`, `boxctl:stage` and `boxctl:id`, plus `boxctl:protect`,
//! `boxctl:retain` and `boxctl:generation` where they apply. Tags are read
//! back to recognise a resource, its policies and its generation.

use std::collections::BTreeMap;

use stack::{Policy, ResourceId, tags};

/// EC2's display name tag.
pub const NAME: &str = "Name";
/// SHA-256 of an instance's user data (user data itself is not listed by DescribeInstances).
pub const USER_DATA_SHA256: &str = "boxctl:user-data-sha256";
/// SHA-256 of a runner host's token (the token lives in its SSM parameter).
pub const TOKEN_SHA256: &str = "boxctl:token-sha256";
/// The SSM parameter holding a runner host's token.
pub const TOKEN_PARAMETER: &str = "boxctl:token-parameter";
/// Set once termination protection has been applied to an instance.
pub const TERMINATION_PROTECTION: &str = "boxctl:termination-protection";
/// Content digest of a task definition revision.
pub const CONTENT_SHA256: &str = "boxctl:content-sha256";
/// What a service was last restarted for (a digest of what its tasks read at start).
pub const RESTART_ON: &str = "boxctl:restart-on";
/// The certificate a listener rule attached to its listener.
pub const CERTIFICATE: &str = "boxctl:certificate";
/// The stage secret holding an RDS master password (its name, never its value).
pub const PASSWORD_SECRET: &str = "boxctl:password-secret";

/// A resource's identity as read from its tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Logical id.
    pub id: ResourceId,
    /// Policies recorded on the resource.
    pub policy: Policy,
    /// Replacement generation.
    pub generation: u64,
}

/// The identity tags of a resource of `stack`/`stage`.
pub fn identity_tags(
    stack: &str,
    stage: &str,
    id: &ResourceId,
    policy: &Policy,
    generation: u64,
) -> Vec<(String, String)> {
    let mut t = vec![
        (tags::STACK.to_string(), stack.to_string()),
        (tags::STAGE.to_string(), stage.to_string()),
        (tags::ID.to_string(), id.to_string()),
        (tags::GENERATION.to_string(), generation.to_string()),
    ];
    if policy.protect {
        t.push((tags::PROTECT.to_string(), "true".to_string()));
    }
    if policy.retain {
        t.push((tags::RETAIN.to_string(), "true".to_string()));
    }
    t
}

/// Tags as a map (later duplicates win).
pub fn to_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The identity of a resource whose tags say it belongs to `stack`/`stage`;
/// `None` for anything else (another stack or stage, or untagged).
pub fn identity(t: &BTreeMap<String, String>, stack: &str, stage: &str) -> Option<Identity> {
    if t.get(tags::STACK).map(String::as_str) != Some(stack)
        || t.get(tags::STAGE).map(String::as_str) != Some(stage)
    {
        return None;
    }
    let id = t.get(tags::ID).filter(|i| i.contains('/'))?;
    let flag = |k: &str| t.get(k).is_some_and(|v| v == "true");
    Some(Identity {
        id: ResourceId::new(id.as_str()),
        policy: Policy {
            protect: flag(tags::PROTECT),
            retain: flag(tags::RETAIN),
            ignore_changes: Default::default(),
        },
        generation: t
            .get(tags::GENERATION)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(protect: bool, retain: bool) -> Policy {
        Policy {
            protect,
            retain,
            ignore_changes: Default::default(),
        }
    }

    #[test]
    fn identity_round_trips_through_tags() {
        let id = ResourceId::from("runner/runner-2");
        let t = identity_tags("boxlite", "prod", &id, &policy(true, false), 3);
        let map = to_map(t.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let got = identity(&map, "boxlite", "prod").unwrap();
        assert_eq!(got.id, id);
        assert!(got.policy.protect && !got.policy.retain);
        assert_eq!(got.generation, 3);
    }

    #[test]
    fn other_stacks_stages_and_untagged_resources_are_not_ours() {
        let id = ResourceId::from("vpc/main");
        let t = identity_tags("boxlite", "prod", &id, &Policy::default(), 0);
        let map = to_map(t.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert!(identity(&map, "boxlite", "prod-eu").is_none());
        assert!(identity(&map, "other", "prod").is_none());
        assert!(identity(&BTreeMap::new(), "boxlite", "prod").is_none());
        let mut no_id = map.clone();
        no_id.remove(stack::tags::ID);
        assert!(identity(&no_id, "boxlite", "prod").is_none());
        let mut bad_gen = map;
        bad_gen.insert(stack::tags::GENERATION.into(), "x".into());
        assert_eq!(identity(&bad_gen, "boxlite", "prod").unwrap().generation, 0);
    }
}
