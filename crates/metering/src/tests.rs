use chrono::{Duration, TimeZone};
use proptest::prelude::*;
use rust_decimal::Decimal;
use skyvisor_core::{Resources, usage::Meter};

use super::*;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
        .single()
        .expect("time")
        + Duration::seconds(secs)
}

fn ev(kind: EventKind, name: &str, at: i64, ty: Option<&str>, vcpus: u32, mib: u64) -> Event {
    let mut e = Event::new(
        kind,
        ObjectKind::Instance,
        Some(ProjectName::new("web").expect("p")),
        name,
        "",
    )
    .sized(
        ty.map(str::to_string),
        Resources {
            vcpus,
            memory_mib: mib,
            disk_gib: 1,
        },
    );
    e.at = t(at);
    e
}

fn qty(lines: &[UsageLine], meter: Meter, ty: &str) -> Decimal {
    lines
        .iter()
        .find(|l| l.meter == meter && l.instance_type.as_deref() == Some(ty))
        .map_or(Decimal::ZERO, |l| l.quantity)
}

#[test]
fn runs_and_stops_are_counted_to_the_millisecond() {
    let nano = Some("nano");
    let events = vec![
        ev(EventKind::Created, "a", 0, nano, 1, 128),
        ev(EventKind::Started, "a", 10, nano, 1, 128),
        // A live migration does not interrupt the run.
        ev(EventKind::Migrated, "a", 50, nano, 1, 128),
        ev(EventKind::Stopped, "a", 110, nano, 1, 128),
        ev(EventKind::Started, "a", 200, nano, 1, 128),
        // Down from the fence to the restart on another host: not billed.
        ev(EventKind::FailedOver, "a", 300, nano, 1, 128),
        ev(EventKind::Started, "a", 330, nano, 1, 128),
        ev(EventKind::Deleted, "a", 400, nano, 1, 128),
    ];
    let u = usage(&events, t(0), t(1000));
    assert_eq!(
        qty(&u, Meter::InstanceRunning, "nano"),
        Decimal::from(100 + 100 + 70)
    );
    assert_eq!(
        qty(&u, Meter::InstanceStopped, "nano"),
        Decimal::from(10 + 90 + 30)
    );
    // A window cuts runs at its edges.
    let part = usage(&events, t(60), t(250));
    assert_eq!(
        qty(&part, Meter::InstanceRunning, "nano"),
        Decimal::from(50 + 50)
    );
}

#[test]
fn custom_sizes_are_counted_in_vcpu_and_memory_seconds() {
    let events = vec![
        ev(EventKind::Created, "c", 0, None, 3, 1536),
        ev(EventKind::Started, "c", 0, None, 3, 1536),
    ];
    let u = usage(&events, t(0), t(100));
    assert_eq!(qty(&u, Meter::CustomVcpu, "custom"), Decimal::from(300));
    assert_eq!(qty(&u, Meter::CustomMemory, "custom"), Decimal::from(150));
    assert_eq!(qty(&u, Meter::InstanceRunning, "custom"), Decimal::ZERO);
}

#[test]
fn a_second_start_without_an_end_never_bills_twice() {
    let events = vec![
        ev(EventKind::Started, "a", 0, Some("micro"), 1, 256),
        ev(EventKind::Restarted, "a", 60, Some("micro"), 1, 256),
    ];
    let u = usage(&events, t(0), t(100));
    assert_eq!(qty(&u, Meter::InstanceRunning, "micro"), Decimal::from(100));
}

#[test]
fn the_built_in_sheet_is_valid_and_bad_sheets_say_what_is_wrong() {
    let sheet = PriceSheet::default_sheet();
    assert_eq!(
        PriceSheet::parse(&sheet.to_toml()).expect("round trip"),
        sheet
    );
    let text = sheet.to_toml();
    // A syntax error names its line.
    let nano_line = format!(
        "line {}",
        text.lines()
            .position(|l| l == "nano = \"0.0050\"")
            .expect("nano's running price")
            + 1
    );
    for (bad, says) in [
        (text.replace("nano = \"0.0050\"", "nano = 0.005"), "string"),
        (
            text.replace("nano = \"0.0050\"", "nano = \"-1\""),
            "negative",
        ),
        (
            text.replace("nano = \"0.0050\"\n", ""),
            "no [running] price for instance type nano",
        ),
        (
            text.replace("nano = \"0.0050\"", "nano = \"0.0050\"\ngiant = \"9\""),
            "giant, which does not exist",
        ),
        (
            text.replace("currency = \"USD\"", "currency = \"dollars\""),
            "three-letter",
        ),
        (
            text.replace("nano = \"0.0050\"", "nano = \"cheap\""),
            "not a decimal",
        ),
        (format!("{text}\nsurprise = 1\n"), "surprise"),
        (
            text.replace("nano = \"0.0050\"", "nano = 0.005"),
            nano_line.as_str(),
        ),
    ] {
        let e = PriceSheet::parse(&bad).expect_err(says).to_string();
        assert!(e.contains(says), "{says}: {e}");
    }
}

