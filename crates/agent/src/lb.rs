//! This host's part of every load balancer's datapath. The datapath is
//! distributed: each host answers for every balancer's address on its own
//! bridge (or private network router), the way each carries the gateway,
//! and proxies the connections of its own instances (and host processes)
//! to the balancer's backends. No host is in the path of another host's
//! clients, so a host's death takes no balancer down.
//!
//! The agent follows `lb-backends/` (written by the leader from the
//! groups' members and their health): it sets the addresses, opens a
//! listener per port, and picks a backend per connection (round robin or
//! fewest open connections from this host) among the active ones. A
//! backend that does not accept within [`CONNECT_TIMEOUT`] is skipped for
//! the next one, so a member that just died costs its clients no failed
//! connection before its health check removes it. Draining backends get
//! no new connections and keep the ones they have.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use skyvisor_core::keys;
use skyvisor_core::lb::{BackendState, LbAlgorithm, LbBackends, ListenerProtocol};
use skyvisor_store::{WatchEvent, decode};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::AgentContext;

/// How long a backend has to accept a connection before it counts as not
/// accepting (and is ejected).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a backend has to accept a connection before the next is
/// tried as well (the first to accept wins).
const STAGGER: Duration = Duration::from_millis(200);
/// How often an ejected backend is probed: a backend that did not accept
/// a client's connection goes to the back of every order (passive
/// ejection) until a probe of the host's own connects to it, so no other
/// client waits [`CONNECT_TIMEOUT`] for it before its status catches up
/// (a dead host's members stay "healthy" until the host is declared
/// dead).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often addresses and listeners are checked again (a private
/// network set up or removed meanwhile).
const RECHECK: Duration = Duration::from_secs(5);

/// One backend as a listener sees it.
#[derive(Debug)]
struct Slot {
    ip: Ipv4Addr,
    state: BackendState,
    /// Connections open to it from this host.
    open: Arc<AtomicU64>,
    /// Ejected: it did not accept a connection, and no probe has since.
    ejected: Arc<AtomicBool>,
    /// Cancelled when it leaves the balancer (its drain over, or its
    /// member gone): the connections still open to it are closed, so their
    /// clients learn at once instead of hanging on a dead member.
    gone: CancellationToken,
}

/// A backend to try, with its counters.
#[derive(Clone)]
pub(crate) struct Pick {
    /// Its address.
    pub(crate) ip: Ipv4Addr,
    /// Connections open to it from this host.
    pub(crate) open: Arc<AtomicU64>,
    ejected: Arc<AtomicBool>,
    gone: CancellationToken,
}

/// A balancer's backends and how to pick among them.
#[derive(Debug)]
pub(crate) struct Pool {
    algorithm: std::sync::Mutex<LbAlgorithm>,
    slots: std::sync::RwLock<Vec<Slot>>,
    next: AtomicUsize,
    vni: Option<u32>,
}

impl Pool {
    fn new(vni: Option<u32>) -> Self {
        Self {
            algorithm: std::sync::Mutex::new(LbAlgorithm::RoundRobin),
            slots: std::sync::RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            vni,
        }
    }

