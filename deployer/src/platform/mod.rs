//! Operating a deployed platform through its control plane.

pub mod artifact;
pub mod client;
pub mod rollout;
pub mod ssm_upgrade;
pub mod verify;
