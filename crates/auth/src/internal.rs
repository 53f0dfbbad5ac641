//! The cluster's internal key: what agents and servers present to each
//! other (the agent API, replica links). Made once, by whichever part
//! starts first, and kept in the store.

use skyvisor_core::keys;
use skyvisor_store::Store;

use crate::AuthError;

/// The scheme of the internal key in an `Authorization` header.
const BEARER_PREFIX: &str = "svk_";

/// The cluster's internal key.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

impl ClusterKey {
    /// The key's bytes (the replica links' key).
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The `Authorization` header value that proves membership.
    pub fn header(&self) -> String {
        format!("Bearer {BEARER_PREFIX}{}", hex::encode(self.0))
    }

    /// Whether an `Authorization` header value carries this key.
    pub fn admits(&self, header: Option<&str>) -> bool {
        let expected = self.header();
        header.is_some_and(|h| {
            h.len() == expected.len()
                && h.bytes()
                    .zip(expected.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }
}

/// Reads the cluster's key, making it if this is the first part to start.
pub async fn cluster_key(store: &dyn Store) -> Result<ClusterKey, AuthError> {
    for _ in 0..3 {
        if let Some(kv) = store.get(keys::CLUSTER_KEY).await? {
            let text = String::from_utf8_lossy(&kv.value);
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    AuthError::Store(skyvisor_store::StoreError::Rejected(format!(
                        "{} in the store is not a 32-byte hex key",
                        keys::CLUSTER_KEY
                    )))
                })?;
            return Ok(ClusterKey(bytes));
        }
        let fresh: [u8; 32] = rand::random();
        let _ = skyvisor_store::StoreExt::create(
            store,
            keys::CLUSTER_KEY,
            hex::encode(fresh).into_bytes(),
        )
        .await?;
    }
    Err(AuthError::Store(skyvisor_store::StoreError::Unavailable(
        "the cluster key could not be read back after writing it".into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_store::EmbeddedStore;

    #[tokio::test]
    async fn every_part_reads_the_one_key_the_first_made() {
        let store = EmbeddedStore::in_memory().expect("store");
        let a = cluster_key(&store).await.expect("first");
        let b = cluster_key(&store).await.expect("second");
        assert_eq!(a.bytes(), b.bytes());
        assert!(a.admits(Some(&b.header())));
        assert!(!a.admits(None));
        assert!(!a.admits(Some("Bearer svk_00")));
        let other = cluster_key(&EmbeddedStore::in_memory().expect("store"))
            .await
            .expect("other");
        assert!(!a.admits(Some(&other.header())));
    }
}
