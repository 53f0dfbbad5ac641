//! Forwarding names outside the internal zone to upstream resolvers
//! (the host's), through hickory's resolver, which caches and falls back
//! from UDP to TCP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveErrorKind, TokioResolver};
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{Name, RecordType};
use tracing::debug;

use crate::Answer;

/// How long one upstream may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The upstream resolvers other names go to.
pub struct Forwarder {
    upstream: Vec<SocketAddr>,
    resolver: TokioResolver,
}

impl Forwarder {
    /// Forwards to `upstream` (UDP, then TCP when an answer is truncated).
    pub fn new(upstream: Vec<SocketAddr>) -> Self {
        let mut config = ResolverConfig::new();
        for addr in &upstream {
            config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = UPSTREAM_TIMEOUT;
        opts.attempts = 2;
        // Names are asked fully qualified: no search list, no ndots games.
        opts.ndots = 0;
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Self { upstream, resolver }
    }

    /// The resolvers of a `resolv.conf` text (port 53; at most three, as
    /// the C library takes).
    pub fn upstream_of_resolv_conf(text: &str) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .take(3)
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }

    /// The upstream answer to `name` of type `qtype`.
    pub(crate) async fn forward(&self, name: &Name, qtype: RecordType) -> Answer {
        if self.upstream.is_empty() {
            return Answer::code(ResponseCode::Refused);
        }
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        match self.resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => Answer::forwarded(ResponseCode::NoError, lookup.records().to_vec()),
            Err(e) => {
                let code = match e.kind() {
                    ResolveErrorKind::Proto(p) => match p.kind() {
                        ProtoErrorKind::NoRecordsFound { response_code, .. } => *response_code,
                        _ => ResponseCode::ServFail,
                    },
                    _ => ResponseCode::ServFail,
                };
                debug!(%name, ?qtype, error = %e, "forwarded DNS query failed");
                Answer::forwarded(code, Vec::new())
            }
        }
    }
}
