//! Whole-system tests: a real `skyvisor up`, real QEMU guests under TCG,
//! real HTTP to the guests' web services.

mod bad_input;
mod harness;
mod images;
mod lifecycle;
mod multihost;
mod resilience;
mod volumes;
mod volumes_multihost;
