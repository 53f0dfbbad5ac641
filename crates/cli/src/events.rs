//! `skyvisor event list [--follow]`: the event record, as a table or JSON,
//! and followed live over the server-sent event stream.

use anyhow::{Context, Result};
use futures::StreamExt;
use skyvisor_core::Event;

use crate::client::Client;
use crate::output::{self, OutputFormat, table};

/// What `event list` shows.
pub struct EventArgs {
    /// Only this VM's events.
    pub vm: Option<String>,
    /// Keep printing events as they happen.
    pub follow: bool,
    /// Every project's events (cluster admins).
    pub cluster: bool,
    /// Most past events.
    pub limit: usize,
}

fn query(args: &EventArgs) -> String {
    let mut q = format!("limit={}&cluster={}", args.limit, args.cluster);
    if let Some(vm) = &args.vm {
        q.push_str(&format!("&instance={}", urlencode(vm)));
    }
    q
}

/// Percent-encodes `s` for a query string or path segment.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `skyvisor event list`.
pub async fn list(client: &Client, format: OutputFormat, args: EventArgs) -> Result<()> {
    if args.follow {
        return follow(client, format, &args).await;
    }
    let events: Vec<Event> = client.get(&format!("/v1/events?{}", query(&args))).await?;
    output::print(format, &events, |events| {
        let mut t = table(&["SEQ", "TIME", "PROJECT", "OBJECT", "EVENT", "BY", "MESSAGE"]);
        for e in events {
            t.add_row(row(e));
        }
        println!("{t}");
    });
    Ok(())
}

fn row(e: &Event) -> Vec<String> {
    vec![
        e.seq.to_string(),
        e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
        e.project
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.to_string()),
        format!("{} {}", e.object, e.name),
        e.kind.to_string(),
        e.identity
            .as_ref()
            .map_or_else(|| "system".to_string(), |i| i.to_string()),
        e.message.clone(),
    ]
}

/// Prints events as they arrive: a line each for people, one JSON document
/// per line for scripts. Reconnects after the last event seen when the
/// stream breaks (a server restarting, a failover to another server).
async fn follow(client: &Client, format: OutputFormat, args: &EventArgs) -> Result<()> {
    let path = format!("/v1/events/stream?{}", query(args));
    let mut last: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let resp = match client.open_stream(&path, last).await {
            Ok(r) => {
                failures = 0;
                r
            }
            // The request itself is wrong (or not allowed): say so and stop.
            Err(e @ crate::client::ClientError::Api { .. }) => return Err(e.into()),
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e).context("the event stream is gone");
                }
                eprintln!("event stream: {e}; reconnecting");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for message in parser.push(&chunk) {
                match message {
                    SseMessage::Event(data) => {
                        let e: Event = serde_json::from_str(&data)
                            .context("the event stream sent an unreadable event")?;
                        last = Some(e.seq);
                        match format {
                            OutputFormat::Json => println!("{}", serde_json::to_string(&e)?),
                            OutputFormat::Table => println!("{}", row(&e).join("  ")),
                        }
                    }
                    SseMessage::Error(m) => eprintln!("event stream: {m}"),
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// One message of a server-sent event stream.
#[derive(Debug, PartialEq)]
enum SseMessage {
    /// An event's data.
    Event(String),
    /// An `event: error` message's data.
    Error(String),
}

/// Splits a server-sent event stream into messages (the subset the API
/// sends: `id`, `event`, `data` fields and comments).
#[derive(Default)]
struct SseParser {
    buffer: String,
    kind: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        self.buffer.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.buffer.find('\n') {
            let line: String = self.buffer.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let data = self.data.join("\n");
                    out.push(match self.kind.as_deref() {
                        Some("error") => SseMessage::Error(data),
                        _ => SseMessage::Event(data),
                    });
                }
                self.data.clear();
                self.kind = None;
            } else if let Some(d) = line.strip_prefix("data:") {
                self.data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
            } else if let Some(k) = line.strip_prefix("event:") {
                self.kind = Some(k.trim().to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_joins_split_chunks_and_skips_comments() {
        let mut p = SseParser::default();
        assert!(p.push(b"id: 7\ndata: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\n\n: keep-alive\n\nevent: error\ndata: broke\n\n"),
            vec![
                SseMessage::Event("{\"a\":1}".into()),
                SseMessage::Error("broke".into())
            ]
        );
    }
}
