//! Who is calling, and what they are: projects, users and service accounts,
//! their roles, and API tokens. [`Directory`] keeps them in the store;
//! [`Directory::authenticate`] turns a bearer token into a [`Principal`] or
//! says exactly why it cannot.
//!
//! This crate decides nothing about routes or objects: the API's
//! authorization layer asks it who the caller is and checks the role.
//! It never stores a token's secret, only its hash.

pub mod bootstrap;
mod directory;
pub mod internal;
pub mod pki;
pub mod tls;
pub mod token;
mod view;

use chrono::{DateTime, Utc};
use skyvisor_core::auth::Identity;
use skyvisor_store::StoreError;
use thiserror::Error;

pub use directory::Directory;
pub use internal::{ClusterKey, cluster_key};
pub use token::{IssuedToken, ParsedToken};

/// The built-in identity join tokens belong to: it has no role anywhere,
/// and its tokens serve only to join a host.
pub const JOINER: &str = "skyvisor-joiner";

/// Why a request is not authenticated, or an identity operation failed.
#[derive(Debug, Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error(
        "no API token: send 'Authorization: Bearer <token>' (the CLI: `skyvisor login` or SKYVISOR_TOKEN)"
    )]
    Missing,
    /// The header or token is not well-formed.
    #[error("malformed API token: {0}")]
    Malformed(String),
    /// No token has this id, or its secret is wrong (not told apart, so a
    /// guess learns nothing).
    #[error("unknown API token {id}: no token with this id and secret exists")]
    Unknown {
        /// The token's public id.
        id: String,
    },
    /// The token expired.
    #[error("API token {id} expired at {at}")]
    Expired {
        /// The token's public id.
        id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The token was revoked.
    #[error("API token {id} was revoked at {at}")]
    Revoked {
        /// The token's public id.
        id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A join token that already served its one join.
    #[error(
        "join token {id} was used at {at}; a join token serves one join (make another with `skyvisor host join-token`)"
    )]
    Used {
        /// The token's public id.
        id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A join token used for anything but joining.
    #[error("a join token serves only to join a host (GET /v1/cluster/join)")]
    JoinOnly,
    /// The token's identity was deleted.
    #[error("API token {id} belongs to identity {identity}, which no longer exists")]
    IdentityGone {
        /// The token's public id.
        id: String,
        /// The deleted identity.
        identity: String,
    },
    /// A project, identity or token that does not exist.
    #[error("{kind} {name} not found")]
    NotFound {
        /// What was looked for.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A name that is taken.
    #[error("{kind} {name} already exists")]
    Exists {
        /// What was being created.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A bootstrap token file that cannot be used.
    #[error("bootstrap token file {path}: {message}")]
    BootstrapFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    /// The error as a store error, for a part that starts on the store and
    /// reports nothing finer: a store failure as itself, anything else as
    /// a rejection with its message.
    pub fn into_store_error(self) -> StoreError {
        match self {
            Self::Store(s) => s,
            other => StoreError::Rejected(other.to_string()),
        }
    }

    /// Whether the caller is not authenticated (HTTP 401), as opposed to an
    /// operation that failed.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::Missing
                | Self::Malformed(_)
                | Self::Unknown { .. }
                | Self::Expired { .. }
                | Self::Revoked { .. }
                | Self::Used { .. }
                | Self::IdentityGone { .. }
        )
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Who.
    pub identity: Identity,
    /// With which token (its public id).
    pub token_id: String,
}