    /// Sends `pick` to the back of every order: it did not accept a
    /// connection at `addr`. A probe tries `addr` every [`PROBE_EVERY`]
    /// and brings it back when it accepts; the probe ends when the
    /// backend leaves the pool.
    pub(crate) fn eject(&self, pick: &Pick, addr: SocketAddr) {
        if pick.ejected.swap(true, Ordering::Relaxed) {
            return; // Already ejected: its probe runs.
        }
        let flag = Arc::downgrade(&pick.ejected);
        let vni = self.vni;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(flag) = flag.upgrade() else {
                    return; // No longer a backend.
                };
                if !flag.load(Ordering::Relaxed) {
                    return; // A client's connection brought it back.
                }
                if connect(vni, addr).await.is_some() {
                    debug!(%addr, "an ejected backend accepts again");
                    flag.store(false, Ordering::Relaxed);
                    return;
                }
            }
        });
    }

    /// Brings `pick` back at once: it accepted a connection.
    pub(crate) fn restore(&self, pick: &Pick) {
        pick.ejected.store(false, Ordering::Relaxed);
    }

    /// Takes the backends of `doc`, keeping the open-connection counts of
    /// those that stay.
    fn update(&self, doc: &LbBackends) {
        *self.algorithm.lock().unwrap_or_else(|p| p.into_inner()) = doc.spec.algorithm;
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let mut kept: Vec<Slot> = Vec::new();
        for b in &doc.backends {
            let (open, ejected, gone) = slots
                .iter()
                .find(|s| s.ip == b.ip)
                .map(|s| (s.open.clone(), s.ejected.clone(), s.gone.clone()))
                .unwrap_or_default();
            kept.push(Slot {
                ip: b.ip,
                state: b.state,
                open,
                ejected,
                gone,
            });
        }
        for s in slots.iter() {
            if !doc.backends.iter().any(|b| b.ip == s.ip) {
                s.gone.cancel();
            }
        }
        *slots = kept;
    }

    /// The active backends in the order to try them for a new connection;
    /// those ejected last, in case every one is.
    pub(crate) fn order(&self) -> Vec<Pick> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut active: Vec<Pick> = slots
            .iter()
            .filter(|s| s.state == BackendState::Active)
            .map(|s| Pick {
                ip: s.ip,
                open: s.open.clone(),
                ejected: s.ejected.clone(),
                gone: s.gone.clone(),
            })
            .collect();
        if active.is_empty() {
            return active;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % active.len();
        active.rotate_left(start);
        if *self.algorithm.lock().unwrap_or_else(|p| p.into_inner())
            == LbAlgorithm::LeastConnections
        {
            // Stable: among equals, round robin's order.
            active.sort_by_key(|p| p.open.load(Ordering::Relaxed));
        }
        active.sort_by_key(|p| p.ejected.load(Ordering::Relaxed));
        active
    }
}

/// A balancer served here.
struct Served {
    doc: LbBackends,
    pool: Arc<Pool>,
    /// Listeners by (on the host's own address, port).
    listeners: BTreeMap<(bool, u16), tokio::task::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            l.abort();
        }
    }
}

/// Every balancer this host serves.
pub struct LoadBalancers {
    served: Mutex<BTreeMap<String, Served>>,
    /// The networks whose service addresses this host set last (their
    /// last balancer gone, the addresses go too).
    addressed: Mutex<BTreeSet<Option<u32>>>,
    /// Connections sent to a backend, per balancer (`project/name`).
    connections: std::sync::Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl Default for LoadBalancers {
    fn default() -> Self {
        Self {
            served: Mutex::default(),
            // The cluster network once at start: addresses an earlier
            // agent left there go if no balancer has them any more.
            addressed: Mutex::new(BTreeSet::from([None])),
            connections: std::sync::Mutex::default(),
        }
    }
}

impl LoadBalancers {
    /// Connections this host sent to a backend, per balancer, since the
    /// agent started (the autoscaler's requests-per-member figure).
    pub fn connections(&self) -> BTreeMap<String, u64> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    fn counter(&self, doc: &LbBackends) -> Arc<AtomicU64> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{}/{}", doc.spec.project, doc.spec.name))
            .or_default()
            .clone()
    }

