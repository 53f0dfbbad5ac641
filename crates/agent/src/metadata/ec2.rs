//! The EC2-compatible answers of the metadata service, as pure functions of
//! the caller's instance: the `meta-data` tree, `user-data`, the identity
//! document, and IMDSv2 session tokens.
//!
//! Paths follow EC2's instance metadata service: a version segment
//! (`latest`, or any dated version, all answered alike), then
//! `meta-data/...`, `user-data` or `dynamic/...`. A directory lists its
//! entries one per line, sub-directories with a trailing `/`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What the metadata service tells an instance about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMetadata {
    /// The instance's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its project.
    pub project: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Its instance type (`custom` for a custom size).
    pub instance_type: String,
    /// The image it was made from.
    pub image: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its network's prefix length.
    pub prefix_len: u8,
    /// Its MAC, `aa:bb:...`.
    pub mac: String,
    /// Its key pairs: name and OpenSSH public key.
    pub keys: Vec<(String, String)>,
    /// The user's user data.
    pub user_data: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }
}

/// A node of the metadata tree.
enum Node {
    Leaf(String),
    /// Entries: the path segment, how the listing shows it, and the node.
    Dir(Vec<(String, String, Node)>),
}

fn dir(entries: Vec<(&str, Node)>) -> Node {
    Node::Dir(
        entries
            .into_iter()
            .map(|(k, n)| (k.to_string(), k.to_string(), n))
            .collect(),
    )
}

fn leaf(v: impl Into<String>) -> Node {
    Node::Leaf(v.into())
}

/// The subnet of `ip` with `prefix_len`, as `a.b.c.d/n`.
fn subnet_of(ip: Ipv4Addr, prefix_len: u8) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    format!("{}/{prefix_len}", Ipv4Addr::from(u32::from(ip) & mask))
}

/// The identity document (`dynamic/instance-identity/document`).
fn identity_document(m: &InstanceMetadata) -> String {
    let doc = serde_json::json!({
        "accountId": m.project,
        "architecture": "x86_64",
        "imageId": m.image,
        "instanceId": m.id,
        "instanceType": m.instance_type,
        "pendingTime": m.created_at,
        "privateIp": m.ip.to_string(),
        "region": "skyvisor",
        "version": "2017-09-30",
    });
    format!("{doc:#}")
}

/// The whole tree under a version segment.
fn tree(m: &InstanceMetadata) -> Node {
    let mac = dir(vec![
        ("device-number", leaf("0")),
        ("local-ipv4s", leaf(m.ip.to_string())),
        ("mac", leaf(m.mac.clone())),
        (
            "subnet-ipv4-cidr-block",
            leaf(subnet_of(m.ip, m.prefix_len)),
        ),
    ]);
    let network = dir(vec![(
        "interfaces",
        dir(vec![(
            "macs",
            Node::Dir(vec![(m.mac.clone(), m.mac.clone(), mac)]),
        )]),
    )]);
    let mut meta = vec![
        ("ami-id", leaf(m.image.clone())),
        ("hostname", leaf(m.hostname.clone())),
        ("instance-id", leaf(m.id.clone())),
        ("instance-type", leaf(m.instance_type.clone())),
        ("local-hostname", leaf(m.hostname.clone())),
        ("local-ipv4", leaf(m.ip.to_string())),
        ("mac", leaf(m.mac.clone())),
        ("network", network),
        (
            "tags",
            dir(vec![(
                "instance",
                dir(vec![
                    ("Name", leaf(m.name.clone())),
                    ("Project", leaf(m.project.clone())),
                ]),
            )]),
        ),
    ];
    if !m.keys.is_empty() {
        let keys = m
            .keys
            .iter()
            .enumerate()
            .map(|(i, (name, key))| {
                (
                    i.to_string(),
                    format!("{i}={name}"),
                    dir(vec![("openssh-key", leaf(key.clone()))]),
                )
            })
            .collect();
        meta.push(("public-keys", Node::Dir(keys)));
    }
    let mut top = vec![
        (
            "dynamic",
            dir(vec![(
                "instance-identity",
                dir(vec![("document", leaf(identity_document(m)))]),
            )]),
        ),
        ("meta-data", dir(meta)),
    ];
    if let Some(u) = &m.user_data {
        top.push(("user-data", leaf(u.clone())));
    }
    dir(top)
}

