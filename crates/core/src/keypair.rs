//! SSH key pairs: public keys a project keeps by name, for its VMs' users
//! to log in with (handed to guests at first boot). Only the public half
//! is stored; a pair made by Skyvisor shows its private half once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest public key accepted (an RSA 16384-bit key is about 2.8 KiB
/// in OpenSSH's one-line form).
pub const MAX_PUBLIC_KEY_BYTES: usize = 16 * 1024;

/// A project's SSH public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyPair {
    /// Its name, unique within its project.
    pub name: String,
    /// The project that owns it.
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// The public key in OpenSSH's one-line form (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
    /// Its algorithm, as OpenSSH names it (`ssh-ed25519`, `ssh-rsa`...).
    pub algorithm: String,
    /// Its SHA-256 fingerprint as `ssh-keygen -l` prints it (`SHA256:...`).
    pub fingerprint: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
}

/// Body of `POST /v1/keypairs`: imports `public_key`, or without it makes a
/// new Ed25519 pair and returns its private key once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyPairRequest {
    /// The key pair's name (a DNS label).
    pub name: String,
    /// An OpenSSH public key (`ssh-ed25519 AAAA... comment`, as in an
    /// `id_ed25519.pub` file) to import.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// A key pair as created: a made pair carries its private key, shown only
/// in this answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKeyPair {
    /// The key pair.
    pub key_pair: KeyPair,
    /// The private key in OpenSSH format, for a pair Skyvisor made; kept
    /// nowhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}
