//! Placements decided but not yet committed, so that a server can decide
//! the next placement while earlier ones are still being written to the
//! store.
//!
//! Placement itself stays serialized (one decision at a time, on the view
//! plus what is in flight); only the commits overlap. Commits to one host
//! form a chain: each compares the host's allocation marker with the
//! revision its predecessor committed, so a chain is as safe as one commit
//! after the other, and a failure anywhere in it makes the rest retry.
//!
//! This module must never let a reservation outlive its request: dropping a
//! [`Reservation`] releases it and fails its successors.
//!
//! A decision reads what is in flight *before* it reads the view, through
//! [`InFlight::snapshot`]. A commit is applied to the view before its
//! reservation is released, so a commit that ends between the two reads is
//! in the snapshot, in the view, or in both (counted twice, which only makes
//! placement cautious), never in neither (which would double-book a host).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use skyvisor_core::{GroupName, HostName, InstanceName, InstanceRef, Resources, Scoped};
use skyvisor_store::Revision;
use tokio::sync::watch;

use crate::inventory::HostEntry;

/// How many marker revisions of a chain are remembered: a successor's
/// view is never older than the chain's last few commits.
const CHAIN_WINDOW: usize = 256;

/// How a reservation's commit ended, as its successor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Still being committed.
    Pending,
    /// Committed at `revision` (the allocation marker's new revision).
    Committed {
        /// The commit's revision.
        revision: Revision,
        /// The marker revisions of this chain so far: the view the chain
        /// started from and every commit since (the latest ones). A view of
        /// the host showing any of them, plus the reservations still in
        /// flight, counts everything the chain allocated.
        known: Arc<Vec<Revision>>,
    },
    /// Not committed: successors must decide again, once their view has
    /// caught up with `seen` (the store revision that showed the conflict;
    /// 0 if unknown).
    Failed {
        /// The store revision the failure was seen at.
        seen: Revision,
    },
}

/// What a successor needs from its predecessor on the same host.
pub(crate) struct Predecessor {
    outcome: watch::Receiver<Outcome>,
}

/// The chain's known revisions after a commit at `revision` based on `base`
/// (the predecessor's list, or a new chain's start).
fn extend(prev: Option<&[Revision]>, base: Revision, revision: Revision) -> Arc<Vec<Revision>> {
    let mut known: Vec<Revision> = match prev {
        Some(p) => p.to_vec(),
        None => vec![base],
    };
    known.push(revision);
    if known.len() > CHAIN_WINDOW {
        known.drain(..known.len() - CHAIN_WINDOW);
    }
    Arc::new(known)
}

impl Predecessor {
    /// Waits for the predecessor's commit: the marker revision to compare
    /// with and the chain so far, or, if the chain broke, the store
    /// revision to let the view catch up to before deciding again.
    pub(crate) async fn committed(
        mut self,
        my_base: Revision,
    ) -> Result<(Revision, Arc<Vec<Revision>>), Revision> {
        let outcome = match self.outcome.wait_for(|o| *o != Outcome::Pending).await {
            Ok(o) => o.clone(),
            Err(_) => return Err(0),
        };
        match outcome {
            // Our view of the host must show one of the chain's revisions;
            // an older one could miss what the chain committed.
            Outcome::Committed { revision, known } if known.contains(&my_base) => {
                Ok((revision, known))
            }
            Outcome::Committed { revision, .. } => Err(revision),
            Outcome::Failed { seen } => Err(seen),
            Outcome::Pending => Err(0),
        }
    }
}

/// One reservation in flight on a host.
struct Entry {
    id: u64,
    member: Option<(Scoped<GroupName>, InstanceName)>,
    resources: Resources,
    outcome: watch::Receiver<Outcome>,
}

#[derive(Default)]
struct HostFlight {
    resources: Resources,
    count: u32,
    /// In the order they were decided; the last is the chain's tail, which
    /// the next reservation on the host waits for. Released reservations
    /// leave, so a new one never waits for one that is gone.
    entries: Vec<Entry>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    hosts: HashMap<HostName, HostFlight>,
    ips: HashSet<Ipv4Addr>,
    names: HashSet<InstanceRef>,
}

