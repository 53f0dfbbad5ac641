//! The embedded store's tables, its schema version, and what happens once
//! when a database is opened.
//!
//! Tables:
//! - `kv`: key → record (see `record`), the current value of every key;
//! - `lease_keys`: (lease id, key) → (), which keys each lease deletes;
//! - `meta`: `schema_version` and the global `revision`.
//!
//! This module must never change the layout of an existing database without
//! bumping [`SCHEMA_VERSION`].

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{record, storage_error};
use crate::{Revision, StoreError};

/// The schema this build reads and writes.
pub(crate) const SCHEMA_VERSION: u32 = 1;

pub(crate) const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
pub(crate) const LEASE_KEYS: TableDefinition<(i64, &str), ()> = TableDefinition::new("lease_keys");
pub(crate) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

pub(crate) const SCHEMA_KEY: &str = "schema_version";
pub(crate) const REVISION_KEY: &str = "revision";

/// Checks (or records) the schema version and deletes the keys bound to the
/// leases of a previous process: their holders are gone, and leases live
/// only in memory. Returns the store's revision.
pub(crate) fn prepare(db: &Database, location: &str) -> Result<Revision, StoreError> {
    let err = |e: &dyn std::fmt::Display| storage_error(location, e);
    let txn = db.begin_write().map_err(|e| err(&e))?;
    let revision;
    let mut changed = false;
    {
        let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
        let mut kv = txn.open_table(KV).map_err(|e| err(&e))?;
        let mut lease_keys = txn.open_table(LEASE_KEYS).map_err(|e| err(&e))?;

        let found = meta
            .get(SCHEMA_KEY)
            .map_err(|e| err(&e))?
            .map(|v| v.value());
        match found {
            Some(v) if v == i64::from(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(StoreError::Schema {
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                    supported: SCHEMA_VERSION,
                });
            }
            None => {
                // A database with keys but no version was not written by us.
                if !kv.is_empty().map_err(|e| err(&e))? {
                    return Err(StoreError::Schema {
                        found: 0,
                        supported: SCHEMA_VERSION,
                    });
                }
                meta.insert(SCHEMA_KEY, i64::from(SCHEMA_VERSION))
                    .map_err(|e| err(&e))?;
                changed = true;
            }
        }

        let mut rev = meta
            .get(REVISION_KEY)
            .map_err(|e| err(&e))?
            .map_or(0, |v| v.value());

        let mut orphans = Vec::new();
        for entry in lease_keys.iter().map_err(|e| err(&e))? {
            let (k, _) = entry.map_err(|e| err(&e))?;
            let (lease, key) = k.value();
            orphans.push((lease, key.to_owned()));
        }
        if !orphans.is_empty() {
            rev += 1;
            for (lease, key) in &orphans {
                // Only delete the key if it is still bound to that lease.
                let bound = match kv.get(key.as_str()).map_err(|e| err(&e))? {
                    Some(v) => record::lease_of(key, v.value())?.map(|l| l.0) == Some(*lease),
                    None => false,
                };
                if bound {
                    kv.remove(key.as_str()).map_err(|e| err(&e))?;
                }
                lease_keys
                    .remove((*lease, key.as_str()))
                    .map_err(|e| err(&e))?;
            }
            meta.insert(REVISION_KEY, rev).map_err(|e| err(&e))?;
            changed = true;
            tracing::info!(
                location,
                keys = orphans.len(),
                revision = rev,
                "deleted keys bound to leases of a previous process"
            );
        }
        revision = rev;
    }
    if changed {
        txn.commit().map_err(|e| err(&e))?;
    } else {
        txn.abort().map_err(|e| err(&e))?;
    }
    Ok(revision)
}
