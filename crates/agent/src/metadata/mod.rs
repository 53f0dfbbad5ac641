//! The instance metadata service: what a VM asks at
//! `http://169.254.169.254/` about itself (EC2's paths, see [`ec2`]).
//!
//! Each VM network on this host has a listener, opened by the host network
//! (`HostNetwork::listen_metadata`) on a socket that takes connections
//! from that network's segment only; the datapath redirects the metadata
//! address to it. A caller is then known by two things it cannot forge:
//! the network it came from (the listener) and its source address, which
//! its tap's guard lets it send from only if it is its own. The service
//! answers only about an instance running on this host on that tap; any
//! header the guest sends is never taken as who it is.

pub mod ec2;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use skyvisor_core::InstanceSpec;
use skyvisor_net::HostNetwork;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::dns::DnsService;
use ec2::{Answer, InstanceMetadata, TOKEN_HEADER, TOKEN_PATH, TOKEN_TTL_HEADER, Tokens};

/// A VM network's key: its private network id, or none for the cluster
/// network.
type NetKey = Option<u32>;

/// An instance registered with the service.
struct Entry {
    tap: String,
    since: Instant,
    meta: Arc<InstanceMetadata>,
}

/// A network's listeners (the metadata service's and the DNS server's)
/// and where they listen.
struct Listener {
    gateway: Ipv4Addr,
    namespace: Option<u64>,
    task: JoinHandle<()>,
    dns: Option<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(d) = &self.dns {
            d.abort();
        }
    }
}

#[derive(Default)]
struct Registry {
    by_addr: HashMap<(NetKey, Ipv4Addr), Entry>,
    tokens: Tokens,
    listeners: HashMap<NetKey, Listener>,
}

/// The host's metadata service, and the DNS server of each network it
/// listens on (both know a caller the same way).
pub struct MetadataService {
    network: Arc<dyn HostNetwork>,
    dns: Arc<DnsService>,
    registry: std::sync::Mutex<Registry>,
}

/// What a listener's handler needs.
#[derive(Clone)]
struct Served {
    service: Arc<MetadataService>,
    net: NetKey,
}

impl MetadataService {
    /// A service with nothing registered and nothing listening yet, whose
    /// networks' DNS servers answer from `dns`.
    pub fn new(network: Arc<dyn HostNetwork>, dns: Arc<DnsService>) -> Arc<Self> {
        Arc::new(Self {
            network,
            dns,
            registry: std::sync::Mutex::new(Registry::default()),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry holds no invariant a panicking holder could break
        // half-way: carry on with it.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves instance `spec`, whose guarded tap `tap` is on `bridge`:
    /// registers it and makes sure its network has a listener. A listener
    /// that cannot be opened is logged, not fatal: the VM runs without
    /// the service rather than not at all.
    pub async fn attach(self: &Arc<Self>, tap: &str, spec: &InstanceSpec, bridge: &str) {
        let n = &spec.network;
        let meta = Arc::new(metadata_of(spec));
        self.registry().by_addr.insert(
            (n.vni, n.ip),
            Entry {
                tap: tap.to_string(),
                since: Instant::now(),
                meta,
            },
        );
        if let Err(e) = self.ensure_listener(n.vni, bridge, n.gateway).await {
            warn!(instance = %spec.name, error = %e, "the metadata service cannot listen on this instance's network");
        }
    }

    async fn ensure_listener(
        self: &Arc<Self>,
        net: NetKey,
        bridge: &str,
        gateway: Ipv4Addr,
    ) -> Result<(), skyvisor_net::NetError> {
        // A private network's router may have been made anew since its
        // listener opened (a listener keeps its old namespace alive).
        let namespace = net
            .and_then(|v| skyvisor_net::namespace_id(&skyvisor_net::private_devices(v).namespace));
        {
            let reg = self.registry();
            if let Some(l) = reg.listeners.get(&net)
                && l.gateway == gateway
                && l.namespace == namespace
                && !l.task.is_finished()
            {
                return Ok(());
            }
        }
        let Some(std_listener) = self.network.listen_metadata(net, bridge, gateway).await? else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| {
            skyvisor_net::NetError::Command {
                command: "listen for the metadata service".to_string(),
                stderr: e.to_string(),
            }
        })?;
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(Served {
                service: self.clone(),
                net,
            })
            .into_make_service_with_connect_info::<SocketAddr>();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "a metadata service listener failed");
            }
        });
        info!(network = ?net, %gateway, "metadata service listening");
        let dns = self.serve_dns(net, bridge, gateway).await;
        self.registry().listeners.insert(
            net,
            Listener {
                gateway,
                namespace,
                task,
                dns,
            },
        );
        Ok(())
    }

    /// Starts network `net`'s DNS server on its gateway. One that cannot
    /// listen (port 53 taken on the host) is logged, not fatal: guests
    /// then resolve nothing, but run.
    async fn serve_dns(
        self: &Arc<Self>,
        net: NetKey,
        bridge: &str,
        gateway: Ipv4Addr,
    ) -> Option<JoinHandle<()>> {
        let (udp, tcp) = match self.network.listen_dns(net, bridge, gateway).await {
            Ok(Some(sockets)) => sockets,
            Ok(None) => return None,
            Err(e) => {
                warn!(network = ?net, error = %e, "the DNS server cannot listen on this network");
                return None;
            }
        };
        let service = Arc::downgrade(self);
        let callers: skyvisor_dns::Callers = Arc::new(move |ip| {
            let me = service.upgrade()?.caller(net, ip)?;
            Some(me.project.clone())
        });
        let resolver = self.dns.resolver(callers)?;
        info!(network = ?net, %gateway, "DNS server listening");
        Some(tokio::spawn(async move {
            if let Err(e) = resolver.serve(udp, tcp).await {
                warn!(error = %e, "a DNS server failed");
            }
        }))
    }

    /// Forgets the instances whose taps are not in `taps` (as listed at
    /// `listed_at`; one registered since is kept) and closes the
    /// listeners of private networks no instance here is on any more.
    pub fn retain(&self, taps: &[String], listed_at: Instant) {
        let mut reg = self.registry();
        reg.by_addr
            .retain(|_, e| e.since > listed_at || taps.contains(&e.tap));
        let ids: Vec<String> = reg.by_addr.values().map(|e| e.meta.id.clone()).collect();
        reg.tokens
            .retain_instances(&|i| ids.iter().any(|id| id == i));
        let in_use: Vec<NetKey> = reg.by_addr.keys().map(|(n, _)| *n).collect();
        reg.listeners
            .retain(|net, _| net.is_none() || in_use.contains(net));
    }

    /// The instance at `ip` on network `net`, if it runs here.
    fn caller(&self, net: NetKey, ip: Ipv4Addr) -> Option<Arc<InstanceMetadata>> {
        self.registry()
            .by_addr
            .get(&(net, ip))
            .map(|e| e.meta.clone())
    }
}