/// The placements in flight on one server.
#[derive(Clone, Default)]
pub(crate) struct InFlight {
    state: Arc<Mutex<State>>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is in flight now. Take it before reading the view (see the
    /// module's documentation).
    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            hosts: st
                .hosts
                .iter()
                .map(|(host, f)| {
                    let members = f.entries.iter().filter_map(|e| e.member.clone()).collect();
                    (
                        host.clone(),
                        HostSnapshot {
                            resources: f.resources,
                            count: f.count,
                            members,
                        },
                    )
                })
                .collect(),
            ips: st.ips.clone(),
        }
    }

    /// Waits until every commit now in flight on `host` has ended. A create
    /// whose chain broke waits for this before deciding again, so that it
    /// never chains behind commits that are about to fail too.
    pub(crate) async fn drained(&self, host: &HostName) {
        let pending: Vec<watch::Receiver<Outcome>> = match self.lock().hosts.get(host) {
            Some(f) => f.entries.iter().map(|e| e.outcome.clone()).collect(),
            None => Vec::new(),
        };
        for mut rx in pending {
            // An error means the reservation is gone: ended.
            let _ = rx.wait_for(|o| *o != Outcome::Pending).await;
        }
    }

    /// Whether an instance of this name is being committed.
    pub(crate) fn has_name(&self, name: &InstanceRef) -> bool {
        self.lock().names.contains(name)
    }

    /// Records a placement decided on `host`; returns it and, when another
    /// commit to the host is in flight, the predecessor to wait for.
    pub(crate) fn reserve(
        &self,
        host: &HostName,
        name: &InstanceRef,
        ip: Ipv4Addr,
        resources: Resources,
        member: Option<GroupName>,
    ) -> (Reservation, Option<Predecessor>) {
        let (tx, rx) = watch::channel(Outcome::Pending);
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.ips.insert(ip);
        st.names.insert(name.clone());
        let flight = st.hosts.entry(host.clone()).or_default();
        flight.resources = flight.resources.plus(resources);
        flight.count += 1;
        let prev = flight.entries.last().map(|e| Predecessor {
            outcome: e.outcome.clone(),
        });
        flight.entries.push(Entry {
            id,
            member: member.map(|g| (Scoped::new(name.project.clone(), g), name.name.clone())),
            resources,
            outcome: rx,
        });
        drop(st);
        (
            Reservation {
                flight: self.clone(),
                id,
                host: host.clone(),
                name: name.clone(),
                ip,
                outcome: tx,
            },
            prev,
        )
    }

    fn release(&self, id: u64, host: &HostName, name: &InstanceRef, ip: Ipv4Addr) {
        let mut st = self.lock();
        st.ips.remove(&ip);
        st.names.remove(name);
        let empty = match st.hosts.get_mut(host) {
            Some(f) => {
                if let Some(i) = f.entries.iter().position(|e| e.id == id) {
                    let r = f.entries.remove(i).resources;
                    f.resources = f.resources.minus(r);
                    f.count = f.count.saturating_sub(1);
                }
                f.entries.is_empty()
            }
            None => false,
        };
        if empty {
            st.hosts.remove(host);
        }
    }
}

struct HostSnapshot {
    resources: Resources,
    count: u32,
    members: Vec<(Scoped<GroupName>, InstanceName)>,
}

/// The placements in flight at one moment (see [`InFlight::snapshot`]).
pub(crate) struct Snapshot {
    hosts: HashMap<HostName, HostSnapshot>,
    ips: HashSet<Ipv4Addr>,
}

impl Snapshot {
    /// Adds what was in flight to the hosts' allocation.
    pub(crate) fn adjust(&self, hosts: &mut [HostEntry]) {
        if self.hosts.is_empty() {
            return;
        }
        for h in hosts {
            if let Some(f) = self.hosts.get(&h.host.name) {
                h.allocated = h.allocated.plus(f.resources);
                h.instances += f.count;
            }
        }
    }

    /// Adds in-flight members of `group` to `members` (one per host).
    pub(crate) fn add_members(
        &self,
        group: &Scoped<GroupName>,
        members: &mut HashMap<HostName, InstanceName>,
    ) {
        for (host, f) in &self.hosts {
            if let Some((_, name)) = f.members.iter().find(|(g, _)| g == group) {
                members.entry(host.clone()).or_insert_with(|| name.clone());
            }
        }
    }

    /// Addresses being committed.
    pub(crate) fn ips(&self) -> &HashSet<Ipv4Addr> {
        &self.ips
    }
}

/// A placement in flight. Dropped without [`Reservation::committed`], it
/// counts as failed.
pub(crate) struct Reservation {
    flight: InFlight,
    id: u64,
    host: HostName,
    name: InstanceRef,
    ip: Ipv4Addr,
    outcome: watch::Sender<Outcome>,
}

impl Reservation {
    /// The commit succeeded at `revision`; the decision was based on the
    /// marker at `based_on`, and on `chain` (the predecessor's known
    /// revisions) if it had one. Call after the view has the commit
    /// applied, so that it is never missing from both view and flight.
    pub(crate) fn committed(
        self,
        revision: Revision,
        based_on: Revision,
        chain: Option<&[Revision]>,
    ) {
        self.outcome.send_replace(Outcome::Committed {
            revision,
            known: extend(chain, based_on, revision),
        });
    }

