//! The event record (see [`skyvisor_core::event`]): writing events, in the
//! transaction of the change they record ([`op`]) or on their own
//! ([`EventLog`]); reading them in order ([`list`]) and following them
//! ([`follow`]); pruning them past their retention.
//!
//! Who asked is taken from the request being served ([`as_actor`]), so no
//! handler has to pass it along; what runs outside a request (controllers,
//! agents) records no identity: the system did it.

use std::sync::Arc;

use futures::StreamExt;
use skyvisor_core::{Event, EventKind, IdentityName, ObjectKind, ProjectName, keys};
use skyvisor_store::{KeyValue, Op, Revision, Store, StoreError, WatchEvent, decode, encode};

use crate::error::ApiResult;

/// Most events one listing returns.
pub const MAX_LIST: usize = 1000;

/// Most events kept per project (and cluster-wide), newest.
pub const MAX_KEPT: usize = 100_000;

/// How long events are kept by default.
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

tokio::task_local! {
    static ACTOR: IdentityName;
}

/// Runs `fut` as a request of `identity`: the events it records name them.
pub async fn as_actor<F: std::future::Future>(identity: IdentityName, fut: F) -> F::Output {
    ACTOR.scope(identity, fut).await
}

/// Who the request being served is from, if one is.
fn actor() -> Option<IdentityName> {
    ACTOR.try_with(Clone::clone).ok()
}

/// The write that records `event` (naming the current request's caller
/// unless it names someone already), to put in the transaction of the
/// change it records.
pub fn op(mut event: Event) -> Op {
    if event.identity.is_none() {
        event.identity = actor();
    }
    Op::Put {
        key: keys::event(&event),
        value: encode(&event),
        lease: None,
    }
}

/// Records events that go with no transaction of their own (refusals,
/// token changes), through a [`crate::queued::QueuedWriter`].
#[derive(Clone)]
pub struct EventLog {
    writer: crate::queued::QueuedWriter,
    /// When this server last recorded each token's use.
    token_uses: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// How often one server records the use of one token at most: the audit
/// trail has every request; the event says a token is in use.
pub const TOKEN_USE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl EventLog {
    /// A log written to `store` by a task of its own, which ends when every
    /// handle is gone.
    pub fn start(store: Arc<dyn Store>) -> Self {
        Self {
            writer: crate::queued::QueuedWriter::start(store, "events"),
            token_uses: Default::default(),
        }
    }

    /// Records `event` (see [`op`] for who it names).
    pub fn record(&self, event: Event) {
        tracing::info!(
            kind = %event.kind,
            object = %event.object,
            name = %event.name,
            project = ?event.project.as_ref().map(|p| p.to_string()),
            "event"
        );
        self.writer.write(op(event));
    }

    /// Records that `identity` used token `token_id`, unless this server
    /// did within [`TOKEN_USE_EVERY`].
    pub fn token_used(&self, identity: &IdentityName, token_id: &str) {
        let now = std::time::Instant::now();
        {
            let mut seen = self
                .token_uses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen
                .get(token_id)
                .is_some_and(|t| now.duration_since(*t) < TOKEN_USE_EVERY)
            {
                return;
            }
            seen.insert(token_id.to_string(), now);
        }
        let mut event = Event::new(
            EventKind::TokenUsed,
            ObjectKind::Token,
            None,
            token_id,
            format!("token {token_id} of identity {identity} in use"),
        );
        event.identity = Some(identity.clone());
        self.record(event);
    }
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One project's events; none: every project's and the cluster's.
    pub project: Option<ProjectName>,
    /// Only those about this instance.
    pub instance: Option<String>,
    /// Only those after this sequence number.
    pub after: u64,
}

impl Filter {
    /// The prefix these events live under.
    fn prefix(&self) -> String {
        match &self.project {
            Some(p) => keys::events_prefix(Some(p)),
            None => keys::EVENTS.to_string(),
        }
    }

    fn matches(&self, e: &Event) -> bool {
        e.seq > self.after
            && self
                .instance
                .as_ref()
                .is_none_or(|i| e.object == ObjectKind::Instance && &e.name == i)
    }
}

/// The event stored in `kv`, numbered by the revision it was written at.
fn event_of(kv: &KeyValue) -> Option<Event> {
    match decode::<Event>(kv) {
        Ok(mut e) => {
            e.seq = u64::try_from(kv.create_revision).unwrap_or(0);
            Some(e)
        }
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "skipping an undecodable event");
            None
        }
    }
}

