//! Plan: the desired graph against the observed inventory, classified per
//! resource and per field, with policies enforced before anything runs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use stack::{DesiredGraph, Policy, Resource, ResourceId, Value, retire_command};

use super::provider::{Inventory, KindSpec, Observed};

/// What the plan does to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Does not exist yet.
    Create,
    /// Changed in place.
    Update,
    /// Deleted and created again (a field cannot change in place).
    Replace,
    /// Exists but is not (or no longer) declared.
    Delete,
    /// Matches.
    Unchanged,
    /// Differs only in fields whose drift is ignored by policy.
    IgnoredDrift,
    /// Kept by `retain` although the stage is destroyed.
    Retain,
}

impl Action {
    /// True for actions that destroy something.
    pub fn is_destructive(self) -> bool {
        matches!(self, Action::Replace | Action::Delete)
    }

    /// True for actions that change the world.
    pub fn changes_world(self) -> bool {
        matches!(
            self,
            Action::Create | Action::Update | Action::Replace | Action::Delete
        )
    }
}

/// One property that differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Property name.
    pub name: String,
    /// Current value (absent when the resource or field does not exist yet).
    pub old: Option<Value>,
    /// Desired value (absent when it will be removed).
    pub new: Option<Value>,
    /// The new value is an output of a resource not created yet.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub known_after_apply: bool,
    /// This field cannot change in place.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forces_replace: bool,
    /// Drift of this field is ignored by policy.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
}

/// The plan for one resource.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// Resource id.
    pub id: ResourceId,
    /// Kind.
    pub kind: String,
    /// What happens.
    pub action: Action,
    /// Field-level reasons (empty for unchanged and plain deletes).
    pub fields: Vec<FieldChange>,
    /// Why, in words, when the fields do not say it (`duplicate`, `no longer declared`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Desired state (absent for deletes).
    #[serde(skip)]
    pub desired: Option<Resource>,
    /// Observed state (absent for creates).
    #[serde(skip)]
    pub observed: Option<Observed>,
}

/// A change the policies forbid; the plan cannot be applied while any remains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanError {
    /// The resource.
    pub id: ResourceId,
    /// What would happen and why it is refused.
    pub message: String,
    /// How to do it deliberately.
    pub hint: String,
}

/// Counts per action.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// To create.
    pub create: usize,
    /// To update in place.
    pub update: usize,
    /// To replace.
    pub replace: usize,
    /// To delete.
    pub delete: usize,
    /// Unchanged.
    pub unchanged: usize,
    /// Drift ignored by policy.
    pub ignored_drift: usize,
    /// Kept by `retain`.
    pub retain: usize,
}

impl Summary {
    /// True when applying would change the world.
    pub fn has_changes(&self) -> bool {
        self.create + self.update + self.replace + self.delete > 0
    }
}

/// Whether the plan converges the stage or tears it down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Make the world match the graph.
    Deploy,
    /// Remove everything of the stage except retained resources.
    Destroy,
}

/// A complete plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Stack.
    pub stack: String,
    /// Stage.
    pub stage: String,
    /// Deploy or destroy.
    pub mode: Mode,
    /// Every resource, in apply order for creates and updates, then deletes.
    pub changes: Vec<Change>,
    /// Changes refused: by policy, or blocked by what the stage does not own.
    pub errors: Vec<PlanError>,
    /// Counts.
    pub summary: Summary,
    /// Graph dependencies of each desired resource (for ordering the apply).
    #[serde(skip)]
    pub deps: BTreeMap<ResourceId, BTreeSet<ResourceId>>,
}

impl Plan {
    /// True when applying would change the world.
    pub fn has_changes(&self) -> bool {
        self.summary.has_changes()
    }

    /// True when some change destroys something.
    pub fn is_destructive(&self) -> bool {
        self.changes.iter().any(|c| c.action.is_destructive())
    }
}

