//! Usage and invoices of a project, and the price sheet, as the API serves
//! them. The arithmetic is the metering crate's; this module reads the
//! event record, keeps the sheet in the store, and stores each closed
//! month's invoice the first time it is made, so that it never changes.

use chrono::{DateTime, Utc};
use skyvisor_core::usage::{EgressHour, Invoice, UsageLine, UsageReport};
use skyvisor_core::{ProjectName, keys};
use skyvisor_metering::PriceSheet;
use skyvisor_store::{Compare, Op, StoreExt, decode, encode};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// How long after a month ends its invoice stays open: events recorded a
/// little late (an agent that was cut off) still count.
pub const CLOSE_GRACE: chrono::Duration = chrono::Duration::hours(1);

impl ControlPlane {
    /// The metered usage of `project` in `[from, to)` (`to` at most now).
    pub async fn metered_usage(
        &self,
        project: &ProjectName,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> ApiResult<UsageReport> {
        let to = to.min(Utc::now());
        if from >= to {
            let mut e = ApiError::invalid(format!(
                "the period is empty: from {from} is not before to {to} (to is at most now)"
            ));
            e.field = Some("from".into());
            return Err(e);
        }
        Ok(UsageReport {
            project: project.clone(),
            from,
            to,
            lines: self.usage_lines(project, from, to).await?,
        })
    }

    /// Every usage line of `project` in `[from, to)`: from its events, and
    /// its hourly egress records.
    async fn usage_lines(
        &self,
        project: &ProjectName,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> ApiResult<Vec<UsageLine>> {
        let events = crate::events::all(self.store.as_ref(), project).await?;
        let mut lines = skyvisor_metering::usage(&events, from, to);
        let prefix = keys::egress_hours(project);
        let listing = self.store.list(&prefix).await?;
        let mut hours: Vec<(DateTime<Utc>, u64)> = Vec::with_capacity(listing.items.len());
        for kv in &listing.items {
            let record: EgressHour = decode(kv)?;
            if let Some(hour) = kv
                .key
                .strip_prefix(&prefix)
                .and_then(skyvisor_core::usage::parse_hour_name)
            {
                hours.push((hour, record.bytes));
            }
        }
        lines.extend(skyvisor_metering::egress(&hours, from, to));
        Ok(lines)
    }

    /// The invoice of `project` for `month` (`YYYY-MM`): final once the
    /// month is over (plus [`CLOSE_GRACE`]), a running estimate before.
    pub async fn invoice(&self, project: &ProjectName, month: &str) -> ApiResult<Invoice> {
        let Some((start, end)) = skyvisor_metering::month_bounds(month) else {
            let mut e = ApiError::invalid(format!(
                "month {month:?} is not a month; allowed: YYYY-MM, e.g. 2026-12"
            ));
            e.field = Some("month".into());
            return Err(e);
        };
        let now = Utc::now();
        if start > now {
            // No such invoice (yet): like any object that does not exist.
            return Err(ApiError::not_found(format!(
                "no invoice for {month}: the month has not begun; allowed: this month or an earlier one"
            )));
        }
        let key = keys::invoice(project, month);
        let closed = now >= end + CLOSE_GRACE;
        if closed && let Some((stored, _)) = self.store.get_json::<Invoice>(&key).await? {
            return Ok(stored);
        }
        let usage = self.usage_lines(project, start, end.min(now)).await?;
        let sheet = self.price_sheet().await?;
        let invoice = skyvisor_metering::invoice(project, month, &usage, &sheet, closed, now);
        // An open month changes still; an empty closed one is the same
        // whenever it is made, and a GET should not leave records behind.
        if !closed || invoice.lines.is_empty() {
            return Ok(invoice);
        }
        // The first to close the month stores it; everyone else reads that.
        let out = self
            .store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::Put {
                    key: key.clone(),
                    value: encode(&invoice),
                    lease: None,
                }],
            )
            .await?;
        if out.succeeded {
            return Ok(invoice);
        }
        match self.store.get_json::<Invoice>(&key).await? {
            Some((stored, _)) => Ok(stored),
            None => Err(ApiError::unavailable(format!(
                "the invoice of {month} is being closed; retry"
            ))),
        }
    }

    /// The price sheet in force (the built-in one until an admin sets one).
    pub async fn price_sheet(&self) -> ApiResult<PriceSheet> {
        match self.store.get(keys::PRICE_SHEET).await? {
            None => Ok(PriceSheet::default_sheet()),
            Some(kv) => {
                let text = String::from_utf8_lossy(&kv.value);
                PriceSheet::parse(&text).map_err(|e| {
                    ApiError::internal(format!("the stored price sheet is unreadable: {e}"))
                })
            }
        }
    }

    /// Replaces the price sheet with `text` (TOML), once it checks out.
    /// Invoices already closed keep the prices they were made with.
    pub async fn set_price_sheet(&self, text: &str) -> ApiResult<PriceSheet> {
        let sheet = PriceSheet::parse(text).map_err(|e| {
            let mut err = ApiError::invalid(e.to_string());
            err.field = Some("toml".into());
            err
        })?;
        self.store
            .put(keys::PRICE_SHEET, sheet.to_toml().into_bytes())
            .await?;
        Ok(sheet)
    }
}
