//! Skyvisor's replicated block volumes: a VM disk written synchronously to
//! N replicas on different hosts (like DRBD protocol C), served to QEMU
//! through `skyvisor_nbd`, so that no acknowledged write is lost when a
//! host dies.
//!
//! Pieces:
//! - [`replica`]: a node's replicas on disk ([`ReplicaStore`]): data file,
//!   epoch (fencing), dirty bitmaps for peers that are out of sync, activity
//!   log, snapshots;
//! - [`server`]: [`ReplicaServer`], the replica protocol ([`wire`]) over TCP;
//! - [`membership`]: the authoritative record of replicas, in-sync set,
//!   epoch and primary, behind [`MembershipStore`] (compare-and-swap);
//! - [`device`]: [`ReplicatedDevice`], the primary: replication, failure
//!   handling, resync, promotion (open with takeover), snapshots; it
//!   implements `skyvisor_nbd::BlockDevice`;
//! - [`volume`]: creating a volume;
//! - [`stats`]: what a primary counts of the I/O it serves.
//!
//! The invariant everything serves: a write is acknowledged only when every
//! replica in the recorded in-sync set has it, and only replicas of that set
//! ever serve reads or become primary.

pub mod bitmap;
pub mod client;
pub mod device;
mod fsutil;
pub mod ids;
pub mod link_key;
pub mod link_tls;
mod locks;
pub mod membership;
pub mod replica;
pub mod server;
pub mod stats;
pub mod volume;
pub mod wire;

pub use device::{
    DeviceOptions, ReplicaStatus, ReplicaSyncState, ReplicatedDevice, VolumeError, VolumeStatus,
};
pub use ids::{NodeId, VolumeId};
pub use membership::{
    FileMembershipStore, Membership, MembershipError, MembershipStore, MemoryMembershipStore,
    ReplicaMember, Versioned,
};
pub use replica::{ReplicaStore, ReplicaStoreError, ReplicaStoreOptions};
pub use server::{ReplicaServer, ReplicaServerError};
pub use stats::{IoKind, IoKindSnapshot, IoSnapshot, IoStats};
pub use volume::{VolumeSpec, call_replica, create_volume, delete_replicas, grow_volume};
