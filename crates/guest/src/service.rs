//! The guest's state and its HTTP routes. Handlers are pure with respect to the
//! connection: they return a response plus an optional power action, which the
//! server performs only after the response has been sent.
//!
//! Nothing here may panic on a request or block for long (except durable disk
//! writes, which must finish before answering).

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::blk::Blk;
use crate::cmdline::{Identity, Ipv4Cidr};
use crate::disk::{self, Disk, DiskError};
use crate::http::{Request, Response};
use crate::json::{quote, quote_opt};
use crate::memtest::{self, MemTest, StartError};

/// Largest value `PUT /ram` accepts.
pub const MAX_RAM_VALUE: usize = 4096;

/// What happens to the machine after a response is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Sync, unmount `/data`, power off.
    PowerOff,
    /// Sync, unmount `/data`, reboot.
    Reboot,
}

/// A handled request.
#[derive(Debug)]
pub struct Outcome {
    /// What to send.
    pub response: Response,
    /// What to do after sending it.
    pub after: Option<PowerAction>,
}

impl From<Response> for Outcome {
    fn from(response: Response) -> Self {
        Outcome {
            response,
            after: None,
        }
    }
}

/// Where the service runs, which decides what it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Inside a VM: `/data` must be a mounted disk; eth0, the hostname, the
    /// control channel, the power button and the machine's power are ours.
    Vm,
    /// Inside a container (`SV_CONTAINER=1`): `/data` is a plain directory of
    /// the writable layer; the network and hostname belong to the host; a power
    /// action stops PID 1, which ends the container.
    Container,
    /// On a development host (`SKYVISOR_GUEST_HOST_MODE=1`): no network
    /// changes, no power actions, no mount check.
    Host,
}

impl Place {
    /// The place the environment variables name: host mode wins, then
    /// container, else a VM.
    pub fn detect(host_mode: Option<&str>, container: Option<&str>) -> Self {
        if host_mode == Some("1") {
            Place::Host
        } else if container == Some("1") {
            Place::Container
        } else {
            Place::Vm
        }
    }

    /// Whether `/data` must be a mount point before the service writes there.
    pub fn requires_mounted_data(self) -> bool {
        self == Place::Vm
    }

    /// Whether power requests are acted on.
    pub fn acts_on_power(self) -> bool {
        self != Place::Host
    }

    /// Whether eth0, the hostname, the control channel and the power button
    /// are the service's to use.
    pub fn owns_machine(self) -> bool {
        self == Place::Vm
    }
}

/// How the service is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP port.
    pub port: u16,
    /// Persistent disk mount point.
    pub data_dir: PathBuf,
    /// VM, container or development host.
    pub place: Place,
    /// Serve the test hooks on the public port: power off and reboot,
    /// `/fetch` (which makes the guest a proxy) and raw `/blk` writes. Off
    /// unless the host asks (`sv.hooks=1`), so a tenant's VM is not an open
    /// proxy nor powered off by whoever reaches it.
    pub test_hooks: bool,
}

impl Config {
    /// The configuration inside a VM, overridable through `SKYVISOR_GUEST_PORT`,
    /// `SKYVISOR_GUEST_DATA`, `SV_CONTAINER=1` (in a container) and
    /// `SKYVISOR_GUEST_HOST_MODE=1` (see [`Place`]).
    pub fn from_env() -> Self {
        let port = std::env::var("SKYVISOR_GUEST_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(80);
        let data_dir = std::env::var_os("SKYVISOR_GUEST_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/data"));
        let place = Place::detect(
            std::env::var("SKYVISOR_GUEST_HOST_MODE").ok().as_deref(),
            std::env::var("SV_CONTAINER").ok().as_deref(),
        );
        Config {
            port,
            data_dir,
            place,
            test_hooks: std::env::var("SKYVISOR_GUEST_TEST_HOOKS").as_deref() == Ok("1"),
        }
    }
}

