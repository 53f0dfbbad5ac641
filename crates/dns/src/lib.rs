//! Skyvisor's DNS server, built on `hickory-server`.
//!
//! Every host agent runs one per VM network, on the network's gateway
//! address (port 53), and the guests of that network use it as their
//! resolver. It is authoritative for the internal zone
//! (the control plane's, `skyvisor.internal`), whose names are `NAME.PROJECT.ZONE`: an instance,
//! a group (answering with its healthy members) or a load balancer
//! (answering with its address). A caller sees only its own project's
//! names: who asks is known from the network the query came in on and its
//! source address (which a guest's tap guard lets it send from only if it
//! is its own), never from anything in the query. Other names are
//! forwarded to the host's upstream resolvers; strangers (no instance of
//! this host) are refused, so the server is never an open resolver.

mod forward;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tracing::debug;

pub use forward::Forwarder;

/// How long a resolver may keep an internal answer: short, so records
/// follow replacements and scaling within seconds.
pub const RECORD_TTL: u32 = 5;

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// A project's names: name → addresses.
pub type ProjectRecords = BTreeMap<String, Vec<Ipv4Addr>>;

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The zone is not a valid domain name.
    #[error("invalid DNS zone {zone:?}: {reason}")]
    InvalidZone {
        /// The zone asked for.
        zone: String,
        /// Why it is not valid.
        reason: String,
    },
    /// A socket could not be served.
    #[error("serving DNS: {0}")]
    Io(#[from] std::io::Error),
}

/// The records of every project, shared by all of a host's servers and
/// replaced whole per project as the control plane publishes them.
#[derive(Clone, Default)]
pub struct Records(Arc<RwLock<HashMap<String, Arc<ProjectRecords>>>>);

impl Records {
    /// No records yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces `project`'s names.
    pub fn replace(&self, project: &str, records: ProjectRecords) {
        self.write().insert(project.to_string(), Arc::new(records));
    }

    /// Forgets `project`'s names.
    pub fn remove(&self, project: &str) {
        self.write().remove(project);
    }

