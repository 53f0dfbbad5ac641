//! `GET /v1/usage`, `GET /v1/invoices/{month}` (the request's project) and
//! the price sheet (`GET`/`PUT /v1/price-sheet`, set by cluster admins).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::Deserialize;
use skyvisor_core::ValidationError;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::usage::{Invoice, PriceSheetText, UsageReport};
use utoipa::IntoParams;

use super::{ApiJson, ApiQuery};
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// The period of a usage report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageQuery {
    /// From (inclusive): RFC 3339 or a date (`2026-12-01`, midnight UTC);
    /// default: the start of this month.
    #[serde(default)]
    from: Option<String>,
    /// To (exclusive): RFC 3339 or a date; default and at most: now.
    #[serde(default)]
    to: Option<String>,
}

fn instant(field: &str, text: &str) -> Result<DateTime<Utc>, ValidationError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| Utc.from_utc_datetime(&d))
        .ok_or_else(|| {
            ValidationError::new(
                field,
                format!("{text:?} is not a time; allowed: RFC 3339 (2026-12-01T00:00:00Z) or a date (2026-12-01)"),
            )
        })
}

/// The request project's usage over a period, by meter and instance type,
/// computed from its recorded state transitions.
#[utoipa::path(get, path = "/v1/usage", tag = "billing",
    params(UsageQuery),
    responses(
        (status = 200, body = UsageReport),
        (status = 400, body = ErrorBody),
    ))]
pub(super) async fn usage(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    let now = Utc::now();
    let from = match &q.from {
        Some(f) => instant("from", f)?,
        None => skyvisor_metering::month_bounds(&skyvisor_metering::month_of(now))
            .map_or(now, |(start, _)| start),
    };
    let to = match &q.to {
        Some(t) => instant("to", t)?,
        None => now,
    };
    Ok(Json(cp.metered_usage(&caller.project, from, to).await?))
}

/// The request project's invoice for a month (`YYYY-MM`): final and
/// unchanging once the month is over, an estimate before.
#[utoipa::path(get, path = "/v1/invoices/{month}", tag = "billing",
    params(("month" = String, Path, description = "YYYY-MM")),
    responses(
        (status = 200, body = Invoice),
        (status = 400, body = ErrorBody),
    ))]
pub(super) async fn invoice(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(month): Path<String>,
) -> ApiResult<Json<Invoice>> {
    Ok(Json(cp.invoice(&caller.project, &month).await?))
}

/// The price sheet in force.
#[utoipa::path(get, path = "/v1/price-sheet", tag = "billing",
    responses((status = 200, body = PriceSheetText)))]
pub(super) async fn price_sheet(State(cp): State<ControlPlane>) -> ApiResult<Json<PriceSheetText>> {
    Ok(Json(PriceSheetText {
        toml: cp.price_sheet().await?.to_toml(),
    }))
}

/// Replaces the price sheet; closed invoices keep the prices they were
/// made with.
#[utoipa::path(put, path = "/v1/price-sheet", tag = "billing",
    request_body = PriceSheetText,
    responses(
        (status = 200, body = PriceSheetText),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ))]
pub(super) async fn set_price_sheet(
    State(cp): State<ControlPlane>,
    ApiJson(req): ApiJson<PriceSheetText>,
) -> ApiResult<Json<PriceSheetText>> {
    Ok(Json(PriceSheetText {
        toml: cp.set_price_sheet(&req.toml).await?.to_toml(),
    }))
}