/// Compare desired and observed.
pub fn plan(graph: &DesiredGraph, inventory: &Inventory, kinds: &[KindSpec], mode: Mode) -> Plan {
    let spec = |kind: &str| kinds.iter().find(|k| k.kind == kind);
    let outputs = |r: &stack::Ref| {
        inventory
            .resources
            .get(&r.id)
            .and_then(|o| o.outputs.get(&r.output))
            .cloned()
    };
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    let stage = graph.stage.as_str();

    // Resources that will be (re)created: references to them are unknown until apply.
    let mut fresh = Unknown::default();
    let order = graph
        .topological_order()
        .unwrap_or_else(|_| graph.resources.keys().collect());

    if mode == Mode::Deploy {
        for id in order {
            let desired = &graph.resources[id];
            let Some(observed) = inventory.resources.get(id) else {
                if let Some(e) = claimed(desired, &inventory.claims, &fresh, &outputs) {
                    errors.push(e);
                }
                fresh.ids.insert(id.clone());
                changes.push(Change {
                    id: id.clone(),
                    kind: desired.kind.clone(),
                    action: Action::Create,
                    fields: desired
                        .props
                        .iter()
                        .map(|(k, v)| {
                            let (new, unknown) = resolve_for_plan(v, &fresh, &outputs);
                            FieldChange {
                                name: k.clone(),
                                old: None,
                                new: Some(new),
                                known_after_apply: unknown,
                                forces_replace: false,
                                ignored: false,
                            }
                        })
                        .collect(),
                    reason: None,
                    desired: Some(desired.clone()),
                    observed: None,
                });
                continue;
            };
            let replace_on = spec(&desired.kind).map_or(&[][..], |s| s.replace_on);
            let mut fields = Vec::new();
            if observed.kind != desired.kind {
                fields.push(FieldChange {
                    name: "kind".into(),
                    old: Some(Value::str(observed.kind.as_str())),
                    new: Some(Value::str(desired.kind.as_str())),
                    known_after_apply: false,
                    forces_replace: true,
                    ignored: false,
                });
            }
            for (k, v) in &desired.props {
                let (new, unknown) = resolve_for_plan(v, &fresh, &outputs);
                let old = observed.props.get(k);
                if !unknown && old == Some(&new) {
                    continue;
                }
                fields.push(FieldChange {
                    name: k.clone(),
                    old: old.cloned(),
                    new: Some(new),
                    known_after_apply: unknown,
                    forces_replace: replace_on.contains(&k.as_str()),
                    ignored: desired.policy.ignore_changes.contains(k),
                });
            }
            let acted: Vec<&FieldChange> = fields.iter().filter(|f| !f.ignored).collect();
            let action = if acted.iter().any(|f| f.forces_replace) {
                Action::Replace
            } else if !acted.is_empty() {
                Action::Update
            } else if !fields.is_empty() {
                Action::IgnoredDrift
            } else {
                Action::Unchanged
            };
            if action == Action::Update
                && let Some(s) = spec(&desired.kind)
            {
                for o in s.volatile_outputs {
                    fresh.outputs.insert((id.clone(), (*o).to_string()));
                }
            }
            if action == Action::Replace {
                fresh.ids.insert(id.clone());
                if desired.policy.protect || observed.policy.protect {
                    let why: Vec<&str> = acted
                        .iter()
                        .filter(|f| f.forces_replace)
                        .map(|f| f.name.as_str())
                        .collect();
                    errors.push(PlanError {
                        id: id.clone(),
                        message: format!(
                            "{id} is protected and would be replaced (changed: {})",
                            why.join(", ")
                        ),
                        hint: format!(
                            "revert the change, or retire it with `{}` first",
                            retire_command(id, stage)
                        ),
                    });
                }
            }
            changes.push(Change {
                id: id.clone(),
                kind: desired.kind.clone(),
                action,
                fields,
                reason: None,
                desired: Some(desired.clone()),
                observed: Some(observed.clone()),
            });
        }
    }

    // Observed resources that are not declared (all of them when destroying).
    let mut orphans: Vec<&Observed> = inventory
        .resources
        .values()
        .filter(|o| mode == Mode::Destroy || !graph.resources.contains_key(&o.id))
        .collect();
    // Listed by id; the apply orders deletes by dependency.
    orphans.sort_by(|a, b| a.id.cmp(&b.id));
    // A retained resource keeps what it stands on (a database its subnets and
    // security groups): its declared dependencies are kept too, transitively.
    let retained: BTreeSet<ResourceId> = orphans
        .iter()
        .filter(|o| merged_policy(graph.resources.get(&o.id).map(|r| &r.policy), &o.policy).retain)
        .map(|o| o.id.clone())
        .collect();
    let mut kept_for: BTreeMap<ResourceId, ResourceId> = BTreeMap::new();
    if mode == Mode::Destroy {
        let mut todo: Vec<ResourceId> = retained.iter().cloned().collect();
        while let Some(id) = todo.pop() {
            for dep in graph
                .resources
                .get(&id)
                .map(Resource::all_deps)
                .unwrap_or_default()
            {
                if !retained.contains(&dep) && !kept_for.contains_key(&dep) {
                    kept_for.insert(dep.clone(), id.clone());
                    todo.push(dep);
                }
            }
        }
    }
    for o in orphans {
        let (action, reason) = match mode {
            Mode::Destroy if retained.contains(&o.id) => {
                (Action::Retain, Some("retained by policy".to_string()))
            }
            Mode::Destroy if kept_for.contains_key(&o.id) => (
                Action::Retain,
                Some(format!("{} depends on it", kept_for[&o.id])),
            ),
            Mode::Destroy => (Action::Delete, Some("stage destroyed".to_string())),
            Mode::Deploy => (Action::Delete, Some("no longer declared".to_string())),
        };
        let policy = merged_policy(graph.resources.get(&o.id).map(|r| &r.policy), &o.policy);
        if mode == Mode::Deploy && policy.protect {
            errors.push(PlanError {
                id: o.id.clone(),
                message: format!(
                    "{} is protected and is no longer declared, so deploy would delete it",
                    o.id
                ),
                hint: format!(
                    "retire it with `{}`, or declare it again",
                    retire_command(&o.id, stage)
                ),
            });
        }
        changes.push(Change {
            id: o.id.clone(),
            kind: o.kind.clone(),
            action,
            fields: Vec::new(),
            reason,
            desired: None,
            observed: Some(o.clone()),
        });
    }
    // Extra copies of one id are never wanted.
    for d in &inventory.duplicates {
        changes.push(Change {
            id: d.id.clone(),
            kind: d.kind.clone(),
            action: Action::Delete,
            fields: Vec::new(),
            reason: Some(format!(
                "duplicate of {} ({})",
                d.id,
                d.handle.as_deref().unwrap_or("no handle")
            )),
            desired: None,
            observed: Some(d.clone()),
        });
    }

    let mut summary = Summary::default();
    for c in &changes {
        match c.action {
            Action::Create => summary.create += 1,
            Action::Update => summary.update += 1,
            Action::Replace => summary.replace += 1,
            Action::Delete => summary.delete += 1,
            Action::Unchanged => summary.unchanged += 1,
            Action::IgnoredDrift => summary.ignored_drift += 1,
            Action::Retain => summary.retain += 1,
        }
    }
    let deps = graph
        .resources
        .values()
        .map(|r| (r.id.clone(), r.all_deps()))
        .collect();
    Plan {
        stack: graph.stack.clone(),
        stage: graph.stage.clone(),
        mode,
        changes,
        errors,
        summary,
        deps,
    }
}

