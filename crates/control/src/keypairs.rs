//! SSH key pairs of a project: import a public key, or make a pair whose
//! private half is returned once and stored nowhere; list, show, delete.
//! This module reads and writes OpenSSH's key formats through the
//! `ssh-key` crate and never keeps a private key.

use chrono::Utc;
use skyvisor_core::keypair::{CreateKeyPairRequest, CreatedKeyPair, KeyPair, MAX_PUBLIC_KEY_BYTES};
use skyvisor_core::{ProjectName, ValidationError, keys};
use skyvisor_store::{StoreExt, encode};
use tracing::info;

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The algorithms a key pair may use: what current OpenSSH servers accept
/// by default.
const ALLOWED: &str = "ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa (2048 bits or more)";

/// Parses and checks an OpenSSH public key; returns it on one line with
/// its algorithm and SHA-256 fingerprint.
pub fn parse_public_key(text: &str) -> Result<(String, String, String), ValidationError> {
    let field = "public_key";
    if text.len() > MAX_PUBLIC_KEY_BYTES {
        return Err(ValidationError::new(
            field,
            format!(
                "{} bytes; allowed: at most {MAX_PUBLIC_KEY_BYTES}",
                text.len()
            ),
        ));
    }
    let line = text.trim();
    if line.contains("PRIVATE KEY") {
        return Err(ValidationError::new(
            field,
            "is a private key; give the public one (the .pub file) and keep the private key to yourself",
        ));
    }
    if line.contains('\n') {
        return Err(ValidationError::new(
            field,
            "holds more than one line; give one public key (the contents of a .pub file)",
        ));
    }
    let key = ssh_key::PublicKey::from_openssh(line).map_err(|e| {
        ValidationError::new(
            field,
            format!("is not an OpenSSH public key ({e}); expected `ALGORITHM BASE64 [COMMENT]`, as in an id_ed25519.pub file"),
        )
    })?;
    let algorithm = key.algorithm();
    let ok = match key.key_data() {
        ssh_key::public::KeyData::Ed25519(_) | ssh_key::public::KeyData::Ecdsa(_) => true,
        ssh_key::public::KeyData::Rsa(rsa) => {
            rsa.n.as_positive_bytes().map_or(0, |b| b.len()) * 8 >= 2048
        }
        _ => false,
    };
    if !ok {
        return Err(ValidationError::new(
            field,
            format!(
                "algorithm {} is not accepted; allowed: {ALLOWED}",
                algorithm.as_str()
            ),
        ));
    }
    let fingerprint = key.fingerprint(ssh_key::HashAlg::Sha256).to_string();
    let one_line = key
        .to_openssh()
        .map_err(|e| ValidationError::new(field, format!("cannot be written back: {e}")))?;
    Ok((one_line, algorithm.as_str().to_string(), fingerprint))
}

/// A new Ed25519 pair: (public key line, private key in OpenSSH format).
fn generate(comment: &str) -> Result<(String, String), ApiError> {
    let mut private =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .map_err(|e| ApiError::internal(format!("making a key pair: {e}")))?;
    private.set_comment(comment);
    let public = private
        .public_key()
        .to_openssh()
        .map_err(|e| ApiError::internal(format!("writing a public key: {e}")))?;
    let pem = private
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| ApiError::internal(format!("writing a private key: {e}")))?;
    Ok((public, pem.to_string()))
}

