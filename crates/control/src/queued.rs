//! A writer of records that go with no transaction of their own (the audit
//! trail, refusals and token events): writes queue in memory and a task
//! commits whatever has queued in one store transaction, so a burst of
//! requests costs a few writes, not one each. A write that fails is
//! logged, never fails the request that made it.

use std::sync::Arc;

use skyvisor_store::{Op, Store};

/// Most writes committed in one transaction.
const BATCH: usize = 256;

/// The queue's sending side (see the module's documentation).
#[derive(Clone)]
pub(crate) struct QueuedWriter {
    queue: tokio::sync::mpsc::UnboundedSender<Op>,
}

impl QueuedWriter {
    /// A writer to `store` whose task ends when every handle is gone;
    /// `what` names the records in its log lines.
    pub(crate) fn start(store: Arc<dyn Store>, what: &'static str) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let n = batch.len();
                if let Err(e) = store.txn(vec![], batch).await {
                    tracing::warn!(error = %e, records = n, "cannot record {what}");
                }
            }
        });
        Self { queue }
    }

    /// Queues one write.
    pub(crate) fn write(&self, op: Op) {
        let _ = self.queue.send(op);
    }
}
