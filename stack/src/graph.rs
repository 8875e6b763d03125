//! The desired resource graph: what a stage should look like in the world.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Target;

/// Tag (AWS) and comment (Cloudflare) keys that carry a resource's identity in the world.
pub mod tags {
    /// The stack name.
    pub const STACK: &str = "boxctl:stack";
    /// The stage name.
    pub const STAGE: &str = "boxctl:stage";
    /// The logical resource id.
    pub const ID: &str = "boxctl:id";
    /// Present when the resource is protected, so protection outlives its declaration.
    pub const PROTECT: &str = "boxctl:protect";
    /// Present when the resource survives `boxctl destroy`.
    pub const RETAIN: &str = "boxctl:retain";
    /// Generation: increases on each replacement; feeds idempotency tokens.
    pub const GENERATION: &str = "boxctl:generation";
}

/// Stable logical id of a resource, `<family>/<name>` (`runner/runner-2`, `lb/api`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResourceId(String);

impl ResourceId {
    /// An id from its text.
    pub fn new(s: impl Into<String>) -> Self {
        ResourceId(s.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `/`.
    pub fn family(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(f, _)| f)
    }

    /// The part after the first `/`.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, n)| n)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ResourceId {
    fn from(s: &str) -> Self {
        ResourceId(s.to_string())
    }
}

/// A reference to an output of another resource, known once that resource exists.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ref {
    /// The resource.
    pub id: ResourceId,
    /// Its output.
    pub output: String,
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.id, self.output)
    }
}

/// A typed property value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    /// true / false.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// Text; text with newlines is shown as a unified diff.
    Str(String),
    /// An ordered list.
    List(Vec<Value>),
    /// A map with sorted keys.
    Map(BTreeMap<String, Value>),
    /// Another resource's output (`{"$ref": "vpc/main#id"}`).
    Ref(Ref),
    /// A secret by name, never its value (`{"$secret": "cloudflare-api-token"}`).
    Secret(String),
}

impl Value {
    /// Text value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// List of text values.
    pub fn strs<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Value {
        Value::List(items.into_iter().map(|s| Value::Str(s.into())).collect())
    }

    /// Map of text values.
    pub fn str_map<I: IntoIterator<Item = (K, V)>, K: Into<String>, V: Into<String>>(
        items: I,
    ) -> Value {
        Value::Map(
            items
                .into_iter()
                .map(|(k, v)| (k.into(), Value::Str(v.into())))
                .collect(),
        )
    }

    /// Reference to `id#output`.
    pub fn reference(id: &str, output: &str) -> Value {
        Value::Ref(Ref {
            id: ResourceId::new(id),
            output: output.to_string(),
        })
    }

    /// The text, if this is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is a number.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The items, if this is a list.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The entries, if this is a map.
    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Every reference inside this value.
    pub fn refs(&self, out: &mut BTreeSet<Ref>) {
        match self {
            Value::Ref(r) => {
                out.insert(r.clone());
            }
            Value::List(l) => l.iter().for_each(|v| v.refs(out)),
            Value::Map(m) => m.values().for_each(|v| v.refs(out)),
            _ => {}
        }
    }

    /// True when no reference remains inside.
    pub fn is_resolved(&self) -> bool {
        let mut r = BTreeSet::new();
        self.refs(&mut r);
        r.is_empty()
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Str(s) => J::String(s.clone()),
            Value::List(l) => J::Array(l.iter().map(Value::to_json).collect()),
            Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Value::Ref(r) => serde_json::json!({ "$ref": r.to_string() }),
            Value::Secret(s) => serde_json::json!({ "$secret": s }),
        }
    }

    /// A value from JSON; floats and nulls have no meaning here and are refused.
    pub fn from_json(j: &serde_json::Value) -> Result<Value, String> {
        use serde_json::Value as J;
        Ok(match j {
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => Value::Int(
                n.as_i64()
                    .ok_or_else(|| format!("{n} is not a whole number"))?,
            ),
            J::String(s) => Value::Str(s.clone()),
            J::Array(a) => Value::List(a.iter().map(Value::from_json).collect::<Result<_, _>>()?),
            J::Object(o) if o.len() == 1 && o.contains_key("$ref") => {
                let text = o["$ref"].as_str().ok_or("$ref must be text")?;
                let (id, output) = text.split_once('#').ok_or("$ref must be `id#output`")?;
                Value::reference(id, output)
            }
            J::Object(o) if o.len() == 1 && o.contains_key("$secret") => Value::Secret(
                o["$secret"]
                    .as_str()
                    .ok_or("$secret must be text")?
                    .to_string(),
            ),
            J::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), Value::from_json(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            J::Null => return Err("null is not a property value".into()),
        })
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = serde_json::Value::deserialize(d)?;
        Value::from_json(&j).map_err(serde::de::Error::custom)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Int(i64::from(i))
    }
}

