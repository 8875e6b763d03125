//! Providers: one per part of the world a stage lives in.

pub mod aws;
pub mod local;
