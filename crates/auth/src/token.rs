//! API tokens: `svt_<id>_<secret>`. The id is public and names the stored
//! record; the secret is 256 random bits of which only a SHA-256 is kept.
//! A slow password hash buys nothing for a secret this long and would cost
//! every request milliseconds.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use skyvisor_core::IdentityName;
use skyvisor_core::auth::TokenRecord;

use crate::AuthError;

const PREFIX: &str = "svt_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A token just made: the bearer string (shown once) and its record.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// What the client sends as `Authorization: Bearer ...`.
    pub bearer: String,
    /// What the store keeps.
    pub record: TokenRecord,
}

/// Makes a new token for `identity`.
pub fn issue(
    identity: &IdentityName,
    description: &str,
    expires_at: Option<DateTime<Utc>>,
) -> IssuedToken {
    let id = hex::encode(rand::random::<[u8; ID_BYTES]>());
    let secret = hex::encode(rand::random::<[u8; SECRET_BYTES]>());
    IssuedToken {
        bearer: format!("{PREFIX}{id}_{secret}"),
        record: TokenRecord {
            id,
            identity: identity.clone(),
            secret_sha256: digest(&secret),
            description: description.to_string(),
            created_at: Utc::now(),
            expires_at,
            revoked_at: None,
            last_used_at: None,
            single_use: false,
        },
    }
}

/// A bearer string split into its id and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// The public id.
    pub id: String,
    /// The secret.
    pub secret: String,
}

/// Splits a bearer string; says what is wrong with a malformed one.
pub fn parse(bearer: &str) -> Result<ParsedToken, AuthError> {
    let malformed = |why: &str| AuthError::Malformed(why.to_string());
    let rest = bearer
        .strip_prefix(PREFIX)
        .ok_or_else(|| malformed("a Skyvisor token starts with 'svt_'"))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or_else(|| malformed("a Skyvisor token is 'svt_<id>_<secret>'"))?;
    let is_hex = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(id, ID_BYTES) || !is_hex(secret, SECRET_BYTES) {
        return Err(malformed(
            "the token's id or secret has the wrong length or characters",
        ));
    }
    Ok(ParsedToken {
        id: id.to_ascii_lowercase(),
        secret: secret.to_ascii_lowercase(),
    })
}

/// Whether `secret` is the one `record` was issued with.
pub fn matches(record: &TokenRecord, secret: &str) -> bool {
    constant_time_eq(digest(secret).as_bytes(), record.secret_sha256.as_bytes())
}

pub(crate) fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares without an early exit, so the time taken says nothing about
/// where two hashes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> IdentityName {
        IdentityName::new("alice").expect("name")
    }

    #[test]
    fn an_issued_token_parses_and_matches_its_record_only() {
        let t = issue(&who(), "ci", None);
        let p = parse(&t.bearer).expect("parses");
        assert_eq!(p.id, t.record.id);
        assert!(matches(&t.record, &p.secret));
        let other = issue(&who(), "ci", None);
        let q = parse(&other.bearer).expect("parses");
        assert!(!matches(&t.record, &q.secret));
        assert!(!t.record.secret_sha256.contains(&p.secret));
    }

    #[test]
    fn malformed_tokens_say_why() {
        for bad in [
            "",
            "abc",
            "svt_",
            "svt_0123",
            "svt_0123456789abcdef_short",
            "svt_zz23456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(
                matches!(parse(bad), Err(AuthError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