    /// Serves exactly `docs` (by key): addresses, listeners, backends.
    async fn apply(&self, ctx: &AgentContext, docs: &BTreeMap<String, LbBackends>) {
        let mut served = self.served.lock().await;
        served.retain(|k, s| {
            let keep = docs.get(k).is_some_and(|d| {
                d.spec.address == s.doc.spec.address
                    && d.spec.vni == s.doc.spec.vni
                    && d.spec.listeners == s.doc.spec.listeners
                    && d.spec.external == s.doc.spec.external
            });
            if !keep {
                info!(balancer = %k, "load balancer no longer served here as it was");
            }
            keep
        });
        // The addresses, network by network (the cluster network always;
        // a private network where this host carries it).
        // Networks with a balancer, and those that had one (their
        // addresses go): no command runs for the others.
        let mut by_net: BTreeMap<Option<u32>, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let mut addressed = self.addressed.lock().await;
        for vni in addressed.iter() {
            by_net.entry(*vni).or_default();
        }
        for d in docs.values() {
            by_net.entry(d.spec.vni).or_default().insert(d.spec.address);
        }
        let mut ready: BTreeSet<Option<u32>> = BTreeSet::new();
        for (vni, addrs) in &by_net {
            if let Some(v) = vni
                && !ctx.private_nets.carries(*v).await
            {
                // Not here (any more): its router went with its addresses.
                addressed.remove(vni);
                continue;
            }
            let addrs: Vec<Ipv4Addr> = addrs.iter().copied().collect();
            let overlay = ctx.private_nets.overlay_device(*vni);
            match ctx
                .network
                .set_service_addresses(*vni, &ctx.bridge, overlay.as_deref(), &addrs)
                .await
            {
                Ok(()) => {
                    ready.insert(*vni);
                    if addrs.is_empty() {
                        addressed.remove(vni);
                    } else {
                        addressed.insert(*vni);
                    }
                }
                Err(e) => warn!(vni = ?vni, error = %e, "cannot set load balancer addresses"),
            }
        }
        for (key, doc) in docs {
            if !ready.contains(&doc.spec.vni) {
                served.remove(key);
                continue;
            }
            let s = served.entry(key.clone()).or_insert_with(|| Served {
                doc: doc.clone(),
                pool: Arc::new(Pool::new(doc.spec.vni)),
                listeners: BTreeMap::new(),
            });
            s.doc = doc.clone();
            s.pool.update(doc);
            // The balancer's address on its network, and for an external
            // one the host's own address (in the host's namespace).
            let host_address = ctx.address.parse::<Ipv4Addr>().ok();
            let wanted = doc.spec.listeners.iter().flat_map(|l| {
                let external = host_address.filter(|_| doc.spec.external);
                [
                    Some((false, l, doc.spec.address, doc.spec.vni)),
                    external.map(|a| (true, l, a, None)),
                ]
                .into_iter()
                .flatten()
            });
            for (external, l, ip, vni) in wanted {
                let slot = (external, l.port);
                if s.listeners.get(&slot).is_some_and(|h| !h.is_finished()) {
                    continue;
                }
                let addr = SocketAddr::from((ip, l.port));
                match ctx.network.listen_service(vni, addr).await {
                    Ok(Some(listener)) => match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            info!(balancer = %key, %addr, target = l.target(), external, "load balancer listening");
                            let counted = self.counter(doc);
                            s.listeners.insert(
                                slot,
                                tokio::spawn(serve(
                                    listener,
                                    s.pool.clone(),
                                    l.target(),
                                    l.protocol,
                                    counted,
                                )),
                            );
                        }
                        Err(e) => warn!(%addr, error = %e, "cannot use a balancer's listener"),
                    },
                    Ok(None) => {}
                    Err(e) => warn!(%addr, error = %e, "cannot listen for a load balancer"),
                }
            }
        }
    }
}

