//! The on-disk form of one key's value and revisions.
//!
//! Layout (little endian): a format byte, create revision (8 bytes), mod
//! revision (8), lease id (8, 0 = none), then the value. This module only
//! encodes and decodes; it must never touch the database.

use crate::{KeyValue, LeaseId, Revision, StoreError};

/// The only record format this build writes and reads.
const FORMAT: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// Encodes a record for `value` with its revisions and lease.
pub(crate) fn encode(
    create_revision: Revision,
    mod_revision: Revision,
    lease: Option<LeaseId>,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + value.len());
    out.push(FORMAT);
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(&lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Decodes the record stored at `key`.
pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.to_owned(),
        message,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "record of {} bytes is shorter than its {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT {
        return Err(corrupt(format!("unknown record format {}", bytes[0])));
    }
    let field = |at: usize| -> i64 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[at..at + 8]);
        i64::from_le_bytes(raw)
    };
    let lease = field(17);
    Ok(KeyValue {
        key: key.to_owned(),
        value: bytes[HEADER_LEN..].to_vec(),
        create_revision: field(1),
        mod_revision: field(9),
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

/// The lease a stored record is bound to, without copying its value.
pub(crate) fn lease_of(key: &str, bytes: &[u8]) -> Result<Option<LeaseId>, StoreError> {
    if bytes.len() < HEADER_LEN || bytes[0] != FORMAT {
        return decode(key, bytes).map(|kv| kv.lease);
    }
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[17..25]);
    let lease = i64::from_le_bytes(raw);
    Ok((lease != 0).then_some(LeaseId(lease)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let bytes = encode(3, 7, Some(LeaseId(42)), b"hello");
        let kv = decode("k", &bytes).expect("decodes");
        assert_eq!(kv.key, "k");
        assert_eq!(kv.value, b"hello");
        assert_eq!(kv.create_revision, 3);
        assert_eq!(kv.mod_revision, 7);
        assert_eq!(kv.lease, Some(LeaseId(42)));
        assert_eq!(lease_of("k", &bytes).expect("lease"), Some(LeaseId(42)));
        let unleased = decode("k", &encode(1, 1, None, b"")).expect("decodes");
        assert_eq!(unleased.lease, None);
        assert!(unleased.value.is_empty());
    }

    #[test]
    fn short_or_unknown_records_are_corrupt() {
        assert!(matches!(decode("k", b"abc"), Err(StoreError::Corrupt { key, .. }) if key == "k"));
        let mut bytes = encode(1, 1, None, b"x");
        bytes[0] = 9;
        assert!(matches!(
            decode("k", &bytes),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            lease_of("k", &bytes),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