/// What the metadata service says about `spec`.
fn metadata_of(spec: &InstanceSpec) -> InstanceMetadata {
    InstanceMetadata {
        id: spec.id.to_string(),
        name: spec.name.to_string(),
        project: spec.project.to_string(),
        hostname: spec.guest_hostname(),
        instance_type: spec.type_label(),
        image: spec.image.to_string(),
        ip: spec.network.ip,
        prefix_len: spec.network.prefix_len,
        mac: spec.network.mac.to_string(),
        keys: spec
            .guest
            .ssh_keys
            .iter()
            .map(|k| (k.name.clone(), k.public_key.clone()))
            .collect(),
        user_data: spec.guest.user_data.clone(),
        created_at: spec.created_at.to_rfc3339(),
    }
}

fn respond(a: Answer) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, a.content_type)
        .body(Body::from(a.body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Every request: who asks (by network and source address), then what.
async fn answer(
    State(served): State<Served>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let SocketAddr::V4(peer) = peer else {
        return respond(Answer {
            status: 403,
            content_type: "text/plain",
            body: "IPv4 callers only\n".into(),
        });
    };
    let Some(me) = served.service.caller(served.net, *peer.ip()) else {
        debug!(caller = %peer, network = ?served.net, "metadata request from no instance of this host");
        return respond(Answer {
            status: 403,
            content_type: "text/plain",
            body: format!("{} is not an instance on this host\n", peer.ip()),
        });
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = Instant::now();
    let path = uri.path();
    if path == TOKEN_PATH {
        if method != Method::PUT {
            return respond(Answer {
                status: 405,
                content_type: "text/plain",
                body: format!("{TOKEN_PATH} takes PUT\n"),
            });
        }
        let forwarded = headers.contains_key("x-forwarded-for");
        let issued =
            served
                .service
                .registry()
                .tokens
                .issue(&me.id, text(TOKEN_TTL_HEADER), forwarded, now);
        return match issued {
            Ok(token) => respond(Answer {
                status: 200,
                content_type: "text/plain",
                body: token,
            }),
            Err(refusal) => respond(refusal.answer()),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return respond(Answer {
            status: 405,
            content_type: "text/plain",
            body: "the metadata service takes GET (and PUT for a session token)\n".into(),
        });
    }
    // IMDSv1 and v2 both: no token is fine; a token must be good.
    if let Some(token) = text(TOKEN_HEADER)
        && !served.service.registry().tokens.valid(&me.id, token, now)
    {
        return respond(Answer {
            status: 401,
            content_type: "text/plain",
            body: "the session token is invalid or expired\n".into(),
        });
    }
    respond(ec2::get(&me, path))
}
