//! SSH key pairs through the CLI: a made pair's private key lands in a
//! file only its owner reads, an imported key gets the fingerprint
//! `ssh-keygen -l` prints, and bad keys are refused saying why.

use std::os::unix::fs::PermissionsExt;

use crate::harness::Cloud;

/// `ssh-keygen -t ecdsa -C ec`; `ssh-keygen -lf` prints the fingerprint below.
const EC_PUBLIC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOG3jkv9hpB8qe6izYkvzhNev8X1Wncs1RLVQcVHwiL6rT4CDVjMSXc4W31pEryMZAGd8r+/LNkajg7uickFwEs= ec";
const EC_FINGERPRINT: &str = "SHA256:QK9eZzbDv7GLh5j+ls/5O/ZZ4lA2KnjftOBLGfHV4Wg";

#[test]
fn key_pairs_are_made_imported_listed_and_deleted() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tmp");

    // Made here: the private key goes to a new 0600 file, and only there.
    let out = dir.path().join("mine");
    let made = cloud.sv_json(&[
        "keypair",
        "create",
        "mine",
        "--out",
        out.to_str().expect("path"),
    ]);
    assert_eq!(made["algorithm"], "ssh-ed25519", "{made}");
    let private = std::fs::read_to_string(&out).expect("private key file");
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let shown = cloud.sv_json(&["keypair", "show", "mine"]);
    assert_eq!(shown["fingerprint"], made["fingerprint"]);
    assert!(shown.get("private_key").is_none(), "{shown}");
    // --out never overwrites.
    let err = cloud.sv_err(&[
        "keypair",
        "create",
        "other",
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(err.contains("exists"), "{err}");

    // Imported: the fingerprint ssh-keygen prints.
    let pubfile = dir.path().join("ec.pub");
    std::fs::write(&pubfile, format!("{EC_PUBLIC}\n")).expect("write");
    let imported = cloud.sv_json(&[
        "keypair",
        "import",
        "laptop",
        "--public-key",
        pubfile.to_str().expect("path"),
    ]);
    assert_eq!(imported["fingerprint"], EC_FINGERPRINT, "{imported}");
    assert_eq!(imported["algorithm"], "ecdsa-sha2-nistp256");

    // Bad input: a private key, garbage, a taken name.
    let err = cloud.sv_err(&[
        "keypair",
        "import",
        "oops",
        "--public-key",
        out.to_str().expect("path"),
    ]);
    assert!(
        err.contains("public_key") && err.contains("private key"),
        "{err}"
    );
    let junk = dir.path().join("junk.pub");
    std::fs::write(&junk, "ssh-ed25519 not-a-key").expect("write");
    let err = cloud.sv_err(&[
        "keypair",
        "import",
        "junk",
        "--public-key",
        junk.to_str().expect("path"),
    ]);
    assert!(err.contains("not an OpenSSH public key"), "{err}");
    let err = cloud.sv_err(&[
        "keypair",
        "import",
        "laptop",
        "--public-key",
        pubfile.to_str().expect("path"),
    ]);
    assert!(err.contains("already exists"), "{err}");

    let list = cloud.sv_json(&["keypair", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["laptop", "mine"]);
    cloud.sv_ok(&["keypair", "delete", "mine"]);
    let err = cloud.sv_err(&["keypair", "show", "mine"]);
    assert!(err.contains("not found"), "{err}");
}