    /// The commit failed, or was not tried; the conflict was seen at store
    /// revision `seen`.
    pub(crate) fn failed(self, seen: Revision) {
        self.outcome.send_replace(Outcome::Failed { seen });
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.outcome.send_if_modified(|o| {
            if *o == Outcome::Pending {
                *o = Outcome::Failed { seen: 0 };
                true
            } else {
                false
            }
        });
        self.flight
            .release(self.id, &self.host, &self.name, self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::ProjectName;

    fn r(vcpus: u32) -> Resources {
        Resources {
            vcpus,
            memory_mib: 128,
            disk_gib: 1,
        }
    }

    #[tokio::test]
    async fn chains_pass_the_commit_revision_and_break_on_failure() {
        let f = InFlight::default();
        let h = HostName::new("h").expect("h");
        let name = |n: &str| {
            InstanceRef::new(
                skyvisor_core::auth::default_project(),
                InstanceName::new(n).expect("n"),
            )
        };
        let (a, none) = f.reserve(&h, &name("a"), Ipv4Addr::new(10, 0, 0, 2), r(1), None);
        assert!(none.is_none());
        let (b, after_a) = f.reserve(&h, &name("b"), Ipv4Addr::new(10, 0, 0, 3), r(2), None);
        let after_a = after_a.expect("a is in flight");
        assert!(f.has_name(&name("b")));
        assert_eq!(f.snapshot().ips().len(), 2);
        a.committed(10, 5, None);
        // b decided on the same view as a, or on one with a's commit.
        let (rev, chain) = after_a.committed(5).await.expect("chain holds");
        assert_eq!((rev, chain.as_slice()), (10, &[5, 10][..]));
        let (c, after_b) = f.reserve(&h, &name("c"), Ipv4Addr::new(10, 0, 0, 4), r(1), None);
        let (c2, after_c) = f.reserve(&h, &name("c2"), Ipv4Addr::new(10, 0, 0, 6), r(1), None);
        b.committed(12, 5, Some(&chain));
        // c saw a's commit in its view: still part of the chain.
        let (rev, chain) = after_b
            .expect("b in flight")
            .committed(10)
            .await
            .expect("holds");
        assert_eq!(rev, 12);
        c.failed(13);
        assert_eq!(after_c.expect("c in flight").committed(12).await, Err(13));
        drop(c2);
        let _ = chain;
        assert!(f.snapshot().ips().is_empty() && !f.has_name(&name("a")));
        let (d, prev) = f.reserve(&h, &name("d"), Ipv4Addr::new(10, 0, 0, 5), r(1), None);
        assert!(prev.is_none(), "an emptied host starts a new chain");
        drop(d);
    }

    #[tokio::test]
    async fn an_older_view_than_the_predecessors_is_refused() {
        let f = InFlight::default();
        let h = HostName::new("h").expect("h");
        let (a, _) = f.reserve(
            &h,
            &InstanceRef::new(
                skyvisor_core::auth::default_project(),
                InstanceName::new("a").expect("n"),
            ),
            Ipv4Addr::new(10, 0, 0, 2),
            r(1),
            None,
        );
        let (_b, prev) = f.reserve(
            &h,
            &InstanceRef::new(
                skyvisor_core::auth::default_project(),
                InstanceName::new("b").expect("n"),
            ),
            Ipv4Addr::new(10, 0, 0, 3),
            r(1),
            None,
        );
        a.committed(10, 5, None);
        assert_eq!(
            prev.expect("prev").committed(4).await.map(|(r, _)| r),
            Err(10)
        );
    }

    #[test]
    fn flight_is_counted_in_placement() {
        use crate::scheduler::tests::host;
        let f = InFlight::default();
        let mut hosts = vec![host("a", 8, 4096), host("b", 8, 4096)];
        let g = GroupName::new("web").expect("g");
        let (_r, _) = f.reserve(
            &hosts[0].host.name.clone(),
            &InstanceRef::new(
                skyvisor_core::auth::default_project(),
                InstanceName::new("web-1").expect("n"),
            ),
            Ipv4Addr::new(10, 0, 0, 2),
            r(3),
            Some(g.clone()),
        );
        let snapshot = f.snapshot();
        snapshot.adjust(&mut hosts);
        assert_eq!(hosts[0].allocated.vcpus, 3);
        assert_eq!(hosts[0].instances, 1);
        assert_eq!(hosts[1].allocated.vcpus, 0);
        let mut members = HashMap::new();
        snapshot.add_members(
            &Scoped::new(skyvisor_core::auth::default_project(), g.clone()),
            &mut members,
        );
        // A group of the same name in another project is another group.
        let mut theirs = HashMap::new();
        snapshot.add_members(
            &Scoped::new(ProjectName::new("other").expect("p"), g),
            &mut theirs,
        );
        assert!(theirs.is_empty());
        assert_eq!(
            members.get(&hosts[0].host.name).map(|n| n.as_str()),
            Some("web-1")
        );
    }
}