impl ControlPlane {
    /// The key pairs of `project`, by name.
    pub async fn key_pairs(&self, project: &ProjectName) -> ApiResult<Vec<KeyPair>> {
        let (list, _) = self
            .store
            .list_json::<KeyPair>(&keys::in_project(keys::KEYPAIRS, project))
            .await?;
        let mut out: Vec<KeyPair> = list.into_iter().map(|(k, _)| k).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Key pair `name` of `project`, or 404.
    pub async fn key_pair(&self, project: &ProjectName, name: &str) -> ApiResult<KeyPair> {
        skyvisor_core::names::validate_name("name", name)?;
        self.store
            .get_json::<KeyPair>(&keys::keypair(project, name))
            .await?
            .map(|(k, _)| k)
            .ok_or_else(|| ApiError::not_found(format!("key pair \"{name}\" not found")))
    }

    /// Imports a public key, or makes a new pair (see
    /// [`CreateKeyPairRequest`]).
    pub async fn create_key_pair(
        &self,
        project: &ProjectName,
        req: CreateKeyPairRequest,
    ) -> ApiResult<CreatedKeyPair> {
        skyvisor_core::names::validate_name("name", &req.name)?;
        let (public, private) = match &req.public_key {
            Some(text) => (text.clone(), None),
            None => {
                let (public, private) = generate(&format!("{}@{project}", req.name))?;
                (public, Some(private))
            }
        };
        let (public_key, algorithm, fingerprint) = parse_public_key(&public)?;
        let key_pair = KeyPair {
            name: req.name.clone(),
            project: project.clone(),
            public_key,
            algorithm,
            fingerprint,
            created_at: Utc::now(),
        };
        if !self
            .store
            .create(&keys::keypair(project, &req.name), encode(&key_pair))
            .await?
        {
            return Err(ApiError::already_exists(format!(
                "key pair \"{}\" already exists",
                req.name
            )));
        }
        info!(%project, key_pair = %key_pair.name, fingerprint = %key_pair.fingerprint, made = private.is_some(), "key pair added");
        Ok(CreatedKeyPair {
            key_pair,
            private_key: private,
        })
    }

    /// Deletes key pair `name` of `project` (VMs that got it keep it).
    pub async fn delete_key_pair(&self, project: &ProjectName, name: &str) -> ApiResult<()> {
        self.key_pair(project, name).await?;
        self.store.delete(&keys::keypair(project, name)).await?;
        info!(%project, key_pair = %name, "key pair deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_pair_parses_back_with_the_same_fingerprint() {
        let (public, private) = generate("t@default").expect("generate");
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let (line, algorithm, fingerprint) = parse_public_key(&public).expect("parse");
        assert_eq!(algorithm, "ssh-ed25519");
        assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        assert_eq!(line, public);
        let back = ssh_key::PrivateKey::from_openssh(&private).expect("private");
        assert_eq!(
            back.public_key()
                .fingerprint(ssh_key::HashAlg::Sha256)
                .to_string(),
            fingerprint
        );
    }

    #[test]
    fn an_imported_key_gets_the_fingerprint_ssh_keygen_prints() {
        // ssh-keygen -t ecdsa; ssh-keygen -lf prints SHA256:QK9eZzbDv7GLh5j+ls/5O/ZZ4lA2KnjftOBLGfHV4Wg
        let (_, algorithm, fingerprint) =
            parse_public_key("  ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOG3jkv9hpB8qe6izYkvzhNev8X1Wncs1RLVQcVHwiL6rT4CDVjMSXc4W31pEryMZAGd8r+/LNkajg7uickFwEs= ec\n").expect("ecdsa");
        assert_eq!(algorithm, "ecdsa-sha2-nistp256");
        assert_eq!(
            fingerprint,
            "SHA256:QK9eZzbDv7GLh5j+ls/5O/ZZ4lA2KnjftOBLGfHV4Wg"
        );
    }

    #[test]
    fn bad_keys_are_refused_saying_why() {
        for (text, why) in [
            ("", "not an OpenSSH public key"),
            ("ssh-ed25519 not-base64", "not an OpenSSH public key"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "is a private key"),
            ("a\nb", "more than one line"),
        ] {
            let e = parse_public_key(text).expect_err(text);
            assert_eq!(e.field, "public_key");
            assert!(e.message.contains(why), "{text:?}: {e}");
        }
        // ssh-keygen -t rsa -b 1024: too weak.
        let e = parse_public_key("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC91/jh90UbvC0DloYntMqdDLPu2OI82fIMpWLbjtQPVYs12A8vBpxIZfafU66KOyembJq1JSnAiqihHwGgyhGNvXFnkteLfCQDvIWtOA9807x9RiPX1MY4YtiBGFEFnj/ZjBAZJQcrl+OD6Le8P+vOTzTaWwMiV4TjBGxMIv2nmQ== small").expect_err("rsa 1024");
        assert!(e.message.contains("ssh-rsa (2048 bits or more)"), "{e}");
        let long = "x".repeat(MAX_PUBLIC_KEY_BYTES + 1);
        assert!(
            parse_public_key(&long)
                .expect_err("long")
                .message
                .contains("at most")
        );
    }
}
