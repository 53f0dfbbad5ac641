//! What a new VM's guest is told through cloud-init: its hostname, the
//! project key pairs its default user accepts, and the user's user data.
//! This module checks a create request's `hostname`, `keys` and
//! `user_data` and turns them into the spec's [`GuestConfig`]; it never
//! writes anything.

use skyvisor_core::api::CreateInstanceRequest;
use skyvisor_core::keypair::KeyPair;
use skyvisor_core::{GuestConfig, GuestKey, ProjectName, ValidationError};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The most key pairs one VM may be given.
pub const MAX_KEYS: usize = 16;
/// A hostname as [`check_hostname`] accepts it, for the API document.
pub const HOSTNAME_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

impl ControlPlane {
    /// The guest configuration `req` asks for, with each key pair's public
    /// key copied in; 404 for an unknown key pair (as for an unknown
    /// network), 400 naming the field for bad user data or hostname.
    pub async fn guest_config(
        &self,
        project: &ProjectName,
        req: &CreateInstanceRequest,
    ) -> ApiResult<GuestConfig> {
        if let Some(h) = &req.hostname {
            check_hostname(h)?;
        }
        if let Some(u) = &req.user_data {
            skyvisor_cloudinit::check_user_data(u)
                .map_err(|e| ValidationError::new("user_data", e.to_string()))?;
        }
        if req.keys.len() > MAX_KEYS {
            return Err(ValidationError::new(
                "keys",
                format!(
                    "{} key pairs given; allowed: at most {MAX_KEYS}",
                    req.keys.len()
                ),
            )
            .into());
        }
        let mut ssh_keys = Vec::new();
        if !req.keys.is_empty() {
            let known = self.key_pairs(project).await?;
            for name in &req.keys {
                if ssh_keys.iter().any(|k: &GuestKey| &k.name == name) {
                    continue;
                }
                let Some(k) = known.iter().find(|k| &k.name == name) else {
                    return Err(ApiError::not_found(unknown_key(name, &known)));
                };
                ssh_keys.push(GuestKey {
                    name: k.name.clone(),
                    public_key: k.public_key.clone(),
                    fingerprint: k.fingerprint.clone(),
                });
            }
        }
        Ok(GuestConfig {
            hostname: req.hostname.clone(),
            ssh_keys,
            user_data: req.user_data.clone(),
            ssh_user: None,
        })
    }
}

fn unknown_key(name: &str, known: &[KeyPair]) -> String {
    let names: Vec<&str> = known.iter().map(|k| k.name.as_str()).collect();
    format!(
        "no key pair \"{name}\" in this project; its key pairs: {} (add one with `skyvisor keypair import` or `create`)",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// A hostname: one or more DNS labels (letters, digits, hyphens; no hyphen
/// at either end), at most 63 characters each and 253 in all.
pub fn check_hostname(h: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        Err(ValidationError::new(
            "hostname",
            format!(
                "{h:?} {why}; allowed: DNS labels of letters, digits and hyphens (not first or last), \
                 at most 63 characters each, joined by dots, 253 in all"
            ),
        ))
    };
    if h.is_empty() || h.len() > 253 {
        return bad("is empty or longer than 253 characters");
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("has an empty label or one over 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return bad("is not a valid hostname");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_dns_names() {
        for ok in ["web", "web-1", "a.b.example", "x1"] {
            assert!(check_hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "we_b",
            "a..b",
            "a.",
            &"a".repeat(64),
            "héllo",
        ] {
            let e = check_hostname(bad).expect_err(bad);
            assert_eq!(e.field, "hostname");
            assert!(e.message.contains("allowed"), "{e}");
        }
    }

    #[test]
    fn an_unknown_key_names_the_projects_keys() {
        assert!(unknown_key("x", &[]).contains("none"));
    }
}
