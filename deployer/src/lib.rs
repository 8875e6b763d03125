//! boxctl: reconciles the world to stack.toml.

pub mod engine;
