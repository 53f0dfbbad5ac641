//! An in-memory copy of the identities and projects, kept current by a
//! watch on the store, so that authorizing a request costs one store read
//! (the token, so that a revocation is never missed) instead of three.
//! A role granted or taken away reaches every server within a watch's
//! latency; this server's own changes apply at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use skyvisor_core::auth::{Identity, Project};
use skyvisor_core::keys;
use skyvisor_store::{Store, WatchEvent, decode};

/// What the view holds.
#[derive(Default)]
struct Maps {
    identities: HashMap<String, Identity>,
    projects: HashMap<String, Project>,
    /// Whether the view has been filled from a listing (until then, and
    /// after a lost watch, lookups go to the store).
    live: bool,
}

/// The followed copy.
#[derive(Clone, Default)]
pub(crate) struct AuthView {
    maps: Arc<RwLock<Maps>>,
}

impl AuthView {
    /// An identity by key, if the view is live and has it; `None` means
    /// "ask the store".
    pub(crate) fn identity(&self, key: &str) -> Option<Option<Identity>> {
        let m = self.maps.read().ok()?;
        m.live.then(|| m.identities.get(key).cloned())
    }

    /// A project by key, like [`AuthView::identity`].
    pub(crate) fn project(&self, key: &str) -> Option<Option<Project>> {
        let m = self.maps.read().ok()?;
        m.live.then(|| m.projects.get(key).cloned())
    }

    /// Records a change this process made, before its watch event comes.
    pub(crate) fn put_identity(&self, key: String, value: Option<Identity>) {
        if let Ok(mut m) = self.maps.write() {
            match value {
                Some(v) => m.identities.insert(key, v),
                None => m.identities.remove(&key),
            };
        }
    }

    /// Records a change this process made, like [`AuthView::put_identity`].
    pub(crate) fn put_project(&self, key: String, value: Option<Project>) {
        if let Ok(mut m) = self.maps.write() {
            match value {
                Some(v) => m.projects.insert(key, v),
                None => m.projects.remove(&key),
            };
        }
    }

    fn set_live(&self, live: bool) {
        if let Ok(mut m) = self.maps.write() {
            m.live = live;
        }
    }

    fn apply(&self, event: &WatchEvent) {
        let key = event.key();
        let Ok(mut m) = self.maps.write() else {
            return;
        };
        match event {
            WatchEvent::Put(kv) if key.starts_with(keys::IDENTITIES) => {
                if let Ok(v) = decode::<Identity>(kv) {
                    m.identities.insert(key.to_string(), v);
                }
            }
            WatchEvent::Put(kv) if key.starts_with(keys::PROJECTS) => {
                if let Ok(v) = decode::<Project>(kv) {
                    m.projects.insert(key.to_string(), v);
                }
            }
            WatchEvent::Delete { .. } if key.starts_with(keys::IDENTITIES) => {
                m.identities.remove(key);
            }
            WatchEvent::Delete { .. } if key.starts_with(keys::PROJECTS) => {
                m.projects.remove(key);
            }
            _ => {}
        }
    }

    /// Follows the store until the store goes away: list, then watch;
    /// again after a lost watch.
    pub(crate) async fn follow(self, store: Arc<dyn Store>) {
        loop {
            match self.fill_and_watch(store.as_ref()).await {
                Ok(()) => return,
                Err(e) => {
                    self.set_live(false);
                    tracing::debug!(error = %e, "auth view lost its watch; listing again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn fill_and_watch(&self, store: &dyn Store) -> Result<(), skyvisor_store::StoreError> {
        // One listing, at one revision, then every change after it.
        let listing = store.list("auth/").await?;
        let mut stream = store.watch("auth/", listing.revision + 1).await?;
        {
            let Ok(mut m) = self.maps.write() else {
                return Ok(());
            };
            m.identities = listing
                .items
                .iter()
                .filter(|kv| kv.key.starts_with(keys::IDENTITIES))
                .filter_map(|kv| Some((kv.key.clone(), decode::<Identity>(kv).ok()?)))
                .collect();
            m.projects = listing
                .items
                .iter()
                .filter(|kv| kv.key.starts_with(keys::PROJECTS))
                .filter_map(|kv| Some((kv.key.clone(), decode::<Project>(kv).ok()?)))
                .collect();
            m.live = true;
        }
        while let Some(event) = stream.next().await {
            self.apply(&event?);
        }
        Ok(())
    }
}