fn merged_policy(desired: Option<&Policy>, observed: &Policy) -> Policy {
    match desired {
        Some(d) => Policy {
            protect: d.protect || observed.protect,
            retain: d.retain || observed.retain,
            ignore_changes: d.ignore_changes.clone(),
        },
        None => observed.clone(),
    }
}

/// Replace references whose target exists and is not being recreated by their
/// current output; report whether any stays unknown until apply.
/// The refusal for creating `desired` where something the stage does not own
/// holds one of its values (known at plan time).
fn claimed(
    desired: &Resource,
    claims: &[crate::engine::provider::Claim],
    fresh: &Unknown,
    outputs: &impl Fn(&stack::Ref) -> Option<Value>,
) -> Option<PlanError> {
    claims
        .iter()
        .filter(|c| c.kind == desired.kind && !c.except.contains(&desired.id))
        .find_map(|c| {
            let (v, unknown) = resolve_for_plan(desired.props.get(&c.prop)?, fresh, outputs);
            let v = v.as_str()?.trim_end_matches('.');
            (!unknown && v.eq_ignore_ascii_case(&c.value)).then(|| PlanError {
                id: desired.id.clone(),
                message: format!(
                    "{} {v} is held by {}, which this stage does not own",
                    c.prop, c.holder
                ),
                hint: c.hint.replace("{id}", desired.id.as_str()),
            })
        })
}

/// What the plan cannot know until apply: every output of resources being
/// (re)created, and the volatile outputs of resources being updated.
#[derive(Default)]
struct Unknown {
    ids: BTreeSet<ResourceId>,
    outputs: BTreeSet<(ResourceId, String)>,
}

fn resolve_for_plan(
    v: &Value,
    fresh: &Unknown,
    outputs: &impl Fn(&stack::Ref) -> Option<Value>,
) -> (Value, bool) {
    match v {
        Value::Ref(r) => {
            if fresh.ids.contains(&r.id)
                || fresh.outputs.contains(&(r.id.clone(), r.output.clone()))
            {
                return (v.clone(), true);
            }
            match outputs(r) {
                Some(val) => (val, false),
                None => (v.clone(), true),
            }
        }
        Value::List(items) => {
            let mut unknown = false;
            let items = items
                .iter()
                .map(|i| {
                    let (v, u) = resolve_for_plan(i, fresh, outputs);
                    unknown |= u;
                    v
                })
                .collect();
            (Value::List(items), unknown)
        }
        Value::Map(m) => {
            let mut unknown = false;
            let m = m
                .iter()
                .map(|(k, i)| {
                    let (v, u) = resolve_for_plan(i, fresh, outputs);
                    unknown |= u;
                    (k.clone(), v)
                })
                .collect();
            (Value::Map(m), unknown)
        }
        other => (other.clone(), false),
    }
}

/// Replace every reference by its output, from the given lookup; `Err` names the
/// first reference that has no value.
pub fn resolve_refs(
    v: &Value,
    lookup: &impl Fn(&stack::Ref) -> Option<Value>,
) -> Result<Value, stack::Ref> {
    Ok(match v {
        Value::Ref(r) => lookup(r).ok_or_else(|| r.clone())?,
        Value::List(items) => Value::List(
            items
                .iter()
                .map(|i| resolve_refs(i, lookup))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(m) => Value::Map(
            m.iter()
                .map(|(k, i)| Ok((k.clone(), resolve_refs(i, lookup)?)))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}
