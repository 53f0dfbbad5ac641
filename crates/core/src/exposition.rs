//! The two text formats metrics are served in: OpenMetrics (what
//! `prometheus-client` writes and Prometheus asks for) and Prometheus'
//! classic text format 0.0.4 (what `promtool check metrics`, older
//! scrapers and people with curl read). A scrape's `Accept` header
//! chooses.

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic text format.
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scrape's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The content type and body to answer a scrape with, by its `Accept`
/// header, from metrics encoded as OpenMetrics.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS, openmetrics)
    } else {
        (CLASSIC_TEXT, to_classic(&openmetrics))
    }
}

/// The same metrics in the classic text format: counters' `HELP` and
/// `TYPE` name the `_total` series their samples carry, and the
/// OpenMetrics-only lines (`# UNIT`, `# EOF`) go.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_series_and_openmetrics_lines_go() {
        let om = "# HELP a_requests API requests.\n# TYPE a_requests counter\n\
                  a_requests_total{m=\"GET\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n\
                  # HELP a_d Duration.\n# TYPE a_d histogram\n# UNIT a_d seconds\n\
                  a_d_sum 0.5\na_d_count 2\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_requests_total API requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{m=\"GET\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n\
             # HELP a_d Duration.\n# TYPE a_d histogram\na_d_sum 0.5\na_d_count 2\n"
        );
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