/// The whole guest service state.
pub struct Guest {
    config: Config,
    identity: Mutex<Identity>,
    ram: Mutex<Option<String>>,
    ram_counter: AtomicU64,
    memtest: MemTest,
    disk: Disk,
    blk: Blk,
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Seconds since boot from `/proc/uptime`.
pub fn uptime_secs() -> Option<f64> {
    read_trimmed("/proc/uptime")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Total memory the guest kernel sees, from `/proc/meminfo`.
pub fn memory_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Number of CPUs online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// This boot's random id: the kernel's in a VM; in a container (which
/// shares its host's kernel) the one its init drew at start, `SV_BOOT_ID`.
pub fn boot_id() -> Option<String> {
    std::env::var("SV_BOOT_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| read_trimmed("/proc/sys/kernel/random/boot_id"))
}

/// The route a path names, before the method is considered.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Index,
    Health,
    Identity,
    Headers,
    Uptime,
    Counter,
    CounterIncrement,
    File(&'a str),
    Ram,
    RamCounter,
    Memtest,
    MemtestStart,
    MemtestStop,
    MemtestRate,
    PowerOff,
    Reboot,
    Fetch,
    Resolve,
    Blk,
    BlkDev(&'a str),
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        Some(match path {
            "/" => Route::Index,
            "/health" => Route::Health,
            "/identity" => Route::Identity,
            "/headers" => Route::Headers,
            "/uptime" => Route::Uptime,
            "/counter" => Route::Counter,
            "/counter/increment" => Route::CounterIncrement,
            "/ram" => Route::Ram,
            "/ram/counter" => Route::RamCounter,
            "/memtest" => Route::Memtest,
            "/memtest/start" => Route::MemtestStart,
            "/memtest/stop" => Route::MemtestStop,
            "/memtest/rate" => Route::MemtestRate,
            "/poweroff" => Route::PowerOff,
            "/reboot" => Route::Reboot,
            "/fetch" => Route::Fetch,
            "/resolve" => Route::Resolve,
            "/blk" => Route::Blk,
            p if p.starts_with("/blk/") => Route::BlkDev(&p[5..]),
            p => Route::File(p.strip_prefix("/files/")?),
        })
    }

    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Route::File(_) => &["GET", "HEAD", "PUT", "DELETE"],
            Route::BlkDev(_) => &["GET", "PUT"],
            Route::Ram => &["GET", "HEAD", "PUT"],
            Route::CounterIncrement
            | Route::MemtestStart
            | Route::MemtestStop
            | Route::MemtestRate
            | Route::PowerOff
            | Route::Reboot => &["POST"],
            _ => &["GET", "HEAD"],
        }
    }
}

fn disk_error(e: DiskError) -> Response {
    let status = match e {
        DiskError::NotMounted(_) => 503,
        DiskError::NotFound(_) => 404,
        DiskError::Corrupt(_) | DiskError::Io(..) => 500,
    };
    Response::text(status, &e.to_string())
}

fn parse_rate(req: &Request) -> Result<f64, Response> {
    match req.query("rate_mib_s") {
        None => Ok(0.0),
        Some(r) => r
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| Response::text(400, &format!("invalid rate_mib_s {r:?}"))),
    }
}