#[test]
fn an_invoice_prices_hours_and_rounds_each_line_to_the_cent() {
    let sheet = PriceSheet::default_sheet();
    let events = vec![
        ev(EventKind::Started, "a", 0, Some("micro"), 1, 256),
        ev(EventKind::Started, "c", 0, None, 2, 2048),
    ];
    let (from, to) = month_bounds("2026-12").expect("month");
    assert_eq!(to - from, Duration::days(31));
    let u = usage(&events, from, to);
    let inv = invoice(
        &ProjectName::new("web").expect("p"),
        "2026-12",
        &u,
        &sheet,
        true,
        to,
    );
    let line = |m: Meter| inv.lines.iter().find(|l| l.meter == m).expect("line");
    // 744 hours of micro at 0.0100.
    assert_eq!(line(Meter::InstanceRunning).quantity, Decimal::from(744));
    assert_eq!(line(Meter::InstanceRunning).amount, Decimal::new(744, 2));
    // 2 vCPUs x 744 h at 0.0150; 2 GiB x 744 h at 0.0050.
    assert_eq!(line(Meter::CustomVcpu).amount, Decimal::new(2232, 2));
    assert_eq!(line(Meter::CustomMemory).amount, Decimal::new(744, 2));
    assert_eq!(inv.total, Decimal::new(744 + 2232 + 744, 2));
    assert_eq!(inv.currency, "USD");
    assert!(month_bounds("2026-13").is_none() && month_bounds("26-1").is_none());
    assert_eq!(month_of(t(0)), "2026-12");
}

/// An event of stored object `name` of kind `object`.
fn stored_ev(
    kind: EventKind,
    object: ObjectKind,
    name: &str,
    at: i64,
    stored: Option<(u64, u32)>,
) -> Event {
    let mut e = Event::new(
        kind,
        object,
        Some(ProjectName::new("web").expect("p")),
        name,
        "",
    );
    if let Some((bytes, copies)) = stored {
        e = e.stored(bytes, copies);
    }
    e.at = t(at);
    e
}

fn line(lines: &[UsageLine], meter: Meter, replicas: Option<u32>) -> Decimal {
    lines
        .iter()
        .find(|l| l.meter == meter && l.replicas == replicas)
        .map_or(Decimal::ZERO, |l| l.quantity)
}

const GIB: u64 = 1 << 30;

#[test]
fn storage_is_metered_by_size_replicas_and_time_until_deletion() {
    use EventKind::*;
    use ObjectKind::*;
    let events = vec![
        // 2 GiB on 2 replicas for 100 s, grown to 3 GiB for 50 s, then a
        // replica added: 3 GiB on 3 replicas until deleted at 200 s.
        stored_ev(Created, Volume, "data", 0, Some((2 * GIB, 2))),
        stored_ev(Resized, Volume, "data", 100, Some((3 * GIB, 2))),
        stored_ev(Resized, Volume, "data", 150, Some((3 * GIB, 3))),
        // A snapshot of it on both replicas from 120 s: ends with the volume.
        stored_ev(Created, VolumeSnapshot, "data/s1", 120, Some((GIB, 2))),
        // Another volume's snapshot of a similar name is not touched.
        stored_ev(Created, VolumeSnapshot, "data2/s1", 120, Some((GIB, 1))),
        stored_ev(Deleted, Volume, "data", 200, None),
        // A checkpoint of 1 GiB, ready at 10 s, deleted at 110 s.
        stored_ev(Ready, Snapshot, "vm/c1", 10, Some((GIB, 1))),
        stored_ev(Deleted, Snapshot, "vm/c1", 110, None),
        // An image of half a GiB, ready at 0 and kept.
        stored_ev(Ready, Image, "mine", 0, Some((GIB / 2, 1))),
        // A deletion of something never stored changes nothing.
        stored_ev(Deleted, Image, "ghost", 5, None),
    ];
    let u = usage(&events, t(0), t(1000));
    assert_eq!(
        line(&u, Meter::VolumeStorage, Some(2)),
        Decimal::from(2 * 100 + 3 * 50)
    );
    assert_eq!(
        line(&u, Meter::VolumeStorage, Some(3)),
        Decimal::from(3 * 50)
    );
    // data/s1: 2 copies x 80 s; data2/s1: 880 s; the checkpoint: 100 s.
    assert_eq!(
        line(&u, Meter::SnapshotStorage, None),
        Decimal::from(2 * 80 + 880 + 100)
    );
    assert_eq!(line(&u, Meter::ImageStorage, None), Decimal::from(500));
    // A window cuts storage at its edges.
    let part = usage(&events, t(50), t(125));
    assert_eq!(
        line(&part, Meter::VolumeStorage, Some(2)),
        Decimal::from(2 * 50 + 3 * 25)
    );
}

