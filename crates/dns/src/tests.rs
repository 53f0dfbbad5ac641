//! The server against a real DNS client over real sockets.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};

use super::*;

const DEFAULT_ZONE: &str = "skyvisor.internal";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

/// Sockets on 127.0.0.1 with a port unused by both UDP and TCP (the
/// kernel picks a free UDP port, which TCP may have taken: try again).
fn sockets() -> (std::net::UdpSocket, std::net::TcpListener, SocketAddr) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let addr = udp.local_addr().expect("addr");
        let Ok(tcp) = std::net::TcpListener::bind(addr) else {
            continue;
        };
        udp.set_nonblocking(true).expect("nonblocking");
        tcp.set_nonblocking(true).expect("nonblocking");
        return (udp, tcp, addr);
    }
    panic!("no port free for both UDP and TCP in 100 tries");
}

/// Callers: 127.0.0.2 is in project alpha, 127.0.0.3 in beta, nobody else.
fn callers() -> Callers {
    Arc::new(|a: Ipv4Addr| match a.octets() {
        [127, 0, 0, 2] => Some("alpha".to_string()),
        [127, 0, 0, 3] => Some("beta".to_string()),
        _ => None,
    })
}

fn records() -> Records {
    let r = Records::new();
    r.replace(
        "alpha",
        [
            ("vm1".to_string(), vec![ip("10.0.0.5")]),
            ("web".to_string(), vec![ip("10.0.0.6"), ip("10.0.0.7")]),
        ]
        .into_iter()
        .collect(),
    );
    r.replace(
        "beta",
        [("db".to_string(), vec![ip("10.9.0.5")])]
            .into_iter()
            .collect(),
    );
    r
}

async fn start(resolver: Resolver) -> SocketAddr {
    let (udp, tcp, addr) = sockets();
    tokio::spawn(resolver.serve(udp, tcp));
    addr
}

/// Asks `server` from source address `from` over UDP.
async fn ask(server: SocketAddr, from: &str, name: &str, qtype: RecordType) -> Message {
    let from = format!("{from}:0");
    let name = Name::from_ascii(name).expect("name");
    tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind(&from).expect("client socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut m = Message::new();
        m.set_id(4242)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name, qtype));
        socket
            .send_to(&m.to_vec().expect("encode"), server)
            .expect("send");
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("an answer");
        Message::from_vec(&buf[..n]).expect("decode")
    })
    .await
    .expect("client thread")
}