/// Accepts a listener's connections and proxies each to a backend.
async fn serve(
    listener: tokio::net::TcpListener,
    pool: Arc<Pool>,
    target: u16,
    protocol: ListenerProtocol,
    counted: Arc<AtomicU64>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "accept failed");
                // A burst of failures (no file descriptors) must not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (pool, counted) = (pool.clone(), counted.clone());
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let order = pool.order();
            let Some((pick, backend)) = connect_first(&pool, order, target).await else {
                debug!(%peer, "no backend accepted; closing the connection");
                return;
            };
            let addr = SocketAddr::from((pick.ip, target));
            let open = pick.open.clone();
            let _ = backend.set_nodelay(true);
            counted.fetch_add(1, Ordering::Relaxed);
            open.fetch_add(1, Ordering::Relaxed);
            let proxied = async {
                match protocol {
                    ListenerProtocol::Tcp => {
                        let (mut c, mut b) = (client, backend);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                    }
                    ListenerProtocol::Http => {
                        if let Err(e) = http_proxy(client, peer, backend).await {
                            debug!(%peer, %addr, error = %e, "HTTP connection ended with an error");
                        }
                    }
                }
            };
            tokio::select! {
                () = proxied => {}
                () = pick.gone.cancelled() => {
                    debug!(%peer, %addr, "backend left the balancer; its connection closed");
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Connects to the first backend of `order` that accepts, staggered: the
/// next is tried as well when none has accepted within [`STAGGER`], and
/// the first to accept wins (the others are dropped). A backend that
/// refuses or does not accept within [`CONNECT_TIMEOUT`] is ejected. So a
/// backend that vanished costs a client [`STAGGER`], not the timeout.
async fn connect_first(pool: &Pool, order: Vec<Pick>, target: u16) -> Option<(Pick, TcpStream)> {
    use futures::stream::FuturesUnordered;
    let mut trying = FuturesUnordered::new();
    // Those started and not answered yet: ejected if a later one wins.
    let mut waiting: Vec<(Pick, SocketAddr)> = Vec::new();
    let mut rest = order.into_iter();
    loop {
        if trying.is_empty() {
            let pick = rest.next()?;
            waiting.push((pick.clone(), SocketAddr::from((pick.ip, target))));
            trying.push(attempt(pool.vni, pick, target));
        }
        tokio::select! {
            Some((got, pick, addr)) = trying.next() => match got {
                Some(stream) => {
                    pool.restore(&pick);
                    for (slow, addr) in waiting.iter().take_while(|(w, _)| w.ip != pick.ip) {
                        debug!(%addr, "backend slower to accept than another; ejected");
                        pool.eject(slow, *addr);
                    }
                    return Some((pick, stream));
                }
                None => {
                    debug!(%addr, "backend did not accept; trying the next");
                    waiting.retain(|(w, _)| w.ip != pick.ip);
                    pool.eject(&pick, addr);
                }
            },
            () = tokio::time::sleep(STAGGER), if rest.len() > 0 => {
                if let Some(pick) = rest.next() {
                    waiting.push((pick.clone(), SocketAddr::from((pick.ip, target))));
                    trying.push(attempt(pool.vni, pick, target));
                }
            }
        }
    }
}

/// Passes HTTP/1 requests from `client` to `backend` (the connection's
/// backend), each with `X-Forwarded-For` (the client's address after any
/// the request had) and `X-Forwarded-Proto`.
async fn http_proxy(
    client: TcpStream,
    peer: SocketAddr,
    backend: TcpStream,
) -> Result<(), hyper::Error> {
    use hyper::header::HeaderValue;
    use hyper_util::rt::TokioIo;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(backend)).await?;
    let backend_side = tokio::spawn(conn);
    let sender = Arc::new(Mutex::new(sender));
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let sender = sender.clone();
            async move {
                let headers = req.headers_mut();
                let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                    Some(before) => format!("{before}, {}", peer.ip()),
                    None => peer.ip().to_string(),
                };
                if let Ok(v) = HeaderValue::from_str(&forwarded) {
                    headers.insert("x-forwarded-for", v);
                }
                headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
                // HTTP/1 answers one request at a time: never contended.
                let mut s = sender.lock().await;
                s.ready().await?;
                s.send_request(req).await
            }
        });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
    backend_side.abort();
    served
}

/// One connection attempt to `pick`'s `target` port.
async fn attempt(
    vni: Option<u32>,
    pick: Pick,
    target: u16,
) -> (Option<TcpStream>, Pick, SocketAddr) {
    let addr = SocketAddr::from((pick.ip, target));
    (connect(vni, addr).await, pick, addr)
}

async fn connect(vni: Option<u32>, addr: SocketAddr) -> Option<TcpStream> {
    match vni {
        None => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .ok()?
            .ok(),
        Some(v) => {
            let ns = skyvisor_net::private_devices(v).namespace;
            skyvisor_net::connect_in_namespace(&ns, addr, CONNECT_TIMEOUT)
                .await
                .ok()
        }
    }
}

