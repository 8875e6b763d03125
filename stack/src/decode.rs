//! Typed reads from a spanned TOML tree, reporting every problem with its position.
//!
//! A [`Table`] hands out values by key and remembers which keys were asked for;
//! [`Table::finish`] then reports every key nobody asked for as unknown, with a
//! "did you mean" hint. Decoding never stops at the first problem.

use std::collections::BTreeMap;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Diagnostics, Span, closest};

/// A decoded value and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sp<T> {
    /// The value.
    pub value: T,
    /// Where it is in the text.
    pub span: Span,
}

impl<T> Sp<T> {
    /// Pair a value with its span.
    pub fn new(value: T, span: Span) -> Self {
        Sp { value, span }
    }
}

/// A TOML table being decoded.
pub struct Table<'d, 'i> {
    path: String,
    span: Span,
    table: &'d DeTable<'i>,
    asked: Vec<&'static str>,
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn join(path: &str, key: &str) -> String {
    let key = if key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !key.is_empty()
    {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

impl<'d, 'i> Table<'d, 'i> {
    /// Wrap the document root.
    pub fn root(doc: &'d Spanned<DeTable<'i>>) -> Self {
        Table {
            path: String::new(),
            span: doc.span(),
            table: doc.get_ref(),
            asked: Vec::new(),
        }
    }

    /// Dotted path of this table.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Where this table is in the text.
    pub fn span(&self) -> Span {
        self.span.clone()
    }

    /// Dotted path of a key in this table.
    pub fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn get(&mut self, key: &'static str) -> Option<&'d Spanned<DeValue<'i>>> {
        self.asked.push(key);
        self.table.get(key)
    }

    fn expect<T>(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
        what: &str,
        convert: impl FnOnce(&DeValue<'i>) -> Option<T>,
    ) -> Option<Sp<T>> {
        let v = self.get(key)?;
        match convert(v.get_ref()) {
            Some(t) => Some(Sp::new(t, v.span())),
            None => {
                diags.error(
                    &self.key_path(key),
                    v.span(),
                    format!(
                        "`{}` must be {what}, found {}",
                        self.key_path(key),
                        type_name(v.get_ref())
                    ),
                );
                None
            }
        }
    }

    /// A string value.
    pub fn string(&mut self, key: &'static str, diags: &mut Diagnostics<'_>) -> Option<Sp<String>> {
        self.expect(key, diags, "a string", |v| match v {
            DeValue::String(s) => Some(s.to_string()),
            _ => None,
        })
    }

    /// A boolean value.
    pub fn boolean(&mut self, key: &'static str, diags: &mut Diagnostics<'_>) -> Option<Sp<bool>> {
        self.expect(key, diags, "a boolean (true or false)", |v| match v {
            DeValue::Boolean(b) => Some(*b),
            _ => None,
        })
    }

    /// An integer value (reported as an error when it does not fit in 64 bits).
    pub fn integer(&mut self, key: &'static str, diags: &mut Diagnostics<'_>) -> Option<Sp<i64>> {
        let path = self.key_path(key);
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Integer(i) => {
                let digits: String = i.as_str().chars().filter(|c| *c != '_').collect();
                match i64::from_str_radix(&digits, i.radix()) {
                    Ok(n) => Some(Sp::new(n, v.span())),
                    Err(_) => {
                        diags.error(&path, v.span(), format!("`{path}` is too large: {i}"));
                        None
                    }
                }
            }
            other => {
                diags.error(
                    &path,
                    v.span(),
                    format!("`{path}` must be an integer, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// An array of strings.
    pub fn string_list(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
    ) -> Option<Sp<Vec<Sp<String>>>> {
        let path = self.key_path(key);
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            diags.error(
                &path,
                v.span(),
                format!(
                    "`{path}` must be an array of strings, found {}",
                    type_name(v.get_ref())
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.get_ref() {
                DeValue::String(s) => out.push(Sp::new(s.to_string(), item.span())),
                other => {
                    diags.error(
                        &format!("{path}[{i}]"),
                        item.span(),
                        format!("`{path}[{i}]` must be a string, found {}", type_name(other)),
                    );
                }
            }
        }
        Some(Sp::new(out, v.span()))
    }

    /// A table of string values (`env = { KEY = "value" }`).
    pub fn string_map(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
    ) -> Option<Sp<BTreeMap<String, Sp<String>>>> {
        let path = self.key_path(key);
        let v = self.get(key)?;
        let DeValue::Table(t) = v.get_ref() else {
            diags.error(
                &path,
                v.span(),
                format!(
                    "`{path}` must be a table of strings, found {}",
                    type_name(v.get_ref())
                ),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, item) in t.iter() {
            match item.get_ref() {
                DeValue::String(s) => {
                    out.insert(k.get_ref().to_string(), Sp::new(s.to_string(), item.span()));
                }
                other => {
                    let p = join(&path, k.get_ref());
                    diags.error(
                        &p,
                        item.span(),
                        format!("`{p}` must be a string, found {}", type_name(other)),
                    );
                }
            }
        }
        Some(Sp::new(out, v.span()))
    }

    /// A sub-table.
    pub fn table(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
    ) -> Option<Table<'d, 'i>> {
        let path = self.key_path(key);
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Table {
                path,
                span: v.span(),
                table: t,
                asked: Vec::new(),
            }),
            other => {
                diags.error(
                    &path,
                    v.span(),
                    format!("`{path}` must be a table, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// An array of tables (`[[services]]`).
    pub fn table_array(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
    ) -> Option<Vec<Table<'d, 'i>>> {
        let path = self.key_path(key);
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            diags
                .error(
                    &path,
                    v.span(),
                    format!(
                        "`{path}` must be an array of tables, found {}",
                        type_name(v.get_ref())
                    ),
                )
                .hint(format!("write each entry as a [[{path}]] section"));
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            match item.get_ref() {
                DeValue::Table(t) => out.push(Table {
                    path: p,
                    span: item.span(),
                    table: t,
                    asked: Vec::new(),
                }),
                other => {
                    diags.error(
                        &p,
                        item.span(),
                        format!("`{p}` must be a table, found {}", type_name(other)),
                    );
                }
            }
        }
        Some(out)
    }

    /// Every entry of a table whose keys are names chosen by the user (`[stages.<name>]`),
    /// each of which must itself be a table.
    pub fn named_tables(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics<'_>,
    ) -> Vec<(Sp<String>, Table<'d, 'i>)> {
        let Some(parent) = self.table(key, diags) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in parent.table.iter() {
            let path = join(&parent.path, k.get_ref());
            match v.get_ref() {
                DeValue::Table(t) => out.push((
                    Sp::new(k.get_ref().to_string(), k.span()),
                    Table {
                        path,
                        span: v.span(),
                        table: t,
                        asked: Vec::new(),
                    },
                )),
                other => {
                    diags.error(
                        &path,
                        v.span(),
                        format!("`{path}` must be a table, found {}", type_name(other)),
                    );
                }
            }
        }
        out
    }

    /// Report every key of this table that was never asked for.
    pub fn finish(self, diags: &mut Diagnostics<'_>) {
        for (k, _) in self.table.iter() {
            let key = k.get_ref().as_ref();
            if self.asked.contains(&key) {
                continue;
            }
            let path = join(&self.path, key);
            let where_ = if self.path.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in `{}`", self.path)
            };
            let d = diags.error(&path, k.span(), format!("unknown key `{key}` {where_}"));
            match closest(key, self.asked.iter().copied()) {
                Some(s) => d.hint(format!("did you mean `{s}`?")),
                None => {
                    let mut known: Vec<&str> = self.asked.clone();
                    known.sort_unstable();
                    known.dedup();
                    d.hint(format!("known keys here: {}", known.join(", ")))
                }
            };
        }
    }
}
