//! The cluster store: a [`Store`] on an etcd cluster (v3 API).
//!
//! Every key lives under a namespace prefix (e.g. `/skyvisor/`), so one etcd
//! can serve several installations or test runs. Every request has a bounded
//! time ([`EtcdOptions::request_timeout`]): when etcd is down or has no
//! leader, callers get [`StoreError::Unavailable`] quickly (and can answer
//! 503) instead of hanging, and the client reconnects by itself once etcd is
//! back.
//!
//! Differences from the embedded store the callers should know: lease TTLs
//! are whole seconds (rounded up; etcd also raises them to its minimum,
//! 1.5 × the election timeout: 2 s with default settings), and etcd refuses
//! a transaction with more than `--max-txn-ops` (default 128) operations or
//! a request larger than `--max-request-bytes` (default 1.5 MiB) with
//! [`StoreError::Rejected`].
//!
//! This module must never retry a write on its own (a timed-out write may
//! have been applied) and never hide a broken watch: a watch whose
//! connection breaks yields `Unavailable` and ends.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tonic::Code;

use crate::{
    Compare, KeyValue, LeaseId, Listing, Op, Revision, Store, StoreError, TxnOutcome, WatchEvent,
    WatchStream,
};

/// Largest response accepted from etcd: listings of many objects can exceed
/// gRPC's 4 MiB default.
const MAX_RESPONSE_BYTES: usize = 512 << 20;

/// Timeouts of an [`EtcdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Longest time one request may take before it fails as unavailable.
    pub request_timeout: Duration,
    /// Longest time to open a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 pings that detect a dead connection (watches
    /// included) when the network, rather than etcd, goes away.
    pub keep_alive_interval: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            keep_alive_interval: Duration::from_secs(5),
        }
    }
}

/// The etcd store. Cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
    endpoints: String,
    options: EtcdOptions,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// How to reach etcd over TLS (`https://` endpoints): the CA its
