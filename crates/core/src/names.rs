//! Validated names of the things users create and refer to.
//!
//! All names follow the rules of a DNS label so that they can be used as
//! guest hostnames and in store keys without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// The rules of [`validate_name`] as a regular expression, for the API's
/// document.
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Longest name accepted for any object.
pub const MAX_NAME_LEN: usize = 63;

/// Checks `value` against the DNS-label rules used for every name:
/// 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a letter and
/// not ending with `-`.
pub fn validate_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let allowed = "1 to 63 characters of lowercase letters, digits and '-', \
                   starting with a letter and not ending with '-'";
    let fail = |what: &str| {
        Err(ValidationError::new(
            field,
            format!("{what} (got {value:?}); allowed: {allowed}"),
        ))
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return fail("is too long");
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return fail("must start with a lowercase letter");
    }
    if value.ends_with('-') {
        return fail("must not end with '-'");
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return fail(&format!("contains {bad:?}"));
    }
    Ok(())
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, pattern = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                validate_name($field, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_name!(
    /// The name of an instance (a VM), chosen by its user; unique within
    /// its project.
    InstanceName,
    "instance name"
);
validated_name!(
    /// The unique name of a host in the pool.
    HostName,
    "host name"
);
validated_name!(
    /// The unique name of a guest image.
    ImageName,
    "image name"
);
validated_name!(
    /// The name of a replicated block volume, unique within its project.
    VolumeName,
    "volume name"
);
validated_name!(
    /// The name of an instance type such as `small`.
    TypeName,
    "instance type"
);
validated_name!(
    /// The name of a spread (anti-affinity) group: no two instances of one
    /// group run on the same host.
    GroupName,
    "spread group"
);
validated_name!(
    /// The name of a project: the unit of ownership, isolation and quota.
    ProjectName,
    "project name"
);
validated_name!(
    /// The name of an identity (a user or a service account).
    IdentityName,
    "identity name"
);
validated_name!(
    /// The unique name of a control-plane server in a cluster.
    ServerName,
    "server name"
);

/// An object's name together with the project that owns it: what names an
/// object whose name is unique only within its project (instances,
/// volumes). Shown as `project/name`, the form it takes in store keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scoped<N> {
    /// The owning project.
    pub project: ProjectName,
    /// The name within the project.
    pub name: N,
}

impl<N> Scoped<N> {
    /// `name` of `project`.
    pub fn new(project: ProjectName, name: N) -> Self {
        Self { project, name }
    }
}

impl<N: fmt::Display> fmt::Display for Scoped<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.project, self.name)
    }
}

impl<N: FromStr<Err = ValidationError>> FromStr for Scoped<N> {
    type Err = ValidationError;
    /// Parses `project/name`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (project, name) = s.split_once('/').ok_or_else(|| {
            ValidationError::new("scoped name", format!("expected PROJECT/NAME (got {s:?})"))
        })?;
        Ok(Self {
            project: ProjectName::new(project)?,
            name: name.parse()?,
        })
    }
}

/// An instance of a project.
pub type InstanceRef = Scoped<InstanceName>;
/// A volume of a project.
pub type VolumeRef = Scoped<VolumeName>;
/// An image of a project.
pub type ImageRef = Scoped<ImageName>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web-1", "x9", &"a".repeat(63)] {
            assert!(InstanceName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        let cases = [
            ("", "must not be empty"),
            ("1abc", "must start with a lowercase letter"),
            ("Web", "must start with a lowercase letter"),
            ("web-", "must not end with '-'"),
            ("we_b", "contains '_'"),
            ("we/b", "contains '/'"),
        ];
        for (bad, why) in cases {
            let err = InstanceName::new(bad).expect_err(bad);
            assert!(err.message.contains(why), "{bad}: {err}");
            assert_eq!(err.field, "instance name");
        }
        assert!(InstanceName::new("a".repeat(64)).is_err());
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<InstanceName>("\"Bad Name\"").expect_err("invalid");
        assert!(err.to_string().contains("invalid instance name"));
        let ok: InstanceName = serde_json::from_str("\"good\"").expect("valid");
        assert_eq!(ok.as_str(), "good");
    }

    #[test]
    fn scoped_names_print_and_parse_as_project_slash_name() {
        let r = InstanceRef::new(
            ProjectName::new("web").expect("project"),
            InstanceName::new("api").expect("name"),
        );
        assert_eq!(r.to_string(), "web/api");
        assert_eq!("web/api".parse::<InstanceRef>().expect("parse"), r);
        assert!("api".parse::<InstanceRef>().is_err());
        assert!("web/a/b".parse::<InstanceRef>().is_err());
    }

    proptest! {
        #[test]
        fn valid_names_never_contain_separators(s in "\\PC{0,80}") {
            if let Ok(n) = InstanceName::new(s.clone()) {
                prop_assert!(!n.as_str().contains('/'));
                prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
            }
        }
    }
}