impl Guest {
    /// A guest with `config` and the identity from the kernel command line.
    pub fn new(config: Config, identity: Identity) -> Self {
        let disk = Disk::new(
            config.data_dir.clone(),
            config.place.requires_mounted_data(),
        );
        Guest {
            config,
            identity: Mutex::new(identity),
            ram: Mutex::new(None),
            ram_counter: AtomicU64::new(0),
            memtest: MemTest::default(),
            disk,
            blk: Blk::system(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The persistent-disk store.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// A copy of the current identity.
    pub fn identity(&self) -> Identity {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the identity the service reports.
    pub fn set_identity(&self, identity: Identity) {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity;
    }

    /// Advances the in-memory counter (called every 100 ms by a background thread).
    pub fn tick(&self) {
        self.ram_counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The identity as the JSON object `GET /identity` returns.
    pub fn identity_json(&self) -> String {
        let id = self.identity();
        let ip = id.ip.map(|c| c.addr.to_string());
        let gw = id.gw.map(|g| g.to_string());
        format!(
            r#"{{"name":{},"id":{},"boot_id":{},"ip":{},"prefix_len":{},"gw":{},"hostname":{},"kernel":{},"memory_kib":{},"cpus":{}}}"#,
            quote_opt(id.name.as_deref()),
            quote_opt(id.id.as_deref()),
            quote_opt(boot_id().as_deref()),
            quote_opt(ip.as_deref()),
            id.ip
                .map_or_else(|| "null".to_string(), |c| c.prefix.to_string()),
            quote_opt(gw.as_deref()),
            quote_opt(read_trimmed("/proc/sys/kernel/hostname").as_deref()),
            quote_opt(read_trimmed("/proc/sys/kernel/osrelease").as_deref()),
            memory_kib().map_or_else(|| "null".to_string(), |m| m.to_string()),
            cpus(),
        )
    }

    /// The one-line marker printed to the console when the service is up.
    pub fn ready_line(&self) -> String {
        let id = self.identity();
        format!(
            "SKYVISOR-GUEST-READY name={} id={} ip={} port={}",
            id.name.as_deref().unwrap_or("-"),
            id.id.as_deref().unwrap_or("-"),
            id.ip
                .map_or_else(|| "-".to_string(), |c: Ipv4Cidr| c.to_string()),
            self.config.port
        )
    }

    /// Handles one request.
    pub fn handle(&self, req: &Request) -> Outcome {
        let Some(route) = Route::parse(&req.head.path) else {
            return Response::text(404, &format!("no such path {:?}", req.head.path)).into();
        };
        let method = req.head.method.as_str();
        let allowed = route.allowed();
        if !allowed.contains(&method) {
            let mut r = Response::text(
                405,
                &format!("method {method} not allowed; use {}", allowed.join(", ")),
            );
            r.headers.push(("Allow".to_string(), allowed.join(", ")));
            return r.into();
        }
        let is_get = matches!(method, "GET" | "HEAD");
        let hook = matches!(
            route,
            Route::PowerOff
                | Route::Reboot
                | Route::Fetch
                | Route::Resolve
                | Route::Blk
                | Route::BlkDev(_)
        );
        if hook && !self.config.test_hooks {
            return Response::text(
                404,
                &format!(
                    "{} is a test hook, off on this VM (its host runs without --guest-test-hooks)",
                    req.head.path
                ),
            )
            .into();
        }
        match route {
            Route::Index => {
                let id = self.identity();
                let text = format!(
                    "Skyvisor guest {} ({}) up {:.0}s",
                    id.name.as_deref().unwrap_or("unnamed"),
                    id.id.as_deref().unwrap_or("no id"),
                    uptime_secs().unwrap_or(0.0)
                );
                Response::bytes(
                    200,
                    "text/html; charset=utf-8",
                    format!(
                        "<!doctype html><title>{0}</title><h1>{0}</h1>\n",
                        html_escape(&text)
                    )
                    .into_bytes(),
                )
                .into()
            }
            Route::Health => Response::text(200, "ok").into(),
            Route::Fetch => match req.query("url") {
                None => Response::text(400, "give ?url=http://IP[:PORT]/PATH").into(),
                Some(url) => match req
                    .query("from")
                    .map(|f| {
                        f.parse::<std::net::Ipv4Addr>()
                            .map_err(|_| format!("from={f:?} is not an IPv4 address"))
                    })
                    .transpose()
                    .and_then(|from| crate::fetch::fetch(url, from))
                {
                    Ok(got) => Response::json(
                        200,
                        format!(
                            r#"{{"url":{},"status":{},"body":{}}}"#,
                            quote(url),
                            got.status,
                            quote(&got.body)
                        ),
                    )
                    .into(),
                    Err(e) => Response::text(502, &e).into(),
                },
            },
            // What the guest's resolver answers for a name.
            Route::Resolve => match req.query("name") {
                None => Response::text(400, "give ?name=NAME").into(),
                Some(name) => match crate::fetch::resolve(name) {
                    Ok(found) => Response::json(
                        200,
                        format!(
                            r#"{{"name":{},"addresses":[{}]}}"#,
                            quote(name),
                            found
                                .iter()
                                .map(|a| quote(&a.to_string()))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    )
                    .into(),
                    Err(e) => Response::text(404, &e).into(),
                },
            },
            Route::Identity => Response::json(200, self.identity_json()).into(),
            // What reached the guest, as a load balancer's HTTP mode shows.
            Route::Headers => Response::json(
                200,
                format!(
                    "{{{}}}",
                    req.head
                        .headers
                        .iter()
                        .map(|(k, v)| format!("{}:{}", quote(k), quote(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
            .into(),
            Route::Uptime => Response::json(
                200,
                format!(
                    r#"{{"uptime_secs":{},"boot_id":{}}}"#,
                    uptime_secs().map_or_else(|| "null".to_string(), crate::json::number),
                    quote_opt(boot_id().as_deref())
                ),
            )
            .into(),
            Route::Counter => match self.disk.counter() {
                Ok(v) => Response::json(200, format!(r#"{{"value":{v}}}"#)).into(),
                Err(e) => disk_error(e).into(),
            },
            Route::CounterIncrement => match self.disk.increment() {
                Ok(v) => Response::json(200, format!(r#"{{"value":{v}}}"#)).into(),
                Err(e) => disk_error(e).into(),
            },
            Route::File(name) => self.file(method, name, &req.body).into(),
            Route::Blk => Response::json(200, self.blk.list_json()).into(),
            Route::BlkDev(name) => self.blk_dev(method, name, req).into(),
            Route::Ram if is_get => {
                let v = self.ram.lock().unwrap_or_else(|e| e.into_inner()).clone();
                Response::json(200, format!(r#"{{"value":{}}}"#, quote_opt(v.as_deref()))).into()
            }
            Route::Ram => {
                if req.body.len() > MAX_RAM_VALUE {
                    return Response::text(
                        413,
                        &format!("RAM value larger than {MAX_RAM_VALUE} bytes"),
                    )
                    .into();
                }
                let Ok(v) = String::from_utf8(req.body.clone()) else {
                    return Response::text(400, "RAM value must be UTF-8").into();
                };
                *self.ram.lock().unwrap_or_else(|e| e.into_inner()) = Some(v.clone());
                Response::json(200, format!(r#"{{"value":{}}}"#, quote(&v))).into()
            }
            Route::RamCounter => Response::json(
                200,
                format!(
                    r#"{{"value":{}}}"#,
                    self.ram_counter.load(Ordering::Relaxed)
                ),
            )
            .into(),
            Route::Memtest => Response::json(200, self.memtest.status_json()).into(),
            Route::MemtestStart => self.memtest_start(req).into(),
            Route::MemtestStop => {
                let was = self.memtest.stop();
                let mut r = Response::json(200, self.memtest.status_json());
                if !was {
                    r.headers
                        .push(("X-Skyvisor-Note".to_string(), "not running".to_string()));
                }
                r.into()
            }
            Route::MemtestRate => match parse_rate(req) {
                Err(r) => r.into(),
                Ok(rate) if self.memtest.set_rate(rate) => {
                    Response::json(200, self.memtest.status_json()).into()
                }
                Ok(_) => Response::text(409, "no memtest is running").into(),
            },
            Route::PowerOff | Route::Reboot => {
                let action = if route == Route::PowerOff {
                    PowerAction::PowerOff
                } else {
                    PowerAction::Reboot
                };
                if !self.config.place.acts_on_power() {
                    return Response::text(503, "power actions are disabled in host mode").into();
                }
                Outcome {
                    response: Response::text(200, "going down"),
                    after: Some(action),
                }
            }
        }
    }

    fn file(&self, method: &str, name: &str, body: &[u8]) -> Response {
        if !disk::valid_file_name(name) {
            return Response::text(
                400,
                &format!("invalid file name {name:?}: use [A-Za-z0-9._-]{{1,64}}, not . or .."),
            );
        }
        let result = match method {
            "PUT" => self.disk.put_file(name, body).map(|()| {
                Response::json(
                    200,
                    format!(r#"{{"name":{},"bytes":{}}}"#, quote(name), body.len()),
                )
            }),
            "DELETE" => self
                .disk
                .delete_file(name)
                .map(|()| Response::text(200, "deleted")),
            _ => self
                .disk
                .get_file(name)
                .map(|d| Response::bytes(200, "application/octet-stream", d)),
        };
        result.unwrap_or_else(disk_error)
    }

    fn blk_dev(&self, method: &str, name: &str, req: &Request) -> Response {
        let number = |q: &str| -> Result<u64, Response> {
            match req.query(q).map(str::parse::<u64>) {
                None => Ok(0),
                Some(Ok(n)) => Ok(n),
                Some(Err(_)) => Err(Response::text(400, &format!("{q} must be a number"))),
            }
        };
        let offset = match number("offset") {
            Ok(o) => o,
            Err(r) => return r,
        };
        let result = if method == "PUT" {
            self.blk.write(name, offset, &req.body).map(|()| {
                Response::json(
                    200,
                    format!(
                        r#"{{"disk":{},"offset":{offset},"bytes":{}}}"#,
                        quote(name),
                        req.body.len()
                    ),
                )
            })
        } else {
            let len = match number("len") {
                Ok(l) => l,
                Err(r) => return r,
            };
            self.blk
                .read(name, offset, len)
                .map(|d| Response::bytes(200, "application/octet-stream", d))
        };
        result.unwrap_or_else(|e| Response::text(e.status(), &e.to_string()))
    }

    fn memtest_start(&self, req: &Request) -> Response {
        let mib = match req.query("mib").map(str::parse::<u64>) {
            Some(Ok(m)) => m,
            Some(Err(_)) | None => {
                return Response::text(400, "memtest needs ?mib=N (a positive integer)");
            }
        };
        let rate = match parse_rate(req) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let available = memtest::mem_available().unwrap_or(0);
        match self.memtest.start(mib, rate, available) {
            Ok(()) => Response::json(200, self.memtest.status_json()),
            Err(e @ StartError::AlreadyRunning) => Response::text(409, &e.to_string()),
            Err(e) => Response::text(400, &e.to_string()),
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline;
    use crate::json::{self, Value};

    fn guest(tag: &str) -> (Guest, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("skyvisor-guest-svc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let config = Config {
            port: 8080,
            data_dir: dir.clone(),
            place: Place::Host,
            test_hooks: true,
        };
        let identity =
            cmdline::parse("sv.name=t1 sv.id=abc sv.ip=10.0.2.15/24 sv.gw=10.0.2.2").identity;
        (Guest::new(config, identity), dir)
    }

    fn call(g: &Guest, method: &str, target: &str, body: &[u8]) -> Response {
        g.handle(&Request::new(method, target, body)).response
    }

    fn json_of(r: &Response) -> Value {
        json::parse(&r.body_text()).expect("response is JSON")
    }

    #[test]
    fn health_index_identity_uptime() {
        let (g, dir) = guest("basic");
        let r = call(&g, "GET", "/health", b"");
        assert_eq!((r.status, r.body_text().as_str()), (200, "ok\n"));
        let r = call(&g, "GET", "/", b"");
        assert!(
            r.body_text().contains("Skyvisor guest t1 (abc) up"),
            "{}",
            r.body_text()
        );
        let id = json_of(&call(&g, "GET", "/identity", b""));
        assert_eq!(id.get("name").and_then(Value::as_str), Some("t1"));
        assert_eq!(id.get("ip").and_then(Value::as_str), Some("10.0.2.15"));
        assert_eq!(id.get("prefix_len"), Some(&Value::Number(24.0)));
        assert!(id.get("boot_id").and_then(Value::as_str).is_some());
        let up = json_of(&call(&g, "GET", "/uptime", b""));
        assert!(matches!(up.get("uptime_secs"), Some(Value::Number(n)) if *n > 0.0));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let (g, dir) = guest("routing");
        assert_eq!(call(&g, "GET", "/nope", b"").status, 404);
        assert_eq!(call(&g, "GET", "/files/", b"").status, 400);
        let r = call(&g, "POST", "/health", b"");
        assert_eq!(r.status, 405);
        assert!(
            r.headers
                .contains(&("Allow".to_string(), "GET, HEAD".to_string()))
        );
        assert_eq!(call(&g, "GET", "/counter/increment", b"").status, 405);
        assert_eq!(call(&g, "PATCH", "/ram", b"").status, 405);
        assert_eq!(call(&g, "HEAD", "/health", b"").status, 200);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn counter_and_files_round_trip() {
        let (g, dir) = guest("disk");
        assert_eq!(
            json_of(&call(&g, "GET", "/counter", b"")).get("value"),
            Some(&Value::Number(0.0))
        );
        call(&g, "POST", "/counter/increment", b"");
        let r = call(&g, "POST", "/counter/increment", b"");
        assert_eq!(json_of(&r).get("value"), Some(&Value::Number(2.0)));
        assert_eq!(call(&g, "PUT", "/files/x.bin", b"\x00\x01").status, 200);
        assert_eq!(call(&g, "GET", "/files/x.bin", b"").body, b"\x00\x01");
        assert_eq!(call(&g, "DELETE", "/files/x.bin", b"").status, 200);
        assert_eq!(call(&g, "GET", "/files/x.bin", b"").status, 404);
        assert_eq!(call(&g, "PUT", "/files/..", b"x").status, 400);
        assert_eq!(call(&g, "PUT", "/files/a%2Fb", b"x").status, 400);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn ram_value_and_counter() {
        let (g, dir) = guest("ram");
        assert_eq!(
            json_of(&call(&g, "GET", "/ram", b"")).get("value"),
            Some(&Value::Null)
        );
        assert_eq!(call(&g, "PUT", "/ram", "hé \"x\"".as_bytes()).status, 200);
        let v = json_of(&call(&g, "GET", "/ram", b""));
        assert_eq!(v.get("value").and_then(Value::as_str), Some("hé \"x\""));
        assert_eq!(
            call(&g, "PUT", "/ram", &[b'a'; MAX_RAM_VALUE + 1]).status,
            413
        );
        assert_eq!(call(&g, "PUT", "/ram", &[0xff, 0xfe]).status, 400);
        g.tick();
        g.tick();
        assert_eq!(
            json_of(&call(&g, "GET", "/ram/counter", b"")).get("value"),
            Some(&Value::Number(2.0))
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn memtest_endpoints_validate_and_run() {
        let (g, dir) = guest("memtest");
        assert_eq!(call(&g, "POST", "/memtest/start", b"").status, 400);
        assert_eq!(call(&g, "POST", "/memtest/start?mib=x", b"").status, 400);
        assert_eq!(
            call(&g, "POST", "/memtest/start?mib=1&rate_mib_s=-3", b"").status,
            400
        );
        let r = call(&g, "POST", "/memtest/start?mib=99999999", b"");
        assert_eq!(r.status, 400);
        assert!(r.body_text().contains("can be spared"), "{}", r.body_text());
        assert_eq!(
            call(&g, "POST", "/memtest/rate?rate_mib_s=1", b"").status,
            409
        );
        assert_eq!(
            call(&g, "POST", "/memtest/start?mib=1&rate_mib_s=100", b"").status,
            200
        );
        assert_eq!(call(&g, "POST", "/memtest/start?mib=1", b"").status, 409);
        assert_eq!(
            call(&g, "POST", "/memtest/rate?rate_mib_s=0", b"").status,
            200
        );
        let s = json_of(&call(&g, "GET", "/memtest", b""));
        assert_eq!(s.get("mib"), Some(&Value::Number(1.0)));
        let s = json_of(&call(&g, "POST", "/memtest/stop", b""));
        assert_eq!(s.get("running"), Some(&Value::Bool(false)));
        assert_eq!(s.get("mismatches"), Some(&Value::Number(0.0)));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn power_actions_are_refused_in_host_mode() {
        let (g, dir) = guest("power");
        let o = g.handle(&Request::new("POST", "/poweroff", b""));
        assert_eq!(o.response.status, 503);
        assert_eq!(o.after, None);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn power_actions_are_scheduled_in_a_vm_and_a_container() {
        let (g, dir) = guest("power2");
        for place in [Place::Vm, Place::Container] {
            let g = Guest::new(
                Config {
                    place,
                    ..g.config().clone()
                },
                Identity::default(),
            );
            let o = g.handle(&Request::new("POST", "/reboot", b""));
            assert_eq!(o.response.status, 200);
            assert_eq!(o.after, Some(PowerAction::Reboot));
            let o = g.handle(&Request::new("POST", "/poweroff", b""));
            assert_eq!(o.after, Some(PowerAction::PowerOff));
        }
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_container_keeps_data_in_a_plain_directory() {
        let (g, dir) = guest("container-data");
        let g = Guest::new(
            Config {
                place: Place::Container,
                ..g.config().clone()
            },
            Identity::default(),
        );
        // The temporary directory is no mount point: a VM would answer 503.
        assert_eq!(call(&g, "POST", "/counter/increment", b"").status, 200);
        assert_eq!(call(&g, "PUT", "/files/a.txt", b"x").status, 200);
        assert_eq!(call(&g, "GET", "/files/a.txt", b"").body, b"x");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn the_place_comes_from_the_environment() {
        assert_eq!(Place::detect(None, None), Place::Vm);
        assert_eq!(Place::detect(None, Some("1")), Place::Container);
        assert_eq!(Place::detect(None, Some("0")), Place::Vm);
        assert_eq!(Place::detect(Some("1"), Some("1")), Place::Host);
        assert!(Place::Vm.requires_mounted_data() && Place::Vm.owns_machine());
        assert!(!Place::Container.requires_mounted_data() && !Place::Container.owns_machine());
        assert!(Place::Container.acts_on_power() && !Place::Host.acts_on_power());
    }

    #[test]
    fn test_hooks_are_off_unless_the_host_asks() {
        let (g, dir) = guest("hooks");
        let g = Guest::new(
            Config {
                test_hooks: false,
                ..g.config().clone()
            },
            Identity::default(),
        );
        for (method, path) in [
            ("POST", "/poweroff"),
            ("POST", "/reboot"),
            ("GET", "/fetch?url=http://10.0.0.1/"),
            ("GET", "/resolve?name=web"),
            ("GET", "/blk"),
            ("PUT", "/blk/vdb"),
        ] {
            let o = g.handle(&Request::new(method, path, b""));
            assert_eq!(o.response.status, 404, "{method} {path}");
            assert_eq!(o.after, None);
        }
        // The page and the state endpoints stay.
        assert_eq!(
            g.handle(&Request::new("GET", "/", b"")).response.status,
            200
        );
        assert_eq!(
            g.handle(&Request::new("GET", "/health", b""))
                .response
                .status,
            200
        );
        let _ = fs::remove_dir_all(dir);
    }
}