/// The newest `limit` events that match, oldest first, and the store
/// revision they were read at (follow from there to miss nothing).
pub async fn list(
    store: &dyn Store,
    filter: &Filter,
    limit: usize,
) -> ApiResult<(Vec<Event>, Revision)> {
    let listing = store.list(&filter.prefix()).await?;
    let mut events: Vec<Event> = listing
        .items
        .iter()
        .filter_map(event_of)
        .filter(|e| filter.matches(e))
        .collect();
    events.sort_by_key(|e| e.seq);
    let skip = events.len().saturating_sub(limit.min(MAX_LIST));
    events.drain(..skip);
    Ok((events, listing.revision))
}

/// Every event of `project`, oldest first (what usage is metered from).
pub async fn all(store: &dyn Store, project: &ProjectName) -> ApiResult<Vec<Event>> {
    let listing = store.list(&keys::events_prefix(Some(project))).await?;
    let mut events: Vec<Event> = listing.items.iter().filter_map(event_of).collect();
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

/// The events that match, as they are written after store revision
/// `from`, in order. The stream ends with an error item if the store's
/// history no longer reaches back to `from` or the watch breaks; list again
/// then.
pub async fn follow(
    store: &dyn Store,
    filter: Filter,
    from: Revision,
) -> Result<impl futures::Stream<Item = Result<Event, StoreError>> + Send + use<>, StoreError> {
    let watch = store.watch(&filter.prefix(), from + 1).await?;
    Ok(watch.filter_map(move |item| {
        let out = match item {
            Ok(WatchEvent::Put(kv)) => event_of(&kv).filter(|e| filter.matches(e)).map(Ok),
            // Deletions are retention at work: nothing happened.
            Ok(WatchEvent::Delete { .. }) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    }))
}

/// Prunes the record on the leader, forever.
pub(crate) async fn run_retention(cp: crate::ControlPlane) {
    loop {
        tokio::time::sleep(crate::audit::PRUNE_EVERY).await;
        if !cp.leads_now() {
            continue;
        }
        match prune(
            cp.store.as_ref(),
            cp.config.event_retention,
            MAX_KEPT,
            chrono::Utc::now(),
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned the event record"),
            Err(e) => tracing::warn!(error = %e.message, "cannot prune the event record"),
        }
    }
}

/// Deletes the events older than `retention` before `now`, and beyond the
/// newest `keep` of each project, except those usage is still metered
/// from (see `skyvisor_metering::current_states`): a VM that has run for
/// longer than the retention is still metered from its start. Returns how
/// many it deleted.
pub async fn prune(
    store: &dyn Store,
    retention: std::time::Duration,
    keep: usize,
    now: chrono::DateTime<chrono::Utc>,
) -> ApiResult<usize> {
    let listing = store.list(keys::EVENTS).await?;
    let oldest = now
        - chrono::Duration::from_std(retention).unwrap_or_else(|_| chrono::Duration::days(36500));
    // Per project (or the cluster's), in order.
    let mut scopes: std::collections::BTreeMap<&str, Vec<(&str, Option<Event>)>> =
        Default::default();
    for kv in &listing.items {
        let rest = kv.key.strip_prefix(keys::EVENTS).unwrap_or(&kv.key);
        let scope = rest.split('/').next().unwrap_or_default();
        scopes
            .entry(scope)
            .or_default()
            .push((kv.key.as_str(), event_of(kv)));
    }
    let mut doomed = Vec::new();
    for events in scopes.values_mut() {
        events.sort_by_key(|(_, e)| e.as_ref().map_or(0, |e| e.seq));
        // What usage is still metered from (each existing object's newest
        // state-setting event) stays, however old.
        let decoded: Vec<usize> = (0..events.len())
            .filter(|i| events[*i].1.is_some())
            .collect();
        let protected: std::collections::HashSet<usize> =
            skyvisor_metering::current_states(events.iter().filter_map(|(_, e)| e.as_ref()))
                .into_iter()
                .map(|d| decoded[d])
                .collect();
        let over = events.len().saturating_sub(keep);
        for (i, (key, e)) in events.iter().enumerate() {
            // An undecodable event is kept only while it is young.
            let expired = e.as_ref().is_none_or(|e| e.at < oldest);
            if (i < over || expired) && !protected.contains(&i) {
                doomed.push(Op::Delete((*key).to_string()));
            }
        }
    }
    let deleted = doomed.len();
    for chunk in doomed.chunks(256) {
        store.txn(vec![], chunk.to_vec()).await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};
    use skyvisor_core::event::status_transitions;
    use skyvisor_core::instance::{ExitReason, ExitRecord, InstancePhase, InstanceStatus};
    use skyvisor_core::{EventKind, HostName};

    fn status(phase: InstancePhase) -> InstanceStatus {
        InstanceStatus {
            phase,
            ..InstanceStatus::pending()
        }
    }

    fn kinds(events: &[skyvisor_core::Event]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_status_change_records_what_happened_to_the_guest_once() {
        let spec = crate::snapshots::tests::spec();
        let t0 = Utc::now();
        let starting = status(InstancePhase::Starting);
        let mut running = status(InstancePhase::Running);
        running.started_at = Some(t0);
        running.host = Some(HostName::new("h2").expect("h"));
        // Started, timed by QEMU's start, on the host the status names.
        let started = status_transitions(&spec, Some(&starting), &running);
        assert_eq!(kinds(&started), [EventKind::Started]);
        assert_eq!(started[0].at, t0);
        assert_eq!(started[0].host.as_ref().map(|h| h.as_str()), Some("h2"));
        assert_eq!(
            started[0].size.as_ref().map(|s| s.resources),
            Some(spec.resources)
        );
        // Writing the same status again records nothing more.
        assert!(status_transitions(&spec, Some(&running), &running).is_empty());
        // A crash, then the agent's restart.
        let mut crashed = status(InstancePhase::Starting);
        crashed.last_exit = Some(ExitRecord {
            at: t0 + Duration::seconds(5),
            reason: ExitReason::Killed,
            detail: "killed by signal 9".into(),
        });
        let ended = status_transitions(&spec, Some(&running), &crashed);
        assert_eq!(kinds(&ended), [EventKind::Crashed]);
        assert_eq!(ended[0].at, t0 + Duration::seconds(5));
        let mut again = crashed.clone();
        again.phase = InstancePhase::Running;
        again.restart_count = 1;
        again.started_at = Some(t0 + Duration::seconds(6));
        assert_eq!(
            kinds(&status_transitions(&spec, Some(&crashed), &again)),
            [EventKind::Restarted]
        );
        // A stop asked for, and a start that failed.
        let mut stopped = status(InstancePhase::Stopped);
        stopped.last_exit = Some(ExitRecord {
            at: t0 + Duration::seconds(9),
            reason: ExitReason::Requested,
            detail: "stopped".into(),
        });
        assert_eq!(
            kinds(&status_transitions(&spec, Some(&again), &stopped)),
            [EventKind::Stopped]
        );
        let mut failed = status(InstancePhase::Failed);
        failed.last_exit = Some(ExitRecord {
            at: t0 + Duration::seconds(12),
            reason: ExitReason::StartFailed,
            detail: "no such image file".into(),
        });
        assert_eq!(
            kinds(&status_transitions(&spec, Some(&stopped), &failed)),
            [EventKind::Failed]
        );
        // An agent's first report of a VM it found running (after it
        // restarted and re-attached) is no new start.
        assert!(status_transitions(&spec, Some(&again), &again).is_empty());
    }

    #[tokio::test]
    async fn pruning_keeps_what_a_running_vm_is_metered_from() {
        use skyvisor_store::{EmbeddedStore, StoreExt, encode};
        let store = EmbeddedStore::in_memory().expect("store");
        let spec = crate::snapshots::tests::spec();
        let now = Utc::now();
        let put = |kind: EventKind, name: &str, days_ago: i64| {
            let mut e = skyvisor_core::Event::instance(kind, &spec, "test");
            e.name = name.to_string();
            e.at = now - Duration::days(days_ago);
            e
        };
        // "long" has run for 200 days; "gone" was deleted 150 days ago;
        // "fresh" started yesterday.
        let events = [
            put(EventKind::Created, "long", 201),
            put(EventKind::Started, "long", 200),
            put(EventKind::Created, "gone", 190),
            put(EventKind::Started, "gone", 180),
            put(EventKind::Deleted, "gone", 150),
            put(EventKind::Created, "fresh", 1),
            put(EventKind::Started, "fresh", 1),
        ];
        for e in &events {
            store
                .put(&skyvisor_core::keys::event(e), encode(e))
                .await
                .expect("put");
        }
        let retention = std::time::Duration::from_secs(90 * 24 * 3600);
        let deleted = super::prune(&store, retention, 100, now)
            .await
            .expect("prune");
        assert_eq!(deleted, 4, "long's creation and gone's three events");
        let project = spec.project.clone();
        let left: Vec<(String, EventKind)> = super::all(&store, &project)
            .await
            .expect("list")
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect();
        assert_eq!(
            left,
            [
                ("long".to_string(), EventKind::Started),
                ("fresh".to_string(), EventKind::Created),
                ("fresh".to_string(), EventKind::Started),
            ]
        );
        // long is still metered from its start, 200 days ago.
        let usage = skyvisor_metering::usage(
            &super::all(&store, &project).await.expect("list"),
            now - Duration::days(300),
            now,
        );
        let running: rust_decimal::Decimal = usage
            .iter()
            .filter(|l| l.meter == skyvisor_core::usage::Meter::InstanceRunning)
            .map(|l| l.quantity)
            .sum();
        assert!(
            running >= rust_decimal::Decimal::from(200 * 86_400),
            "{usage:?}"
        );
        assert_eq!(
            super::prune(&store, retention, 100, now)
                .await
                .expect("prune"),
            0
        );
    }

    #[tokio::test]
    async fn pruning_keeps_what_a_stored_object_is_metered_from() {
        use skyvisor_core::{Event, ObjectKind, ProjectName};
        use skyvisor_store::{EmbeddedStore, StoreExt, encode};
        let store = EmbeddedStore::in_memory().expect("store");
        let project = ProjectName::new("web").expect("project");
        let now = Utc::now();
        let ev = |kind, object, name: &str, days_ago: i64, bytes: Option<u64>| {
            let mut e = Event::new(kind, object, Some(project.clone()), name, "test");
            if let Some(b) = bytes {
                e = e.stored(b, 2);
            }
            e.at = now - Duration::days(days_ago);
            e
        };
        use EventKind::{Created, Deleted, Resized};
        use ObjectKind::{Volume, VolumeSnapshot};
        let events = [
            // "kept" was created 200 days ago and grown 150 days ago: the
            // grow is what it is metered from now.
            ev(Created, Volume, "kept", 200, Some(1 << 30)),
            ev(Resized, Volume, "kept", 150, Some(2 << 30)),
            ev(Created, VolumeSnapshot, "kept/s", 140, Some(1 << 30)),
            // "old" and its snapshot went 100 days ago: nothing to keep.
            ev(Created, Volume, "old", 120, Some(1 << 30)),
            ev(Created, VolumeSnapshot, "old/s", 110, Some(1 << 30)),
            ev(Deleted, Volume, "old", 100, None),
        ];
        for e in &events {
            store
                .put(&skyvisor_core::keys::event(e), encode(e))
                .await
                .expect("put");
        }
        let retention = std::time::Duration::from_secs(90 * 24 * 3600);
        let deleted = super::prune(&store, retention, 100, now)
            .await
            .expect("prune");
        assert_eq!(deleted, 4);
        let left: Vec<String> = super::all(&store, &project)
            .await
            .expect("list")
            .into_iter()
            .map(|e| format!("{} {}", e.kind, e.name))
            .collect();
        assert_eq!(left, ["resized kept", "created kept/s"]);
        let usage = skyvisor_metering::usage(
            &super::all(&store, &project).await.expect("list"),
            now - Duration::days(10),
            now,
        );
        let of = |m| {
            usage
                .iter()
                .find(|l| l.meter == m)
                .map(|l| l.quantity)
                .unwrap_or_default()
        };
        use skyvisor_core::usage::Meter;
        // 10 days of 2 GiB, and of the 1 GiB snapshot's 2 copies.
        assert_eq!(
            of(Meter::VolumeStorage),
            rust_decimal::Decimal::from(2 * 10 * 86_400)
        );
        assert_eq!(
            of(Meter::SnapshotStorage),
            rust_decimal::Decimal::from(2 * 10 * 86_400)
        );
    }

    #[test]
    fn the_same_event_written_twice_is_one_key() {
        let spec = crate::snapshots::tests::spec();
        let e = skyvisor_core::Event::instance(EventKind::Started, &spec, "running");
        assert_eq!(
            skyvisor_core::keys::event(&e),
            skyvisor_core::keys::event(&e.clone())
        );
        let mut other = e.clone();
        other.kind = EventKind::Stopped;
        assert_ne!(
            skyvisor_core::keys::event(&e),
            skyvisor_core::keys::event(&other)
        );
    }
}
