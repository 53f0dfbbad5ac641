//! Whole-system tests: a real `skyvisor up`, real QEMU guests under TCG,
//! real HTTP to the guests' web services; and clusters of real `skyvisor
//! server`s and `skyvisor agent`s on a multi-host test bed (`testbed.rs`).

mod bad_input;
mod checkpoints;
mod cloud_guests;
mod cluster;
mod containers;
mod contract;
mod groups;
mod ha;
mod harness;
mod images;
mod keypairs;
mod lifecycle;
mod metadata;
mod migration;
mod multihost;
mod networks;
mod observability;
mod resilience;
mod testbed;
mod tls;
mod volumes;
mod volumes_multihost;
mod webui;