impl From<u16> for Value {
    fn from(i: u16) -> Self {
        Value::Int(i64::from(i))
    }
}

/// Properties by name, sorted.
pub type Props = BTreeMap<String, Value>;

/// What `deploy` and `destroy` may do to a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Never deleted or replaced by `deploy`; retired only by its own command.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protect: bool,
    /// Survives `destroy`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain: bool,
    /// Properties whose drift is shown but never acted on.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub ignore_changes: BTreeSet<String>,
}

/// One logical resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Stable id.
    pub id: ResourceId,
    /// Provider-qualified kind (`local.process`, `aws.ec2.instance`).
    pub kind: String,
    /// Desired properties.
    pub props: Props,
    /// Resources that must exist first (references add theirs implicitly).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deps: BTreeSet<ResourceId>,
    /// Policies.
    #[serde(default)]
    pub policy: Policy,
}

impl Resource {
    /// A resource with no properties yet.
    pub fn new(id: impl Into<String>, kind: &str) -> Self {
        Resource {
            id: ResourceId::new(id),
            kind: kind.to_string(),
            props: Props::new(),
            deps: BTreeSet::new(),
            policy: Policy::default(),
        }
    }

    /// Set a property.
    pub fn prop(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.props.insert(key.to_string(), value.into());
        self
    }

    /// Add an explicit dependency.
    pub fn dep(mut self, id: &str) -> Self {
        self.deps.insert(ResourceId::new(id));
        self
    }

    /// Mark protected.
    pub fn protect(mut self) -> Self {
        self.policy.protect = true;
        self
    }

    /// Mark retained on destroy.
    pub fn retain(mut self, retain: bool) -> Self {
        self.policy.retain = retain;
        self
    }

    /// Ignore drift of these properties.
    pub fn ignore_changes(mut self, keys: &[&str]) -> Self {
        self.policy
            .ignore_changes
            .extend(keys.iter().map(|k| k.to_string()));
        self
    }

    /// Explicit dependencies plus every resource referenced by a property.
    pub fn all_deps(&self) -> BTreeSet<ResourceId> {
        let mut refs = BTreeSet::new();
        for v in self.props.values() {
            v.refs(&mut refs);
        }
        let mut deps = self.deps.clone();
        deps.extend(refs.into_iter().map(|r| r.id));
        deps
    }
}

/// Why a graph is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphError {
    /// Two resources share an id.
    #[error("resource {0} is declared twice")]
    Duplicate(ResourceId),
    /// A dependency or reference names nothing.
    #[error("resource {from} depends on {to}, which is not in the graph")]
    Dangling {
        /// The dependent.
        from: ResourceId,
        /// The missing dependency.
        to: ResourceId,
    },
    /// Dependencies form a cycle.
    #[error("dependency cycle through {0}")]
    Cycle(ResourceId),
}

/// Every resource a stage should have, with the stage's outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredGraph {
    /// Stack name.
    pub stack: String,
    /// Stage name.
    pub stage: String,
    /// Target.
    pub target: Target,
    /// Resources by id.
    pub resources: BTreeMap<ResourceId, Resource>,
    /// Outputs by name: literal values or references to resource outputs.
    pub outputs: BTreeMap<String, Value>,
}

impl DesiredGraph {
    /// An empty graph for a stage.
    pub fn new(stack: &str, stage: &str, target: Target) -> Self {
        DesiredGraph {
            stack: stack.to_string(),
            stage: stage.to_string(),
            target,
            resources: BTreeMap::new(),
            outputs: BTreeMap::new(),
        }
    }

    /// Add a resource; ids must be unique.
    pub fn add(&mut self, r: Resource) -> Result<(), GraphError> {
        if self.resources.contains_key(&r.id) {
            return Err(GraphError::Duplicate(r.id));
        }
        self.resources.insert(r.id.clone(), r);
        Ok(())
    }

