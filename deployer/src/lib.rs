//! boxctl: reconciles the world to stack.toml.

pub mod cli;
pub mod engine;
pub mod providers;
pub mod render;
