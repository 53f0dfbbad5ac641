//! `skyvisor-guest`: the service inside every default Skyvisor guest VM.
//!
//! Started (and restarted if it dies) by the initramfs `/init` script, which stays
//! PID 1. Subcommands: `serve` (default) runs the HTTP service on port 80, the
//! virtio-serial control channel and the power-button watcher; `probe` prints
//! `SKYVISOR-PROBE-OK` on the console and powers off (the host's accelerator probe).
//!
//! In a container (`SV_CONTAINER=1`, started by the same `/init`) it reads its
//! identity from `SV_CMDLINE` instead of `/proc/cmdline` (the host's), and runs
//! only the HTTP service: there is no control channel nor power button.
//!
//! The process must never panic on a request, must answer every bad request with a
//! 4xx and a text reason, and must keep serving while a single connection misbehaves.

mod blk;
mod cmdline;
mod control;
mod disk;
mod fetch;
mod http;
mod json;
mod memtest;
mod power;
mod service;

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use service::{Config, Guest, Outcome};

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 256;
/// A client that sends nothing for this long is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let mode = std::env::args().nth(1);
    match mode.as_deref() {
        None | Some("serve") => serve(),
        Some("probe") => power::probe(),
        Some(other) => {
            eprintln!("usage: skyvisor-guest [serve|probe] (unknown {other:?})");
            std::process::exit(2);
        }
    }
}

fn serve() {
    let cmdline = cmdline::boot_words(std::env::var_os("SV_CMDLINE"), || {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    });
    let boot = cmdline::parse(&cmdline);
    for (key, value, why) in &boot.rejected {
        eprintln!("skyvisor-guest: ignoring {key}={value}: {why}");
    }
    let mut config = Config::from_env();
    config.test_hooks |= boot.test_hooks;
    let guest = Arc::new(Guest::new(config.clone(), boot.identity));

    let ticker = Arc::clone(&guest);
    spawn("ram-counter", move || {
        loop {
            thread::sleep(Duration::from_millis(100));
            ticker.tick();
        }
    });
    if config.place.owns_machine() {
        let g = Arc::clone(&guest);
        spawn("control", move || control::serve(g));
        let g = Arc::clone(&guest);
        spawn("power-watch", move || {
            power::watch_power_button(Arc::new(move || {
                power::graceful(&g, service::PowerAction::PowerOff)
            }))
        });
    }

    let listener = match TcpListener::bind(("0.0.0.0", config.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skyvisor-guest: cannot listen on port {}: {e}", config.port);
            std::process::exit(1);
        }
    };
    println!("{}", guest.ready_line());
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let mut s = stream;
            // Never let a slow client stall the accept loop.
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = http::Response::text(503, "too many connections").write_to(&mut s, false);
            continue;
        }
        let g = Arc::clone(&guest);
        let a = Arc::clone(&active);
        let spawned = thread::Builder::new()
            .name("conn".to_string())
            .spawn(move || {
                connection(&g, stream);
                a.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(name.to_string()).spawn(f) {
        eprintln!("skyvisor-guest: cannot start thread {name}: {e}");
    }
}

/// Serves one request on `stream`, then closes it (and performs any power action).
fn connection(guest: &Guest, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let head = match http::read_head(&mut reader) {
        Ok(h) => h,
        Err(e) => {
            if let Some(r) = e.response() {
                let _ = r.write_to(&mut writer, false);
            }
            return;
        }
    };
    if head.expects_continue() {
        let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let body = match http::read_body(&mut reader, &head, http::MAX_BODY_BYTES) {
        Ok(b) => b,
        Err(e) => {
            if let Some(r) = e.response() {
                let _ = r.write_to(&mut writer, false);
            }
            return;
        }
    };
    let head_only = head.method == "HEAD";
    let req = http::Request { head, body };
    let Outcome { response, after } = guest.handle(&req);
    let _ = response.write_to(&mut writer, head_only);
    let _ = writer.shutdown(Shutdown::Both);
    if let Some(action) = after {
        power::graceful(guest, action);
    }
}