    /// Check that every dependency exists and that there is no cycle.
    pub fn check(&self) -> Result<(), GraphError> {
        for r in self.resources.values() {
            for d in r.all_deps() {
                if !self.resources.contains_key(&d) {
                    return Err(GraphError::Dangling {
                        from: r.id.clone(),
                        to: d,
                    });
                }
            }
        }
        self.topological_order().map(|_| ())
    }

    /// Resources ordered so that every dependency comes before its dependents;
    /// ties broken by id, so the order is deterministic.
    pub fn topological_order(&self) -> Result<Vec<&ResourceId>, GraphError> {
        let mut indegree: BTreeMap<&ResourceId, usize> = BTreeMap::new();
        let mut dependents: BTreeMap<&ResourceId, Vec<&ResourceId>> = BTreeMap::new();
        for r in self.resources.values() {
            indegree.entry(&r.id).or_insert(0);
            for d in r.all_deps() {
                if let Some((dep_id, _)) = self.resources.get_key_value(&d) {
                    *indegree.entry(&r.id).or_insert(0) += 1;
                    dependents.entry(dep_id).or_default().push(&r.id);
                }
            }
        }
        let mut ready: BTreeSet<&ResourceId> = indegree
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        let mut order = Vec::with_capacity(self.resources.len());
        while let Some(id) = ready.pop_first() {
            order.push(id);
            for dep in dependents.get(id).into_iter().flatten() {
                let n = indegree.get_mut(dep).expect("indexed");
                *n -= 1;
                if *n == 0 {
                    ready.insert(dep);
                }
            }
        }
        if order.len() != self.resources.len() {
            let stuck = indegree
                .iter()
                .find(|(_, n)| **n > 0)
                .map(|(id, _)| (*id).clone())
                .expect("a cycle leaves a node with dependencies");
            return Err(GraphError::Cycle(stuck));
        }
        Ok(order)
    }

    /// Canonical JSON: the same stack and stage always give the same bytes.
    pub fn to_canonical_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("graph serializes");
        s.push('\n');
        s
    }
}

/// The command that retires a protected resource, for messages that refuse to delete it.
pub fn retire_command(id: &ResourceId, stage: &str) -> String {
    match id.family() {
        "runner" => format!("boxctl decommission {} --stage {stage}", id.name()),
        _ => format!("boxctl destroy --stage {stage} (after removing its protection deliberately)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_json() {
        let v = Value::Map(BTreeMap::from([
            ("a".to_string(), Value::reference("vpc/main", "id")),
            ("b".to_string(), Value::Secret("token".into())),
            (
                "c".to_string(),
                Value::List(vec![Value::Int(3), Value::Bool(true), "x".into()]),
            ),
        ]));
        let j = serde_json::to_string(&v).unwrap();
        assert_eq!(
            j,
            r##"{"a":{"$ref":"vpc/main#id"},"b":{"$secret":"token"},"c":[3,true,"x"]}"##
        );
        assert_eq!(serde_json::from_str::<Value>(&j).unwrap(), v);
    }

    #[test]
    fn topological_order_puts_dependencies_first_and_finds_cycles() {
        let mut g = DesiredGraph::new("s", "dev", Target::Local);
        g.add(Resource::new("b/1", "k").prop("x", Value::reference("a/1", "id")))
            .unwrap();
        g.add(Resource::new("a/1", "k")).unwrap();
        g.add(Resource::new("c/1", "k").dep("b/1")).unwrap();
        let order: Vec<&str> = g
            .topological_order()
            .unwrap()
            .iter()
            .map(|i| i.as_str())
            .collect();
        assert_eq!(order, ["a/1", "b/1", "c/1"]);
        assert_eq!(
            g.add(Resource::new("a/1", "k")),
            Err(GraphError::Duplicate("a/1".into()))
        );

        g.resources
            .get_mut(&ResourceId::from("a/1"))
            .unwrap()
            .deps
            .insert("c/1".into());
        assert!(matches!(g.check(), Err(GraphError::Cycle(_))));

        let mut g2 = DesiredGraph::new("s", "dev", Target::Local);
        g2.add(Resource::new("a/1", "k").dep("zz/9")).unwrap();
        assert_eq!(
            g2.check(),
            Err(GraphError::Dangling {
                from: "a/1".into(),
                to: "zz/9".into()
            })
        );
    }

    #[test]
    fn runners_retire_by_decommission() {
        assert_eq!(
            retire_command(&"runner/runner-3".into(), "prod"),
            "boxctl decommission runner-3 --stage prod"
        );
    }
}