/// Whether `s` names a metadata version: `latest` or a date `YYYY-MM-DD`.
fn is_version(s: &str) -> bool {
    s == "latest"
        || (s.len() == 10
            && s.char_indices().all(|(i, c)| match i {
                4 | 7 => c == '-',
                _ => c.is_ascii_digit(),
            }))
}

/// The answer to a `GET` of `path` by the instance `m`.
pub fn get(m: &InstanceMetadata, path: &str) -> Answer {
    let not_found = || Answer::text(404, format!("not found: {path}\n"));
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let Some(version) = segments.next() else {
        return Answer::text(200, "latest\n");
    };
    if !is_version(version) {
        return not_found();
    }
    let mut node = tree(m);
    for seg in segments {
        let Node::Dir(entries) = node else {
            return not_found();
        };
        match entries.into_iter().find(|(k, _, _)| k == seg) {
            Some((_, _, n)) => node = n,
            None => return not_found(),
        }
    }
    match node {
        Node::Leaf(v) => {
            let content_type = if v.trim_start().starts_with('{') {
                "application/json"
            } else {
                "text/plain"
            };
            Answer {
                status: 200,
                content_type,
                body: v,
            }
        }
        Node::Dir(entries) => {
            let lines: Vec<String> = entries
                .iter()
                .map(|(_, shown, n)| match n {
                    Node::Dir(_) => format!("{shown}/"),
                    Node::Leaf(_) => shown.clone(),
                })
                .collect();
            Answer::text(200, lines.join("\n"))
        }
    }
}

/// The path that issues IMDSv2 session tokens (with `PUT`).
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The request header that asks for a token's lifetime, in seconds.
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The request header that carries a token.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The longest a token may live (EC2's: six hours).
pub const MAX_TOKEN_TTL: u64 = 21_600;
/// Tokens kept per instance; a new one beyond this replaces the oldest.
const TOKENS_PER_INSTANCE: usize = 32;

/// Session tokens issued, each bound to the instance it was issued to.
#[derive(Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, (String, Instant)>,
}

/// Why a token request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// The TTL header is missing or out of range.
    BadTtl(String),
    /// The request came through a proxy (it names one): EC2 refuses these
    /// so that a proxy inside the guest cannot be turned against it.
    Forwarded,
}

impl TokenRefusal {
    /// The answer for it.
    pub fn answer(&self) -> Answer {
        match self {
            TokenRefusal::BadTtl(got) => Answer::text(
                400,
                format!(
                    "{TOKEN_TTL_HEADER} must be a whole number of seconds from 1 to {MAX_TOKEN_TTL}, got {got}\n"
                ),
            ),
            TokenRefusal::Forwarded => Answer::text(
                403,
                "token requests through a proxy (with X-Forwarded-For) are refused\n",
            ),
        }
    }
}

