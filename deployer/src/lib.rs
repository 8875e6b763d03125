//! boxctl: reconciles the world to stack.toml.

pub mod cli;
pub mod engine;
pub mod platform;
pub mod providers;
pub mod render;
pub mod secrets;
