//! The provider interface: how the engine observes and changes one part of the world.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use serde::{Deserialize, Serialize};
use stack::{DesiredGraph, Policy, Props, Resource, ResourceId, Value};

/// How a provider treats one resource kind.
#[derive(Clone, Debug)]
pub struct KindSpec {
    /// Kind name (`local.process`).
    pub kind: &'static str,
    /// Properties whose change cannot be applied in place.
    pub replace_on: &'static [&'static str],
    /// Creation order among kinds when dependencies are unknown (orphans): lower first,
    /// deleted in reverse.
    pub order: u32,
    /// Replacement creates the new resource before deleting the old one.
    pub create_before_delete: bool,
    /// Outputs an in-place update changes (a digest of a value): what
    /// references them is planned as changing too.
    pub volatile_outputs: &'static [&'static str],
}

/// A resource as found in the world.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Logical id, read from the world (tags, comments, records).
    pub id: ResourceId,
    /// Kind.
    pub kind: String,
    /// Current values of the properties the provider manages.
    pub props: Props,
    /// Values other resources may reference (`id`, `arn`, `url`, …).
    #[serde(default)]
    pub outputs: BTreeMap<String, Value>,
    /// Policies recorded in the world, so they outlive their declaration.
    #[serde(default)]
    pub policy: Policy,
    /// Replacement generation recorded in the world.
    #[serde(default)]
    pub generation: u64,
    /// Provider's own handle (instance id, pid…), for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
}

impl Observed {
    /// An observation with no outputs and default policy.
    pub fn new(id: ResourceId, kind: &str, props: Props) -> Self {
        Observed {
            id,
            kind: kind.to_string(),
            props,
            outputs: BTreeMap::new(),
            policy: Policy::default(),
            generation: 0,
            handle: None,
        }
    }
}

/// Something the stage does not own holds a value a declared resource of
/// `kind` needs for `prop` (a DNS name held by a foreign record): the plan
/// refuses to create such a resource, unless its id is in `except` (taken
/// over deliberately).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Kind of the resources it blocks.
    pub kind: String,
    /// Property whose value is held.
    pub prop: String,
    /// The value held (compared without regard to case).
    pub value: String,
    /// What holds it, for the message.
    pub holder: String,
    /// How to resolve it deliberately; `{id}` stands for the blocked resource.
    pub hint: String,
    /// Resources allowed to take it over.
    pub except: BTreeSet<ResourceId>,
}

/// Everything a provider found for a stage.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Resources by id.
    pub resources: BTreeMap<ResourceId, Observed>,
    /// Extra copies carrying an id already seen (left by a crashed run without
    /// idempotency); the plan deletes them.
    pub duplicates: Vec<Observed>,
    /// Values held by things the stage does not own.
    pub claims: Vec<Claim>,
}

impl Inventory {
    /// Add an observation; a second one with the same id becomes a duplicate.
    pub fn add(&mut self, o: Observed) {
        if self.resources.contains_key(&o.id) {
            self.duplicates.push(o);
        } else {
            self.resources.insert(o.id.clone(), o);
        }
    }

    /// Merge another provider's inventory into this one.
    pub fn extend(&mut self, other: Inventory) {
        for o in other.resources.into_values() {
            self.add(o);
        }
        self.duplicates.extend(other.duplicates);
        self.claims.extend(other.claims);
    }
}

/// Whether trying again may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Throttling, 5xx, timeouts, eventual consistency: retried with backoff.
    Retryable,
    /// The operator must fix something; stops the apply.
    Hard,
}

/// A failure of a provider call, saying what, where and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderError {
    /// Retryable or not.
    pub class: ErrorClass,
    /// The API call or operation that failed (`RunInstances`, `spawn`).
    pub operation: String,
    /// What went wrong.
    pub message: String,
    /// What the operator can do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ProviderError {
    /// A hard error.
    pub fn hard(operation: impl Into<String>, message: impl Into<String>) -> Self {
        ProviderError {
            class: ErrorClass::Hard,
            operation: operation.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// A retryable error.
    pub fn retryable(operation: impl Into<String>, message: impl Into<String>) -> Self {
        ProviderError {
            class: ErrorClass::Retryable,
            operation: operation.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// Attach a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// True when the engine should try again.
    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.operation, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {}

/// Context of one apply step.
#[derive(Clone, Debug)]
pub struct StepCtx {
    /// Stack name.
    pub stack: String,
    /// Stage name.
    pub stage: String,
    /// Generation of the resource being created (feeds idempotency tokens).
    pub generation: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
}

impl StepCtx {
    /// A deterministic idempotency token for this create: the same stack, stage,
    /// id and generation always give the same token, so a rerun after a crash
    /// cannot create a second copy where the API honours tokens.
    pub fn idempotency_token(&self, id: &ResourceId) -> String {
        let text = format!("{}/{}/{}/{}", self.stack, self.stage, id, self.generation);
        let digest = stack::sha256_hex(&text);
        format!("boxctl-{}", &digest[..40])
    }
}

/// One part of the world (a target or a DNS provider).
pub trait Provider: Sync {
    /// The kinds this provider handles.
    fn kinds(&self) -> &[KindSpec];

    /// Fill in desired properties only the provider can compute (e.g. the
    /// digest of a binary on disk). Called once before observing.
    fn prepare(
        &self,
        _graph: &mut DesiredGraph,
    ) -> impl Future<Output = Result<(), ProviderError>> {
        async { Ok(()) }
    }

    /// Every resource of the stage, found in batched reads.
    fn observe(&self) -> impl Future<Output = Result<Inventory, ProviderError>>;

    /// Create a resource; its references are already resolved.
    fn create(
        &self,
        ctx: &StepCtx,
        desired: &Resource,
    ) -> impl Future<Output = Result<Observed, ProviderError>>;

    /// Change a resource in place; `changed` names the properties that differ.
    fn update(
        &self,
        ctx: &StepCtx,
        desired: &Resource,
        current: &Observed,
        changed: &[String],
    ) -> impl Future<Output = Result<Observed, ProviderError>>;

    /// Remove a resource. Removing one that is already gone succeeds.
    fn delete(
        &self,
        ctx: &StepCtx,
        current: &Observed,
    ) -> impl Future<Output = Result<(), ProviderError>>;

    /// The spec of a kind, if this provider handles it.
    fn kind_spec(&self, kind: &str) -> Option<&KindSpec> {
        self.kinds().iter().find(|k| k.kind == kind)
    }
}
