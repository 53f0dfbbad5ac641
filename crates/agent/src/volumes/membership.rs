//! [`StoreMembership`]: the data path's membership records
//! (`skyvisor_volume::MembershipStore`) kept in the cluster's [`Store`], at
//! `volumes/membership/<volume id>`.
//!
//! A record's version is its key's mod revision; compare-and-swap is a
//! store transaction comparing it (an expected `None` compares the key
//! absent). The store makes the swap atomic across every host, which is
//! what lets any host that holds an in-sync replica serve the volume. This
//! module must never interpret or change a record: it stores what the data
//! path hands it.

use std::sync::Arc;

use async_trait::async_trait;
use skyvisor_core::keys;
use skyvisor_store::{Compare, Op, Store, StoreError};
use skyvisor_volume::{Membership, MembershipError, MembershipStore, Versioned, VolumeId};

/// Membership records in the store.
#[derive(Clone)]
pub struct StoreMembership {
    store: Arc<dyn Store>,
}

impl StoreMembership {
    /// Records in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

fn backend(volume: &VolumeId, e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Backend {
        volume: volume.clone(),
        message: e.to_string(),
    }
}

#[async_trait]
impl MembershipStore for StoreMembership {
    async fn load(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<Versioned<Membership>>, MembershipError> {
        let key = keys::volume_membership(volume.as_str());
        let Some(kv) = self.store.get(&key).await.map_err(|e| backend(volume, e))? else {
            return Ok(None);
        };
        let value: Membership = serde_json::from_slice(&kv.value)
            .map_err(|e| backend(volume, format!("corrupt record at {key}: {e}")))?;
        let version = u64::try_from(kv.mod_revision)
            .map_err(|_| backend(volume, format!("negative revision at {key}")))?;
        Ok(Some(Versioned { version, value }))
    }

    async fn cas(
        &self,
        volume: &VolumeId,
        expected: Option<u64>,
        new: &Membership,
    ) -> Result<Option<u64>, MembershipError> {
        let key = keys::volume_membership(volume.as_str());
        let compare = match expected {
            None => Compare::Absent(key.clone()),
            Some(v) => Compare::ModRevision(
                key.clone(),
                i64::try_from(v).map_err(|_| backend(volume, "version out of range"))?,
            ),
        };
        let value = serde_json::to_vec(new).map_err(|e| backend(volume, e))?;
        let out = self
            .store
            .txn(
                vec![compare],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await
            .map_err(|e: StoreError| backend(volume, e))?;
        if !out.succeeded {
            return Ok(None);
        }
        // The put's mod revision is the transaction's revision.
        u64::try_from(out.revision)
            .map(Some)
            .map_err(|_| backend(volume, "negative revision"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::MembershipView;
    use skyvisor_store::EmbeddedStore;
    use skyvisor_volume::{NodeId, ReplicaMember};

    #[tokio::test]
    async fn meets_the_membership_store_contract() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        skyvisor_volume::membership::check_store_contract(&StoreMembership::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meets_the_membership_store_contract_on_etcd() {
        let etcd = skyvisor_store::testing::EtcdProcess::start()
            .await
            .expect("start etcd");
        let store: Arc<dyn Store> = Arc::new(
            skyvisor_store::EtcdStore::connect(
                &etcd.endpoints(),
                "/membership-contract/",
                skyvisor_store::EtcdOptions::default(),
            )
            .await
            .expect("connect"),
        );
        skyvisor_volume::membership::check_store_contract(&StoreMembership::new(store)).await;
    }

    #[tokio::test]
    async fn the_control_plane_view_reads_the_record() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let ms = StoreMembership::new(store.clone());
        let volume = VolumeId::new("0123abcd").expect("id");
        let m = Membership {
            volume: volume.clone(),
            size: 1 << 30,
            region_size: 1 << 20,
            extent_size: 4 << 20,
            epoch: 7,
            primary: Some(NodeId::new("host-a").expect("node")),
            min_in_sync: 1,
            replicas: vec![ReplicaMember {
                node: NodeId::new("host-b").expect("node"),
                addr: "10.0.0.2:7781".into(),
                in_sync: false,
                activity_suspect: true,
            }],
        };
        ms.cas(&volume, None, &m)
            .await
            .expect("cas")
            .expect("stored");
        let kv = store
            .get(&keys::volume_membership("0123abcd"))
            .await
            .expect("get")
            .expect("present");
        let view: MembershipView = serde_json::from_slice(&kv.value).expect("view decodes");
        assert_eq!(view.epoch, 7);
        assert_eq!(view.primary.as_deref(), Some("host-a"));
        assert_eq!(view.size, 1 << 30);
        assert_eq!(view.replicas.len(), 1);
        assert_eq!(view.replicas[0].node, "host-b");
        assert!(!view.replicas[0].in_sync);
        assert_eq!(view.replicas[0].addr, "10.0.0.2:7781");
    }
}
