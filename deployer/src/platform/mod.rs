//! Operating a deployed platform through its control plane.

pub mod client;
pub mod verify;
