//! The reconcile engine: providers observe the world, the plan compares it
//! with the desired graph, apply makes it so, under a lock, with a journal.

pub mod apply;
pub mod journal;
pub mod lock;
pub mod plan;
pub mod provider;
pub mod store;

#[cfg(test)]
mod tests;
