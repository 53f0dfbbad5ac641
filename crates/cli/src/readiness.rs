//! Waiting for what a request needs before sending it, so that a command run
//! right after `skyvisor up` waits (with progress) instead of failing: the
//! API answering, a host registered and ready, the image built.
//!
//! Every wait is bounded and says what it waited for when it gives up. A
//! refusal that waiting cannot cure (an unknown image, a failed build) is
//! returned at once.

use std::time::Duration;

use anyhow::{Result, bail};
use skyvisor_core::host::{HostState, HostView};
use skyvisor_core::image::{Image, ImageState};

use crate::client::{Client, ClientError};
use crate::progress::Progress;

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(250);

/// What a request needs before it is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs<'a> {
    /// An image that must be ready (`None`: no image).
    pub image: Option<&'a str>,
    /// Hosts that must be registered and ready.
    pub hosts: usize,
}

/// Waits until the API answers, `needs.hosts` hosts are ready and
/// `needs.image` is built, for at most `timeout`; shows progress unless
/// `quiet`.
pub async fn wait_for(
    client: &Client,
    needs: Needs<'_>,
    timeout: Duration,
    quiet: bool,
) -> Result<()> {
    let mut progress = Progress::new(quiet);
    let result = wait_inner(client, needs, timeout, &mut progress).await;
    progress.finish();
    result
}

async fn wait_inner(
    client: &Client,
    needs: Needs<'_>,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<()> {
    loop {
        let waiting_for = match pending(client, needs).await? {
            None => return Ok(()),
            Some(w) => w,
        };
        progress.set(&waiting_for);
        if progress.elapsed() > timeout {
            bail!(
                "gave up after {}s waiting for {waiting_for}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What is still missing, as words for people, or `None` when nothing is.
async fn pending(client: &Client, needs: Needs<'_>) -> Result<Option<String>> {
    // The image first: `skyvisor up` builds it before its host registers.
    if let Some(name) = needs.image {
        match client.get::<Image>(&format!("/v1/images/{name}")).await {
            Ok(img) => match img.state {
                ImageState::Ready => {}
                ImageState::Building => {
                    return Ok(Some(format!(
                        "image {name} to be built: {}",
                        img.message.unwrap_or_else(|| "building".into())
                    )));
                }
                ImageState::Failed => bail!(
                    "image {name} failed to build: {}",
                    img.message.unwrap_or_default()
                ),
            },
            // The create names what is wrong, with what exists.
            Err(e) if e.is_not_found() => {}
            Err(ClientError::Unreachable { url, .. }) => {
                return Ok(Some(format!("the Skyvisor API at {url} to answer")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let hosts: Vec<HostView> = match client.get("/v1/hosts").await {
        Ok(h) => h,
        Err(ClientError::Unreachable { url, .. }) => {
            return Ok(Some(format!("the Skyvisor API at {url} to answer")));
        }
        Err(e) => return Err(e.into()),
    };
    let ready = hosts.iter().filter(|h| h.state == HostState::Ready).count();
    if ready < needs.hosts {
        return Ok(Some(format!(
            "{} ready host(s) (registered: {}, ready: {ready})",
            needs.hosts,
            hosts.len()
        )));
    }
    Ok(None)
}
