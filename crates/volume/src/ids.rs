//! Typed ids: [`VolumeId`] and [`NodeId`]. Validated once at construction so
//! they are safe in file names and on the wire; never pass bare strings.

use serde::{Deserialize, Serialize};

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} {value:?}: use 1 to 64 characters of a-z, A-Z, 0-9, '.', '_' or '-', not starting with '.'"
)]
pub struct InvalidId {
    /// Which kind of id.
    pub kind: &'static str,
    /// The refused value.
    pub value: String,
}

fn validate(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidId {
            kind,
            value: value.to_owned(),
        })
    }
}

macro_rules! id_type {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }
    };
}

id_type!(VolumeId, "volume id", "The id of a replicated volume.");
id_type!(
    NodeId,
    "node id",
    "The id of a node (host) holding a replica or serving a volume as primary; one replica of a volume per node."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(VolumeId::new("vol-1.a_b").is_ok());
        assert!(VolumeId::new("").is_err());
        assert!(VolumeId::new("../x").is_err());
        assert!(VolumeId::new(".hidden").is_err());
        assert!(NodeId::new("a/b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        let n: NodeId = serde_json::from_str("\"host-1\"").expect("valid");
        assert_eq!(n.as_str(), "host-1");
        assert!(serde_json::from_str::<NodeId>("\"bad id\"").is_err());
    }
}