/// Follows `lb-backends/` and serves what it says, for as long as the
/// agent runs.
pub async fn follow(ctx: Arc<AgentContext>) {
    let mut recheck = tokio::time::interval(RECHECK);
    loop {
        let (mut docs, revision) = match ctx.store.list(keys::LB_BACKENDS).await {
            Ok(listing) => {
                let docs: BTreeMap<String, LbBackends> = listing
                    .items
                    .iter()
                    .filter_map(|kv| Some((kv.key.clone(), decode::<LbBackends>(kv).ok()?)))
                    .collect();
                (docs, listing.revision)
            }
            Err(e) => {
                debug!(error = %e, "cannot read load balancers; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        ctx.load_balancers.apply(&ctx, &docs).await;
        let mut stream = match ctx.store.watch(keys::LB_BACKENDS, revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot watch load balancers; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                event = stream.next() => {
                    match event {
                        Some(Ok(WatchEvent::Put(kv))) => {
                            if let Ok(doc) = decode::<LbBackends>(&kv) {
                                docs.insert(kv.key.clone(), doc);
                            }
                        }
                        Some(Ok(WatchEvent::Delete { key, .. })) => {
                            docs.remove(&key);
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, "load balancer watch broke; reading again");
                            break;
                        }
                        None => break,
                    }
                    ctx.load_balancers.apply(&ctx, &docs).await;
                }
                _ = recheck.tick() => ctx.load_balancers.apply(&ctx, &docs).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::lb::{Backend, Listener, LoadBalancerSpec};

    fn doc(algorithm: LbAlgorithm, backends: &[(u8, BackendState)]) -> LbBackends {
        LbBackends {
            spec: LoadBalancerSpec {
                project: skyvisor_core::ProjectName::new("p").expect("p"),
                name: "lb".into(),
                group: skyvisor_core::GroupName::new("web").expect("g"),
                external: false,
                listeners: vec![Listener {
                    port: 80,
                    target_port: None,
                    protocol: skyvisor_core::lb::ListenerProtocol::Tcp,
                }],
                algorithm,
                drain_secs: 10,
                address: Ipv4Addr::new(10, 0, 0, 200),
                network: "default".into(),
                vni: None,
                created_at: chrono::Utc::now(),
            },
            backends: backends
                .iter()
                .map(|(n, state)| Backend {
                    member: format!("web-{n}"),
                    ip: Ipv4Addr::new(10, 0, 0, *n),
                    state: *state,
                })
                .collect(),
        }
    }

    /// Reads one HTTP/1.1 response with a Content-Length body.
    async fn response_body(r: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.expect("line");
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.expect("body");
        String::from_utf8(body).expect("utf-8")
    }

    #[tokio::test]
    async fn http_mode_adds_the_clients_address_to_every_request_on_a_connection() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        // A backend answering each request with the X-Forwarded-For it got.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend_addr = backend.local_addr().expect("addr");
        tokio::spawn(async move {
            let (s, _) = backend.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = tokio::io::BufReader::new(r);
            loop {
                let mut forwarded = String::from("none");
                let mut proto = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end().to_string();
                    if l.is_empty() {
                        break;
                    }
                    let lower = l.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("x-forwarded-for:") {
                        forwarded = v.trim().to_string();
                    }
                    if let Some(v) = lower.strip_prefix("x-forwarded-proto:") {
                        proto = v.trim().to_string();
                    }
                }
                let body = format!("{forwarded}|{proto}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if w.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front_addr = front.local_addr().expect("addr");
        tokio::spawn(async move {
            let (client, peer) = front.accept().await.expect("accept");
            let backend = TcpStream::connect(backend_addr).await.expect("backend");
            let _ = http_proxy(client, peer, backend).await;
        });
        let (r, mut w) = TcpStream::connect(front_addr)
            .await
            .expect("connect")
            .into_split();
        let mut r = tokio::io::BufReader::new(r);
        w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
            .await
            .expect("send");
        assert_eq!(response_body(&mut r).await, "192.0.2.7, 127.0.0.1|http");
        // The next request on the same connection gets it too.
        w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        assert_eq!(response_body(&mut r).await, "127.0.0.1|http");
    }

    #[test]
    fn round_robin_takes_each_active_backend_in_turn_and_skips_draining_ones() {
        let pool = Pool::new(None);
        pool.update(&doc(
            LbAlgorithm::RoundRobin,
            &[
                (1, BackendState::Active),
                (2, BackendState::Draining),
                (3, BackendState::Active),
            ],
        ));
        let firsts: Vec<u8> = (0..4).map(|_| pool.order()[0].ip.octets()[3]).collect();
        assert_eq!(firsts, [1, 3, 1, 3]);
        // Each order lists every active backend, to fall back on.
        assert_eq!(pool.order().len(), 2);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_and_counts_survive_updates() {
        let pool = Pool::new(None);
        let d = doc(
            LbAlgorithm::LeastConnections,
            &[(1, BackendState::Active), (2, BackendState::Active)],
        );
        pool.update(&d);
        let busy = pool
            .order()
            .into_iter()
            .find(|p| p.ip.octets()[3] == 1)
            .expect("1")
            .open;
        busy.fetch_add(5, Ordering::Relaxed);
        pool.update(&d);
        for _ in 0..4 {
            assert_eq!(pool.order()[0].ip.octets()[3], 2);
        }
        pool.update(&doc(LbAlgorithm::LeastConnections, &[]));
        assert!(pool.order().is_empty());
    }

    #[tokio::test]
    async fn a_backend_that_did_not_accept_goes_last_until_it_accepts_again() {
        let pool = Pool::new(None);
        let d = doc(
            LbAlgorithm::RoundRobin,
            &[
                (1, BackendState::Active),
                (2, BackendState::Active),
                (3, BackendState::Active),
            ],
        );
        pool.update(&d);
        let dead = pool
            .order()
            .into_iter()
            .find(|p| p.ip.octets()[3] == 2)
            .expect("2");
        // Nothing listens there (a port just freed), so its probe fails.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        pool.eject(&dead, closed);
        // Kept across an update of the backends.
        pool.update(&d);
        for _ in 0..6 {
            let order: Vec<u8> = pool.order().iter().map(|p| p.ip.octets()[3]).collect();
            assert_eq!(order.len(), 3, "still tried, last");
            assert_eq!(order[2], 2, "{order:?}");
        }
        pool.restore(&dead);
        let firsts: std::collections::BTreeSet<u8> =
            (0..6).map(|_| pool.order()[0].ip.octets()[3]).collect();
        assert!(firsts.contains(&2), "back in turn: {firsts:?}");
    }

    #[test]
    fn a_backend_leaving_the_balancer_closes_its_connections_and_one_staying_does_not() {
        let pool = Pool::new(None);
        pool.update(&doc(
            LbAlgorithm::RoundRobin,
            &[(1, BackendState::Active), (2, BackendState::Active)],
        ));
        let picks = pool.order();
        pool.update(&doc(
            LbAlgorithm::RoundRobin,
            &[(1, BackendState::Draining)],
        ));
        for p in &picks {
            let gone = p.gone.is_cancelled();
            assert_eq!(gone, p.ip.octets()[3] == 2, "{}", p.ip);
        }
    }

    #[tokio::test]
    async fn a_backend_that_does_not_answer_costs_a_client_the_stagger_not_the_timeout() {
        use socket2::{Domain, Socket, Type};
        // 127.0.0.1:P takes no connection (a backlog of 0, already full:
        // further SYNs are dropped, as to a host that died); 127.0.0.2:P
        // accepts.
        let hole = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        hole.listen(0).expect("listen");
        let port = hole
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet")
            .port();
        let mut fill = Vec::new();
        for _ in 0..4 {
            if let Ok(c) = std::net::TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(100),
            ) {
                fill.push(c);
            }
        }
        let live = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .expect("listen on 127.0.0.2");
        let pool = Pool::new(None);
        let mut d = doc(LbAlgorithm::RoundRobin, &[]);
        for ip in ["127.0.0.1", "127.0.0.2"] {
            d.backends.push(Backend {
                member: ip.into(),
                ip: ip.parse().expect("ip"),
                state: BackendState::Active,
            });
        }
        pool.update(&d);
        let mut order = pool.order();
        if order[0].ip.octets()[3] != 1 {
            order.reverse();
        }
        let hole_pick = order[0].clone();
        let started = std::time::Instant::now();
        let (won, _stream) = connect_first(&pool, order, port).await.expect("a backend");
        assert_eq!(won.ip.octets()[3], 2);
        // The silent one was waited for a stagger, not the timeout.
        let waited = started.elapsed();
        assert!(
            waited >= STAGGER - Duration::from_millis(20) && waited < Duration::from_millis(900),
            "waited {waited:?}"
        );
        assert!(
            hole_pick.ejected.load(Ordering::Relaxed),
            "the silent one ejected"
        );
        drop((live, hole, fill));
    }

    #[tokio::test]
    async fn an_ejected_backend_comes_back_when_its_probe_connects() {
        let pool = Pool::new(None);
        pool.update(&doc(LbAlgorithm::RoundRobin, &[(1, BackendState::Active)]));
        let pick = pool.order().into_iter().next().expect("one");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        pool.eject(&pick, addr);
        assert!(pick.ejected.load(Ordering::Relaxed));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pick.ejected.load(Ordering::Relaxed) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the probe never brought it back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(listener);
    }
}
