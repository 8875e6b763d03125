//! The stack.toml schema, its validation, stage resolution and the desired
//! resource graph. Pure: no I/O, so the same text always gives the same graph.

pub mod decode;
pub mod diagnostic;
pub mod graph;
pub mod model;
pub mod resolve;
pub mod schema;
pub mod secrets;
pub mod template;
mod validate;

pub use diagnostic::{Diagnostic, Severity};
pub use graph::{
    DesiredGraph, Policy, Props, Ref, Resource, ResourceId, Value, retire_command, tags,
};
pub use model::{Stack, Stage, Target};
pub use resolve::{ResolveError, kinds, sha256_hex};
pub use validate::{is_hostname, is_label};

use decode::Table;
use diagnostic::Diagnostics;
use schema::StackDecl;

/// A valid stack and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    /// The validated stack.
    pub stack: Stack,
    /// Legal but suspicious settings.
    pub warnings: Vec<Diagnostic>,
}

/// Parse and validate stack.toml text. On failure, every problem found (errors
/// and warnings, in file order); nothing stops at the first one.
pub fn load(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
    let mut diags = Diagnostics::new(text);
    let (doc, syntax) = toml::de::DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            diags.error("", span, format!("invalid TOML: {message}"));
        }
        return Err(diags.into_sorted());
    }
    let mut root = Table::root(&doc);
    let decl = StackDecl::decode(&mut root, &mut diags);
    root.finish(&mut diags);
    let stack = validate::validate(&decl, &mut diags);
    match stack {
        Some(stack) if !diags.has_errors() => Ok(Loaded {
            stack,
            warnings: diags.into_sorted(),
        }),
        _ => Err(diags.into_sorted()),
    }
}
