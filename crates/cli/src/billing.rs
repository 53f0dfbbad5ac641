//! `skyvisor usage`, `skyvisor invoice` and `skyvisor price-sheet`: tables
//! for people, JSON or CSV for scripts.

use anyhow::{Context, Result};
use skyvisor_core::usage::{Invoice, PriceSheetText, UsageReport};

use crate::client::Client;
use crate::output::{self, OutputFormat, table};

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
}

/// `skyvisor usage [--from] [--to] [--csv]`.
pub async fn usage(
    client: &Client,
    format: OutputFormat,
    from: Option<String>,
    to: Option<String>,
    csv: bool,
) -> Result<()> {
    let mut query = Vec::new();
    if let Some(f) = from {
        query.push(format!("from={}", crate::events::urlencode(&f)));
    }
    if let Some(t) = to {
        query.push(format!("to={}", crate::events::urlencode(&t)));
    }
    let report: UsageReport = client
        .get(&format!("/v1/usage?{}", query.join("&")))
        .await?;
    if csv {
        println!("meter,instance_type,replicas,quantity,unit");
        for l in &report.lines {
            println!(
                "{}",
                csv_row(&[
                    serde_json::to_value(l.meter)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    l.instance_type.clone().unwrap_or_default(),
                    l.replicas.map(|r| r.to_string()).unwrap_or_default(),
                    l.quantity.to_string(),
                    l.unit.clone(),
                ])
            );
        }
        return Ok(());
    }
    output::print(format, &report, |r| {
        println!(
            "project {} from {} to {}",
            r.project,
            r.from.format("%Y-%m-%d %H:%M:%S"),
            r.to.format("%Y-%m-%d %H:%M:%S")
        );
        let mut t = table(&["METER", "TYPE / REPLICAS", "QUANTITY", "UNIT"]);
        for l in &r.lines {
            t.add_row(vec![
                serde_json::to_value(l.meter)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                match (&l.instance_type, l.replicas) {
                    (Some(t), _) => t.clone(),
                    (None, Some(r)) => format!("{r} replicas"),
                    (None, None) => "-".into(),
                },
                l.quantity.to_string(),
                l.unit.clone(),
            ]);
        }
        println!("{t}");
    });
    Ok(())
}

/// `skyvisor invoice --month YYYY-MM [--csv]`.
pub async fn invoice(client: &Client, format: OutputFormat, month: &str, csv: bool) -> Result<()> {
    let invoice: Invoice = client
        .get(&format!("/v1/invoices/{}", crate::events::urlencode(month)))
        .await?;
    if csv {
        println!("description,quantity,unit,unit_price,amount,currency");
        for l in &invoice.lines {
            println!(
                "{}",
                csv_row(&[
                    l.description.clone(),
                    l.quantity.to_string(),
                    l.unit.clone(),
                    l.unit_price.to_string(),
                    l.amount.to_string(),
                    invoice.currency.clone(),
                ])
            );
        }
        println!(
            "{}",
            csv_row(&[
                "total".into(),
                String::new(),
                String::new(),
                String::new(),
                invoice.total.to_string(),
                invoice.currency.clone(),
            ])
        );
        return Ok(());
    }
    output::print(format, &invoice, |inv| {
        println!(
            "invoice of project {} for {} ({})",
            inv.project,
            inv.month,
            if inv.closed {
                "closed"
            } else {
                "open: an estimate so far"
            }
        );
        let mut t = table(&["DESCRIPTION", "QUANTITY", "UNIT", "UNIT PRICE", "AMOUNT"]);
        for l in &inv.lines {
            t.add_row(vec![
                l.description.clone(),
                l.quantity.to_string(),
                l.unit.clone(),
                l.unit_price.to_string(),
                format!("{} {}", l.amount, inv.currency),
            ]);
        }
        t.add_row(vec![
            "total".to_string(),
            String::new(),
            String::new(),
            String::new(),
            format!("{} {}", inv.total, inv.currency),
        ]);
        println!("{t}");
    });
    Ok(())
}

/// `skyvisor price-sheet show`.
pub async fn show_price_sheet(client: &Client, format: OutputFormat) -> Result<()> {
    let sheet: PriceSheetText = client.get("/v1/price-sheet").await?;
    output::print(format, &sheet, |s| print!("{}", s.toml));
    Ok(())
}

/// `skyvisor price-sheet set FILE`.
pub async fn set_price_sheet(client: &Client, format: OutputFormat, file: &str) -> Result<()> {
    let toml = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let sheet: PriceSheetText = client
        .call(
            reqwest::Method::PUT,
            "/v1/price-sheet",
            Some(&PriceSheetText { toml }),
        )
        .await?;
    output::print(format, &sheet, |s| {
        println!("price sheet set:");
        print!("{}", s.toml);
    });
    Ok(())
}
