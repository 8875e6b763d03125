//! Typed reads of a resource's properties, failing with the resource and key named.

use std::collections::BTreeMap;

use stack::{Props as PropMap, ResourceId, Value};

use crate::engine::provider::ProviderError;

/// The properties of one resource, read with errors that name it.
pub struct Props<'a> {
    id: &'a ResourceId,
    props: &'a PropMap,
}

fn missing(id: &ResourceId, key: &str, what: &str) -> ProviderError {
    ProviderError::hard(
        "read properties",
        format!("{id} has no {what} property `{key}`"),
    )
    .with_hint(
        "this is a bug in boxctl's resource graph; please report it with `boxctl graph` output",
    )
}

impl<'a> Props<'a> {
    /// Read `props` of resource `id`.
    pub fn of(id: &'a ResourceId, props: &'a PropMap) -> Self {
        Props { id, props }
    }

    /// A text property.
    pub fn str(&self, key: &str) -> Result<&'a str, ProviderError> {
        self.props
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| missing(self.id, key, "text"))
    }

    /// A text property that may be absent.
    pub fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.props.get(key).and_then(Value::as_str)
    }

    /// A whole-number property.
    pub fn int(&self, key: &str) -> Result<i64, ProviderError> {
        self.props
            .get(key)
            .and_then(Value::as_int)
            .ok_or_else(|| missing(self.id, key, "number"))
    }

    /// A number that must fit an `i32`.
    pub fn i32(&self, key: &str) -> Result<i32, ProviderError> {
        let v = self.int(key)?;
        i32::try_from(v).map_err(|_| missing(self.id, key, "32-bit number"))
    }

    /// A boolean property.
    pub fn bool(&self, key: &str) -> Result<bool, ProviderError> {
        self.props
            .get(key)
            .and_then(Value::as_bool)
            .ok_or_else(|| missing(self.id, key, "boolean"))
    }

    /// A map property.
    pub fn map(&self, key: &str) -> Result<&'a BTreeMap<String, Value>, ProviderError> {
        self.props
            .get(key)
            .and_then(Value::as_map)
            .ok_or_else(|| missing(self.id, key, "map"))
    }

    /// A list of text.
    pub fn strs(&self, key: &str) -> Result<Vec<String>, ProviderError> {
        let list = self
            .props
            .get(key)
            .and_then(Value::as_list)
            .ok_or_else(|| missing(self.id, key, "list"))?;
        list.iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| missing(self.id, key, "text list"))
            })
            .collect()
    }

    /// The resolved ids of a reference set (a map of id → resolved reference).
    pub fn id_set(&self, key: &str) -> Result<Vec<String>, ProviderError> {
        self.map(key)?
            .values()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| missing(self.id, key, "resolved reference"))
            })
            .collect()
    }
}

/// A reference set as observed: raw AWS ids keyed by themselves, re-keyed by
/// resource id once every resource of the stage has been observed.
pub fn raw_id_set<I: IntoIterator<Item = S>, S: Into<String>>(ids: I) -> Value {
    Value::Map(
        ids.into_iter()
            .map(|s| {
                let s = s.into();
                (s.clone(), Value::Str(s))
            })
            .collect(),
    )
}
