//! `GET /v1/events`: the event record of the caller's project (or, for a
//! cluster admin, of the whole cluster), and `GET /v1/events/stream`, the
//! same as server-sent events that keep coming as things happen.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::{Event, InstanceName, ValidationError};
use utoipa::IntoParams;

use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};
use crate::events::{Filter, MAX_LIST};

use super::ApiQuery;

/// Which events.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    /// Only those about this instance (of the request's project).
    #[serde(default)]
    instance: Option<String>,
    /// Only those after this sequence number (an event's `seq`).
    #[serde(default)]
    after: Option<u64>,
    /// Most events, the newest (default 100, at most 1000); the stream
    /// first sends at most this many of the past.
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Every project's events and the cluster's (hosts, tokens) instead of
    /// the request's project's; cluster admins only.
    #[serde(default)]
    cluster: bool,
}

impl EventQuery {
    fn limit(&self) -> ApiResult<usize> {
        match self.limit {
            None => Ok(100),
            Some(n) if (1..=MAX_LIST).contains(&n) => Ok(n),
            Some(n) => Err(ValidationError::new(
                "limit",
                format!("{n} is out of range; allowed: 1 to {MAX_LIST}"),
            )
            .into()),
        }
    }

    /// The filter, checked against what the caller may see.
    fn filter(&self, caller: &Caller, last_seen: Option<u64>) -> ApiResult<Filter> {
        if self.cluster && !caller.is_cluster_admin() {
            return Err(ApiError::forbidden(
                "the cluster's events (every project's) need a cluster admin; \
                 leave out cluster=true for your project's",
            ));
        }
        let instance = match &self.instance {
            Some(i) => Some(InstanceName::new(i)?.to_string()),
            None => None,
        };
        Ok(Filter {
            project: (!self.cluster).then(|| caller.project.clone()),
            instance,
            after: last_seen.or(self.after).unwrap_or(0),
        })
    }
}

/// The newest events of the request's project, oldest first.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventQuery),
    responses(
        (status = 200, body = Vec<Event>),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> ApiResult<Json<Vec<Event>>> {
    let limit = q.limit()?;
    let filter = q.filter(&caller, None)?;
    let (events, _) = crate::events::list(cp.store.as_ref(), &filter, limit).await?;
    Ok(Json(events))
}

/// One message of the event stream, as a client's SSE parser gives it.
#[derive(utoipa::ToSchema)]
// Only describes the stream in the API document; the stream is written by
// axum's SSE encoder.
#[allow(dead_code)]
pub(crate) struct EventMessage {
    /// The event, as JSON: an `Event`.
    #[schema(content_media_type = "application/json")]
    data: String,
    /// The SSE event type: always `message`.
    event: Option<String>,
    /// The event's `seq`, for `Last-Event-ID`.
    id: String,
}

/// The events of the request's project as server-sent events: first the
/// newest past ones (after `after`, or the `Last-Event-ID` a reconnecting
/// client sends), then each new one as it is recorded. Each SSE event is
/// one JSON [`Event`] whose id is its `seq`. The stream ends if the store's
/// watch breaks; reconnect with the last id seen to miss nothing.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events",
    params(EventQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = EventMessage,
            description = "one message per event: `data:` the event as JSON (an `Event`), `id:` its seq"),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ))]
pub(super) async fn stream(
    State(cp): State<ControlPlane>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let limit = q.limit()?;
    let last_seen = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ValidationError::new(
                        "Last-Event-ID",
                        "not an event's seq; allowed: a whole number",
                    )
                })?,
        ),
    };
    let filter = q.filter(&caller, last_seen)?;
    let (past, revision) = crate::events::list(cp.store.as_ref(), &filter, limit).await?;
    let live = crate::events::follow(cp.store.as_ref(), filter, revision).await?;
    let events = futures::stream::iter(past.into_iter().map(Ok))
        .chain(live)
        .map(|item| {
            Ok(match item {
                Ok(e) => sse_of(&e),
                Err(e) => SseEvent::default()
                    .event("error")
                    .data(format!("the event stream broke ({e}); reconnect")),
            })
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse_of(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_default();
    SseEvent::default().id(e.seq.to_string()).data(data)
}