impl Tokens {
    /// Issues a token to `instance` for the TTL named by the request's
    /// `ttl` header.
    pub fn issue(
        &mut self,
        instance: &str,
        ttl: Option<&str>,
        forwarded: bool,
        now: Instant,
    ) -> Result<String, TokenRefusal> {
        if forwarded {
            return Err(TokenRefusal::Forwarded);
        }
        let secs = ttl
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|s| (1..=MAX_TOKEN_TTL).contains(s))
            .ok_or_else(|| {
                TokenRefusal::BadTtl(ttl.map_or("nothing".to_string(), |t| format!("{t:?}")))
            })?;
        self.by_token.retain(|_, (_, expiry)| *expiry > now);
        let mut own: Vec<(Instant, String)> = self
            .by_token
            .iter()
            .filter(|(_, (i, _))| i == instance)
            .map(|(t, (_, e))| (*e, t.clone()))
            .collect();
        if own.len() >= TOKENS_PER_INSTANCE {
            own.sort();
            for (_, t) in own.iter().take(own.len() + 1 - TOKENS_PER_INSTANCE) {
                self.by_token.remove(t);
            }
        }
        let token = hex::encode(rand::random::<[u8; 24]>());
        self.by_token.insert(
            token.clone(),
            (instance.to_string(), now + Duration::from_secs(secs)),
        );
        Ok(token)
    }

    /// Whether `token` is live and was issued to `instance`.
    pub fn valid(&self, instance: &str, token: &str, now: Instant) -> bool {
        self.by_token
            .get(token)
            .is_some_and(|(i, expiry)| i == instance && *expiry > now)
    }

    /// Forgets the tokens of instances not in `keep`.
    pub fn retain_instances(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.by_token.retain(|_, (i, _)| keep(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> InstanceMetadata {
        InstanceMetadata {
            id: "5a1d7b8e-0000-4000-8000-000000000001".into(),
            name: "web".into(),
            project: "default".into(),
            hostname: "web-1".into(),
            instance_type: "micro".into(),
            image: "debian-12".into(),
            ip: Ipv4Addr::new(10, 0, 0, 7),
            prefix_len: 24,
            mac: "52:54:00:00:00:07".into(),
            keys: vec![("mine".into(), "ssh-ed25519 AAAA mine".into())],
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            created_at: "2026-12-06T23:00:00Z".into(),
        }
    }

    #[test]
    fn paths_answer_like_ec2() {
        let m = vm();
        assert_eq!(get(&m, "/").body, "latest\n");
        assert_eq!(get(&m, "/latest/meta-data/instance-id").body, m.id);
        assert_eq!(get(&m, "/2009-04-04/meta-data/local-ipv4").body, "10.0.0.7");
        assert_eq!(get(&m, "/latest/meta-data/hostname").body, "web-1");
        assert_eq!(get(&m, "/latest/meta-data/instance-type").body, "micro");
        assert_eq!(get(&m, "/latest/meta-data/public-keys/").body, "0=mine/");
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys/0/openssh-key").body,
            "ssh-ed25519 AAAA mine"
        );
        assert_eq!(get(&m, "/latest/user-data").body, "#!/bin/sh\necho hi\n");
        assert_eq!(get(&m, "/latest/").body, "dynamic/\nmeta-data/\nuser-data");
        let listing = get(&m, "/latest/meta-data/").body;
        assert!(listing.contains("instance-id\n") && listing.contains("public-keys/"));
        assert_eq!(
            get(
                &m,
                "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:07/subnet-ipv4-cidr-block"
            )
            .body,
            "10.0.0.0/24"
        );
        let doc = get(&m, "/latest/dynamic/instance-identity/document");
        assert_eq!(doc.content_type, "application/json");
        let doc: serde_json::Value = serde_json::from_str(&doc.body).expect("json");
        assert_eq!(doc["instanceId"], m.id);
        assert_eq!(doc["privateIp"], "10.0.0.7");
        for missing in [
            "/v1/meta-data",
            "/latest/meta-data/nope",
            "/latest/meta-data/instance-id/more",
            "/latest/meta-data/public-keys/1/openssh-key",
        ] {
            assert_eq!(get(&m, missing).status, 404, "{missing}");
        }
    }

    #[test]
    fn an_instance_without_keys_or_user_data_lists_neither() {
        let mut m = vm();
        m.keys.clear();
        m.user_data = None;
        assert_eq!(get(&m, "/latest/user-data").status, 404);
        assert_eq!(get(&m, "/latest/meta-data/public-keys/").status, 404);
        assert!(!get(&m, "/latest/meta-data/").body.contains("public-keys"));
        assert_eq!(get(&m, "/latest/").body, "dynamic/\nmeta-data/");
    }

    #[test]
    fn tokens_are_bound_to_their_instance_and_expire() {
        let mut t = Tokens::default();
        let now = Instant::now();
        let a = t.issue("a", Some("60"), false, now).expect("token");
        assert!(t.valid("a", &a, now));
        assert!(!t.valid("b", &a, now), "another instance's token");
        assert!(!t.valid("a", "forged", now));
        assert!(!t.valid("a", &a, now + Duration::from_secs(61)), "expired");
        for bad in [None, Some("0"), Some("21601"), Some("soon")] {
            let e = t.issue("a", bad, false, now).expect_err("bad ttl");
            assert_eq!(e.answer().status, 400, "{bad:?}");
        }
        assert_eq!(
            t.issue("a", Some("60"), true, now)
                .expect_err("forwarded")
                .answer()
                .status,
            403
        );
        // Bounded per instance: the oldest goes.
        let first = t.issue("c", Some("10"), false, now).expect("token");
        for _ in 0..TOKENS_PER_INSTANCE {
            t.issue("c", Some("100"), false, now).expect("token");
        }
        assert!(!t.valid("c", &first, now));
        assert!(t.valid("a", &a, now), "other instances keep theirs");
        t.retain_instances(&|i| i != "a");
        assert!(!t.valid("a", &a, now));
    }
}