/// certificate chains to and, for etcd's `--client-cert-auth`, this
/// client's certificate and key. All PEM.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA etcd's certificate chains to.
    pub ca_pem: Vec<u8>,
    /// This client's certificate and key, if etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `http://10.0.0.1:2379`) and
    /// checks that it answers. Every key is stored under `namespace`.
    pub async fn connect(
        endpoints: &[String],
        namespace: &str,
        options: EtcdOptions,
    ) -> Result<Self, StoreError> {
        Self::connect_with_tls(endpoints, namespace, options, None).await
    }

    /// [`EtcdStore::connect`], over TLS when `tls` is given.
    pub async fn connect_with_tls(
        endpoints: &[String],
        namespace: &str,
        options: EtcdOptions,
        tls: Option<&EtcdTls>,
    ) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive_interval, options.request_timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(t);
        }
        let client = tokio::time::timeout(
            options.request_timeout,
            Client::connect(endpoints, Some(connect)),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "etcd at {joined}: no connection within {:?}",
                options.request_timeout
            ))
        })?
        .map_err(|e| StoreError::Unavailable(format!("etcd at {joined}: cannot connect: {e}")))?;
        let store = EtcdStore {
            client,
            namespace: namespace.to_owned(),
            endpoints: joined,
            options,
        };
        // The client connects lazily; make sure someone answers.
        let mut kv = store.client.kv_client();
        let probe = store.namespace.clone().into_bytes();
        store
            .call(
                "connect",
                kv.get(probe, Some(GetOptions::new().with_count_only())),
            )
            .await?;
        tracing::info!(endpoints = %store.endpoints, namespace = %store.namespace, "connected to etcd");
        Ok(store)
    }

    /// The namespace every key lives under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.namespace.len() + key.len());
        k.extend_from_slice(self.namespace.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The key without the namespace, or `None` for a key outside it.
    fn short_key(&self, full: &[u8]) -> Option<Result<String, StoreError>> {
        let rest = full.strip_prefix(self.namespace.as_bytes())?;
        Some(
            String::from_utf8(rest.to_vec()).map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(full).into_owned(),
                message: "key is not UTF-8".into(),
            }),
        )
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Option<Result<KeyValue, StoreError>> {
        let key = match self.short_key(kv.key())? {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        }))
    }

    /// Runs one request with the request timeout, mapping its errors.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {}: {what} got no answer within {:?}",
                self.endpoints, self.options.request_timeout
            ))),
            Ok(Err(e)) => Err(self.error(what, &e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Maps an etcd-client error to a [`StoreError`].
    fn error(&self, what: &str, e: &etcd_client::Error) -> StoreError {
        let message = format!("etcd at {}: {what} failed: {e}", self.endpoints);
        match e {
            etcd_client::Error::GRpcStatus(status) => {
                let text = status.message();
                if text.contains("database space exceeded") {
                    return StoreError::Io(message);
                }
                match status.code() {
                    Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::AlreadyExists
                    | Code::Unimplemented => StoreError::Rejected(message),
                    _ => StoreError::Unavailable(message),
                }
            }
            etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                StoreError::Rejected(message)
            }
            _ => StoreError::Unavailable(message),
        }
    }

    /// Whether `e` says a lease does not exist.
    fn is_lease_not_found(e: &etcd_client::Error) -> bool {
        match e {
            etcd_client::Error::GRpcStatus(status) => {
                status.code() == Code::NotFound || status.message().contains("lease not found")
            }
            etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
            _ => false,
        }
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.client.kv_client();
        let probe = self.namespace.clone().into_bytes();
        let resp = self
            .call(
                "revision",
                kv.get(probe, Some(GetOptions::new().with_count_only())),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call("get", kv.get(self.full_key(key), None)).await?;
        match resp.kvs().first() {
            Some(found) => self.key_value(found).transpose(),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let resp = self
            .call(
                "list",
                kv.get(self.full_key(prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let items = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.key_value(kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Listing { items, revision })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        // Checked here: with a namespace, an empty key would be a valid etcd key.
        if ops
            .iter()
            .any(|op| matches!(op, Op::Put { key, .. } | Op::Delete(key) if key.is_empty()))
        {
            return Err(StoreError::Rejected("empty key".into()));
        }
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| match c {
                // An absent key compares as revision 0 in etcd.
                Compare::ModRevision(k, 0) | Compare::Absent(k) => {
                    EtcdCompare::create_revision(self.full_key(k), CompareOp::Equal, 0)
                }
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(self.full_key(k), CompareOp::Equal, *r)
                }
                Compare::Exists(k) => EtcdCompare::version(self.full_key(k), CompareOp::Greater, 0),
            })
            .collect();
        let first_lease = ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete(_) => None,
        });
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    self.full_key(&key),
                    value,
                    lease.map(|l| PutOptions::new().with_lease(l.0)),
                ),
                Op::Delete(key) => TxnOp::delete(self.full_key(&key), None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let request = kv.txn(Txn::new().when(when).and_then(then));
        let resp = match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {}: txn got no answer within {:?}",
                    self.endpoints, self.options.request_timeout
                )));
            }
            Ok(Err(e)) if Self::is_lease_not_found(&e) => {
                return Err(StoreError::LeaseNotFound(first_lease.map_or(0, |l| l.0)));
            }
            Ok(Err(e)) => return Err(self.error("txn", &e)),
            Ok(Ok(resp)) => resp,
        };
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        let mut options = WatchOptions::new().with_prefix();
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut stream = self
            .call("watch", client.watch(self.full_key(prefix), Some(options)))
            .await?;
        // Wait for etcd to confirm the watch, so a dead etcd fails here.
        let first = self.call("watch", stream.message()).await?.ok_or_else(|| {
            StoreError::Unavailable(format!(
                "etcd at {}: watch closed before it was created",
                self.endpoints
            ))
        })?;
        let mut pending = VecDeque::new();
        if let Some(item) = self.watch_response(&first, start_revision, &mut pending) {
            return Err(item);
        }
        let state = EtcdWatch {
            store: self.clone(),
            stream,
            pending,
            requested: start_revision,
            finished: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut w| async move {
                let item = w.next_item().await?;
                Some((item, w))
            },
        )))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts whole seconds (and raises small TTLs to its minimum).
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let mut lease = self.client.lease_client();
        let resp = self.call("lease grant", lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Rejected(format!(
                "etcd at {}: lease grant: {}",
                self.endpoints,
                resp.error()
            )));
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        // One request on a fresh keep-alive stream; it is closed when dropped.
        match tokio::time::timeout(self.options.request_timeout, client.keep_alive(lease.0)).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {}: lease keep-alive got no answer within {:?}",
                self.endpoints, self.options.request_timeout
            ))),
            Ok(Err(e)) if Self::is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease.0)),
            Ok(Err(e)) => Err(self.error("lease keep-alive", &e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        match tokio::time::timeout(self.options.request_timeout, client.revoke(lease.0)).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {}: lease revoke got no answer within {:?}",
                self.endpoints, self.options.request_timeout
            ))),
            Ok(Err(e)) if Self::is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease.0)),
            Ok(Err(e)) => Err(self.error("lease revoke", &e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let revision = revision.min(self.current_revision().await?);
        if revision <= 0 {
            return Ok(());
        }
        let mut kv = self.client.kv_client();
        match tokio::time::timeout(self.options.request_timeout, kv.compact(revision, None)).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {}: compact got no answer within {:?}",
                self.endpoints, self.options.request_timeout
            ))),
            // Compacting what is already compacted is done.
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("compacted") => {
                Ok(())
            }
            Ok(Err(e)) => Err(self.error("compact", &e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }
}

