//! What a full-OS guest reports about itself through the QEMU guest agent:
//! whether cloud-init has finished this boot (its `result.json`, which it
//! writes at the very end), with its errors, and the guest's addresses.
//! Guest-supplied data: shown to the VM's owner, never trusted for
//! anything else.

use std::path::Path;
use std::time::Duration;

use skyvisor_core::CloudInitReport;
use skyvisor_qemu::GuestAgent;

use crate::supervisor::GuestReady;

/// Written by cloud-init in the guest when its last stage has finished.
const RESULT_FILE: &str = "/run/cloud-init/result.json";
/// How often the guest is asked while it boots.
const POLL: Duration = Duration::from_secs(1);
/// How long one question may take (a guest under TCG is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls the guest agent until cloud-init has finished; runs until then
/// (an image without cloud-init or a guest agent never reports, and the
/// caller shows that).
pub(crate) async fn await_cloud_init(socket: &Path) -> GuestReady {
    loop {
        if let Some(ready) = ask(socket).await {
            return ready;
        }
        // The poll interval of a readiness check, not a readiness wait.
        tokio::time::sleep(POLL).await;
    }
}

async fn ask(socket: &Path) -> Option<GuestReady> {
    let mut agent = GuestAgent::connect(socket, CALL_TIMEOUT).await.ok()?;
    let bytes = agent.read_file(RESULT_FILE).await.ok()??;
    let report = parse_result(&bytes);
    let addresses = match agent.interfaces().await {
        Ok(list) => list
            .into_iter()
            .filter(|i| i.name != "lo")
            .flat_map(|i| i.addresses)
            .filter(|a| !a.starts_with("fe80:"))
            .collect(),
        Err(_) => Vec::new(),
    };
    Some(GuestReady::CloudInit { report, addresses })
}

/// cloud-init's `result.json`: `{"v1": {"datasource": ..., "errors": [...]}}`.
fn parse_result(bytes: &[u8]) -> CloudInitReport {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let v1 = &v["v1"];
    CloudInitReport {
        datasource: v1["datasource"]
            .as_str()
            .unwrap_or("unknown")
            .chars()
            .take(200)
            .collect(),
        errors: v1["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(20)
                    .map(|e| match e.as_str() {
                        Some(s) => s.chars().take(500).collect(),
                        None => e.to_string().chars().take(500).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cloud_inits_result() {
        let r = parse_result(
            br#"{"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]", "errors": ["('runcmd', Exception())"]}}"#,
        );
        assert_eq!(r.datasource, "DataSourceNoCloud [seed=/dev/sr0]");
        assert_eq!(r.errors, ["('runcmd', Exception())"]);
        let garbage = parse_result(b"not json");
        assert_eq!(garbage.datasource, "unknown");
        assert!(garbage.errors.is_empty());
    }
}