    /// Keeps only the projects `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.write().retain(|p, _| keep(p));
    }

    /// The addresses of `name` in `project` (none: no such name).
    pub fn lookup(&self, project: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
        let map = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(project)?.get(name).cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<ProjectRecords>>> {
        // Whole values are swapped in: a panicking writer leaves nothing
        // half-written.
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Tells which project a query's source address belongs to (none: not an
/// instance this server serves).
pub type Callers = Arc<dyn Fn(Ipv4Addr) -> Option<String> + Send + Sync>;

/// What one server answers with: the zone, the records, who asks, and
/// where other names go.
#[derive(Clone)]
pub struct Resolver {
    zone: Name,
    /// The zone's SOA record, sent with every negative answer.
    soa: Record,
    records: Records,
    callers: Callers,
    forwarder: Option<Arc<Forwarder>>,
}

impl Resolver {
    /// A resolver for `zone`, answering callers known to `callers` from
    /// `records` and sending other names to `forwarder` (none: refused).
    pub fn new(
        zone: &str,
        records: Records,
        callers: Callers,
        forwarder: Option<Arc<Forwarder>>,
    ) -> Result<Self, DnsError> {
        let zone = zone_name(zone)?;
        Ok(Self {
            soa: soa_of(&zone),
            zone,
            records,
            callers,
            forwarder,
        })
    }

    /// Serves DNS on `udp` and `tcp` (non-blocking sockets, already bound)
    /// until they fail.
    pub async fn serve(
        self,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<(), DnsError> {
        let mut server = ServerFuture::new(self);
        server.register_socket_std(udp)?;
        server.register_listener_std(tcp, TCP_TIMEOUT)?;
        server
            .block_until_done()
            .await
            .map_err(|e| DnsError::Io(std::io::Error::other(e.to_string())))
    }

    /// The answer to a query for `name` of type `qtype` from `project`.
    async fn answer(&self, project: &str, name: &Name, qtype: RecordType) -> Answer {
        if !self.zone.zone_of(name) {
            return match &self.forwarder {
                Some(f) => f.forward(name, qtype).await,
                None => Answer::code(ResponseCode::Refused),
            };
        }
        let extra = name.num_labels().saturating_sub(self.zone.num_labels());
        let labels: Vec<String> = name
            .iter()
            .take(usize::from(extra))
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        let mut answer = Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            soa: vec![self.soa.clone()],
        };
        match labels.as_slice() {
            // The zone itself, and a project's own domain, exist.
            [] if qtype == RecordType::SOA => answer.answers = answer.soa.split_off(0),
            [] => {}
            [p] if p == project => {}
            [host, p] if p == project => match self.records.lookup(project, host) {
                Some(addrs) => {
                    if matches!(qtype, RecordType::A | RecordType::ANY) {
                        answer.answers = addrs
                            .iter()
                            .map(|a| Record::from_rdata(name.clone(), RECORD_TTL, RData::A(A(*a))))
                            .collect();
                        answer.soa.clear();
                    }
                }
                None => answer.code = ResponseCode::NXDomain,
            },
            // Another project's names do not exist for this caller.
            _ => answer.code = ResponseCode::NXDomain,
        }
        answer
    }
}

/// The SOA record of `zone` (negative answers live [`RECORD_TTL`]).
fn soa_of(zone: &Name) -> Record {
    let ns = Name::from_ascii("ns")
        .and_then(|n| n.append_domain(zone))
        .unwrap_or_else(|_| zone.clone());
    let mail = Name::from_ascii("hostmaster")
        .and_then(|n| n.append_domain(zone))
        .unwrap_or_else(|_| zone.clone());
    let soa = SOA::new(ns, mail, 1, 60, 30, 600, RECORD_TTL);
    Record::from_rdata(zone.clone(), RECORD_TTL, RData::SOA(soa))
}

/// An answer to send: its code, its records and whether it is ours.
pub(crate) struct Answer {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    soa: Vec<Record>,
}

impl Answer {
    /// An answer that is only a code.
    pub(crate) fn code(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            answers: Vec::new(),
            soa: Vec::new(),
        }
    }

    /// A forwarded answer.
    pub(crate) fn forwarded(code: ResponseCode, answers: Vec<Record>) -> Self {
        Self {
            code,
            authoritative: false,
            answers,
            soa: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Resolver {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        let code = if request.message_type() != MessageType::Query {
            Some(ResponseCode::FormErr)
        } else if request.op_code() != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else {
            None
        };
        let info = match (code, request.request_info()) {
            (None, Ok(info)) => info,
            (code, _) => {
                let code = code.unwrap_or(ResponseCode::FormErr);
                return send(&mut response, builder.error_msg(request.header(), code)).await;
            }
        };
        let caller = match info.src {
            SocketAddr::V4(a) => (self.callers)(*a.ip()),
            SocketAddr::V6(_) => None,
        };
        let Some(project) = caller else {
            debug!(source = %info.src, "DNS query from no instance served here: refused");
            return send(
                &mut response,
                builder.error_msg(request.header(), ResponseCode::Refused),
            )
            .await;
        };
        let name = Name::from(info.query.name().clone());
        let answer = self.answer(&project, &name, info.query.query_type()).await;
        header.set_response_code(answer.code);
        header.set_authoritative(answer.authoritative);
        header.set_recursion_available(self.forwarder.is_some());
        let soa: &[Record] = if answer.answers.is_empty() {
            &answer.soa
        } else {
            &[]
        };
        send(
            &mut response,
            builder.build(header, answer.answers.iter(), [], soa.iter(), []),
        )
        .await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let header = *message.header();
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "cannot send a DNS response");
            header.into()
        }
    }
}

/// `zone` as a fully qualified name.
fn zone_name(zone: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidZone {
        zone: zone.to_string(),
        reason,
    };
    let mut name = Name::from_ascii(zone).map_err(|e| invalid(e.to_string()))?;
    if name.num_labels() == 0 {
        return Err(invalid("the root is not a zone".to_string()));
    }
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

#[cfg(test)]
mod tests;