impl EtcdStore {
    /// Turns one watch response into events (appended to `pending`), or the
    /// error that ends the watch.
    fn watch_response(
        &self,
        resp: &etcd_client::WatchResponse,
        requested: Revision,
        pending: &mut VecDeque<Result<WatchEvent, StoreError>>,
    ) -> Option<StoreError> {
        if resp.compact_revision() != 0 {
            return Some(StoreError::Compacted {
                requested,
                oldest: resp.compact_revision(),
            });
        }
        if resp.canceled() {
            return Some(StoreError::Unavailable(format!(
                "etcd at {} cancelled the watch: {}",
                self.endpoints,
                resp.cancel_reason()
            )));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            // A deletion's key-value carries version 0 (a tombstone); any put
            // has version >= 1. Read that rather than the event type, whose
            // accessor panics on a type it does not know.
            let item = if kv.version() == 0 {
                match self.short_key(kv.key()) {
                    None => continue,
                    Some(Err(e)) => Err(e),
                    Some(Ok(key)) => Ok(WatchEvent::Delete {
                        key,
                        mod_revision: kv.mod_revision(),
                    }),
                }
            } else {
                match self.key_value(kv) {
                    None => continue,
                    Some(r) => r.map(WatchEvent::Put),
                }
            };
            pending.push_back(item);
        }
        None
    }
}

/// The state of one etcd watch stream.
struct EtcdWatch {
    store: EtcdStore,
    stream: etcd_client::WatchStream,
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    /// The first revision not yet delivered (for the `Compacted` error).
    requested: Revision,
    finished: bool,
}

impl EtcdWatch {
    async fn next_item(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            // Queued items go out first, even after the watch ended.
            if let Some(item) = self.pending.pop_front() {
                if let Ok(event) = &item {
                    self.requested = event.revision() + 1;
                }
                return Some(item);
            }
            if self.finished {
                return None;
            }
            let end = match self.stream.message().await {
                Ok(Some(resp)) => {
                    self.store
                        .watch_response(&resp, self.requested, &mut self.pending)
                }
                Ok(None) => Some(StoreError::Unavailable(format!(
                    "etcd at {}: watch stream closed",
                    self.store.endpoints
                ))),
                Err(e) => Some(StoreError::Unavailable(format!(
                    "etcd at {}: watch broken: {e}",
                    self.store.endpoints
                ))),
            };
            if let Some(error) = end {
                tracing::info!(endpoints = %self.store.endpoints, %error, "etcd watch ended");
                self.pending.push_back(Err(error));
                self.finished = true;
            }
        }
    }
}