#[test]
fn egress_counts_the_hours_that_begin_in_the_period_and_is_billed_per_gib() {
    let h = |n: i64| t(n * 3600);
    let hours = vec![(h(0), 3 * GIB), (h(1), GIB), (h(2), GIB / 2)];
    let all = egress(&hours, h(0), h(3));
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].quantity, Decimal::from(4 * GIB + GIB / 2));
    assert_eq!(egress(&hours, h(1), h(2))[0].quantity, Decimal::from(GIB));
    assert!(egress(&hours, h(3), h(4)).is_empty());
    use skyvisor_core::usage::{hour_name, parse_hour_name};
    assert_eq!(
        parse_hour_name(&hour_name(h(2) + Duration::minutes(59))),
        Some(h(2))
    );
    assert!(parse_hour_name("2026-12-01T24").is_none());
    let sheet = PriceSheet::default_sheet();
    let inv = invoice(
        &ProjectName::new("web").expect("p"),
        "2026-12",
        &all,
        &sheet,
        false,
        h(3),
    );
    // 4.5 GiB at 0.0100.
    assert_eq!(inv.lines[0].quantity, Decimal::new(45, 1));
    assert_eq!(inv.lines[0].unit, "GiB");
    assert_eq!(inv.lines[0].amount, Decimal::new(5, 2));
}

#[test]
fn a_volume_is_priced_per_replica() {
    let sheet = PriceSheet::default_sheet();
    // 100 GiB on 3 replicas for 744 hours at 0.00014 per replica-GiB-hour.
    let events = vec![stored_ev(
        EventKind::Created,
        ObjectKind::Volume,
        "big",
        0,
        Some((100 * GIB, 3)),
    )];
    let (from, to) = month_bounds("2026-12").expect("month");
    let u = usage(&events, from, to);
    let inv = invoice(
        &ProjectName::new("web").expect("p"),
        "2026-12",
        &u,
        &sheet,
        true,
        to,
    );
    let l = &inv.lines[0];
    assert_eq!(l.quantity, Decimal::from(74_400));
    assert_eq!(l.unit_price, Decimal::new(42, 5));
    // 74,400 x 0.00042 = 31.248.
    assert_eq!(l.amount, Decimal::new(3125, 2));
    assert_eq!(l.description, "volumes with 3 replicas");
}

proptest! {
    /// Usage over a period is the sum of its parts, to the millisecond,
    /// however the period is cut: nothing is counted twice or lost at a
    /// boundary.
    #[test]
    fn usage_of_a_period_is_the_sum_of_its_parts(
        steps in proptest::collection::vec((0u8..4, 1i64..500), 1..40),
        cut in 0i64..20_000,
    ) {
        let mut events = Vec::new();
        let mut at = 0;
        for (k, dt) in steps {
            at += dt;
            let kind = [EventKind::Started, EventKind::Stopped, EventKind::Crashed, EventKind::FailedOver][k as usize];
            events.push(ev(kind, "a", at, Some("nano"), 1, 128));
        }
        let (from, to) = (t(0), t(20_000));
        let whole = usage(&events, from, to);
        let (a, b) = (usage(&events, from, t(cut)), usage(&events, t(cut), to));
        for meter in [Meter::InstanceRunning, Meter::InstanceStopped] {
            prop_assert_eq!(qty(&whole, meter, "nano"), qty(&a, meter, "nano") + qty(&b, meter, "nano"));
        }
    }
}

#[test]
fn what_usage_is_still_metered_from_is_each_live_objects_state_setting_event() {
    let nano = Some("nano");
    let events = vec![
        ev(EventKind::Created, "run", 0, nano, 1, 128),
        ev(EventKind::Started, "run", 10, nano, 1, 128),
        // Resized while running: it still runs from its start.
        ev(EventKind::Resized, "run", 20, Some("micro"), 1, 256),
        ev(EventKind::Created, "gone", 30, nano, 1, 128),
        ev(EventKind::Deleted, "gone", 40, nano, 1, 128),
        stored_ev(
            EventKind::Created,
            ObjectKind::Volume,
            "v",
            50,
            Some((GIB, 2)),
        ),
        stored_ev(
            EventKind::Created,
            ObjectKind::VolumeSnapshot,
            "v/s",
            60,
            Some((GIB, 2)),
        ),
        stored_ev(
            EventKind::Resized,
            ObjectKind::Volume,
            "v",
            70,
            Some((2 * GIB, 2)),
        ),
    ];
    let mut kept = current_states(&events);
    kept.sort_unstable();
    assert_eq!(kept, vec![1, 6, 7]);
    // What they meter from on is what the whole record meters.
    let pruned: Vec<Event> = kept.iter().map(|i| events[*i].clone()).collect();
    assert_eq!(
        usage(&pruned, t(100), t(200)),
        usage(&events, t(100), t(200))
    );
}