/// Asks `server` for `name`'s A records from `from`.
async fn ask_a(server: SocketAddr, from: &str, name: &str) -> Message {
    ask(server, from, name, RecordType::A).await
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn internal(forwarder: Option<Arc<Forwarder>>) -> Resolver {
    Resolver::new(DEFAULT_ZONE, records(), callers(), forwarder).expect("resolver")
}

#[tokio::test]
async fn a_project_resolves_its_own_names_with_every_address_of_a_group() {
    let server = start(internal(None)).await;
    let m = ask_a(server, "127.0.0.2", "vm1.alpha.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative());
    assert_eq!(addresses(&m), vec![ip("10.0.0.5")]);
    assert_eq!(m.id(), 4242);
    // Case does not matter in DNS.
    let m = ask_a(server, "127.0.0.2", "WEB.Alpha.skyvisor.internal.").await;
    assert_eq!(addresses(&m), vec![ip("10.0.0.6"), ip("10.0.0.7")]);
    assert!(m.answers().iter().all(|r| r.ttl() == RECORD_TTL));
}

#[tokio::test]
async fn another_projects_names_do_not_exist_and_unknown_names_are_nxdomain() {
    let server = start(internal(None)).await;
    let m = ask_a(server, "127.0.0.2", "db.beta.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert!(m.answers().is_empty());
    let m = ask_a(server, "127.0.0.3", "db.beta.skyvisor.internal.").await;
    assert_eq!(addresses(&m), vec![ip("10.9.0.5")]);
    let m = ask_a(server, "127.0.0.2", "nope.alpha.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    // Negative answers carry the zone's SOA, so resolvers cache them briefly.
    assert_eq!(m.name_servers().len(), 1);
    assert_eq!(m.name_servers()[0].record_type(), RecordType::SOA);
    let m = ask_a(server, "127.0.0.2", "a.vm1.alpha.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[tokio::test]
async fn a_name_without_the_asked_type_has_no_data_rather_than_not_existing() {
    let server = start(internal(None)).await;
    let m = ask(
        server,
        "127.0.0.2",
        "vm1.alpha.skyvisor.internal.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    let m = ask(server, "127.0.0.2", "skyvisor.internal.", RecordType::SOA).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(m.answers().len(), 1);
}

#[tokio::test]
async fn strangers_are_refused_even_for_other_names() {
    let upstream = start(internal(None)).await;
    let forwarder = Arc::new(Forwarder::new(vec![upstream]));
    let server = start(internal(Some(forwarder))).await;
    for name in ["vm1.alpha.skyvisor.internal.", "example.org."] {
        let m = ask(server, "127.0.0.9", name, RecordType::A).await;
        assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
    }
}

#[tokio::test]
async fn records_replaced_are_answered_at_once() {
    let records = records();
    let server =
        start(Resolver::new(DEFAULT_ZONE, records.clone(), callers(), None).expect("resolver"))
            .await;
    records.replace(
        "alpha",
        [("web".to_string(), vec![ip("10.0.0.8")])]
            .into_iter()
            .collect(),
    );
    let m = ask_a(server, "127.0.0.2", "web.alpha.skyvisor.internal.").await;
    assert_eq!(addresses(&m), vec![ip("10.0.0.8")]);
    let m = ask_a(server, "127.0.0.2", "vm1.alpha.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    records.remove("alpha");
    let m = ask_a(server, "127.0.0.2", "web.alpha.skyvisor.internal.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[tokio::test]
async fn other_names_go_upstream_with_the_upstreams_answer_and_code() {
    // The upstream: another server, authoritative for example.test, that
    // answers anyone as project "corp".
    let corp = Records::new();
    corp.replace(
        "corp",
        [("www".to_string(), vec![ip("192.0.2.7")])]
            .into_iter()
            .collect(),
    );
    let anyone: Callers = Arc::new(|_| Some("corp".to_string()));
    let upstream =
        start(Resolver::new("example.test", corp, anyone, None).expect("upstream")).await;
    let forwarder = Arc::new(Forwarder::new(vec![upstream]));
    let server = start(internal(Some(forwarder))).await;
    let m = ask_a(server, "127.0.0.2", "www.corp.example.test.").await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(!m.authoritative());
    assert!(m.recursion_available());
    assert_eq!(addresses(&m), vec![ip("192.0.2.7")]);
    let m = ask_a(server, "127.0.0.2", "nope.corp.example.test.").await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    // The internal zone is still answered here, not upstream.
    let m = ask_a(server, "127.0.0.2", "vm1.alpha.skyvisor.internal.").await;
    assert_eq!(addresses(&m), vec![ip("10.0.0.5")]);
}

#[tokio::test]
async fn without_upstream_other_names_are_refused() {
    let server = start(internal(None)).await;
    let m = ask_a(server, "127.0.0.2", "example.org.").await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
}

#[test]
fn zones_must_be_names_and_resolv_conf_gives_the_upstream() {
    assert!(Resolver::new("", Records::new(), callers(), None).is_err());
    assert!(Resolver::new("a..b", Records::new(), callers(), None).is_err());
    let up = Forwarder::upstream_of_resolv_conf(
        "# comment\nnameserver 10.0.2.3\nsearch x\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 1.1.1.1\n",
    );
    assert_eq!(
        up,
        vec![
            "10.0.2.3:53".parse::<SocketAddr>().expect("addr"),
            "127.0.0.53:53".parse().expect("addr"),
            "[::1]:53".parse().expect("addr"),
        ]
    );
}
