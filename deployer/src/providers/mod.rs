//! Providers: how each target (and DNS provider) observes and changes its part of the world.

pub mod aws;
pub mod cloudflare;
pub mod local;
pub mod pair;
