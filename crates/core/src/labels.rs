//! Labels: `key=value` pairs a user puts on an instance, to find it again
//! (`GET /v1/instances?label=tier=web,canary`) and, later, to select the
//! members of groups and load balancers. Keys and values follow the shape
//! of Kubernetes' labels without prefixes.

use std::collections::BTreeMap;

use crate::ValidationError;

/// An instance's labels, in key order.
pub type Labels = BTreeMap<String, String>;

/// Most labels on one object.
pub const MAX_LABELS: usize = 32;
/// Longest key, and longest value.
pub const MAX_LABEL_LEN: usize = 63;
/// A key: lowercase letters, digits, '-', '_' and '.', beginning and ending
/// with a letter or digit (what the OpenAPI document says too).
pub const LABEL_KEY_PATTERN: &str = "^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$";
/// A value: empty, or letters, digits, '-', '_' and '.', beginning and
/// ending with a letter or digit.
pub const LABEL_VALUE_PATTERN: &str = "^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$";

fn shaped(s: &str, lower_only: bool) -> bool {
    let ok_end = |c: char| {
        c.is_ascii_digit() || c.is_ascii_lowercase() || (!lower_only && c.is_ascii_uppercase())
    };
    let ok_mid = |c: char| ok_end(c) || matches!(c, '-' | '_' | '.');
    let mut chars = s.chars();
    match (chars.next(), s.chars().last()) {
        (Some(first), Some(last)) => {
            ok_end(first) && ok_end(last) && s.chars().all(ok_mid) && s.len() <= MAX_LABEL_LEN
        }
        _ => false,
    }
}

/// Whether `key` is a valid label key.
pub fn valid_key(key: &str) -> bool {
    shaped(key, true)
}

/// Whether `value` is a valid label value.
pub fn valid_value(value: &str) -> bool {
    value.is_empty() || shaped(value, false)
}

const KEY_RULE: &str = "1 to 63 lowercase letters, digits, '-', '_' and '.', beginning and ending with a letter or digit";
const VALUE_RULE: &str = "at most 63 letters, digits, '-', '_' and '.', beginning and ending with a letter or digit (or empty)";

/// Checks a set of labels (`field` names it in the error).
pub fn validate_labels(field: &str, labels: &Labels) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("has {} labels; allowed: at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        if !valid_key(k) {
            return Err(ValidationError::new(
                field,
                format!("key {k:?} is not a label key; allowed: {KEY_RULE}"),
            ));
        }
        if !valid_value(v) {
            return Err(ValidationError::new(
                field,
                format!("value {v:?} of {k} is not a label value; allowed: {VALUE_RULE}"),
            ));
        }
    }
    Ok(())
}

/// What a list asks of labels: every term must hold (`key=value`: the
/// label has that value; `key`: the label is there).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector(Vec<(String, Option<String>)>);

impl LabelSelector {
    /// Parses `tier=web,canary` (terms separated by commas).
    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let mut terms = Vec::new();
        for term in text.split(',') {
            let (key, value) = match term.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (term, None),
            };
            if !valid_key(key) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "term {term:?}: {key:?} is not a label key; allowed: comma-separated KEY=VALUE or KEY terms, a key being {KEY_RULE}"
                    ),
                ));
            }
            if let Some(v) = value
                && !valid_value(v)
            {
                return Err(ValidationError::new(
                    field,
                    format!("term {term:?}: {v:?} is not a label value; allowed: {VALUE_RULE}"),
                ));
            }
            terms.push((key.to_owned(), value.map(str::to_owned)));
        }
        Ok(Self(terms))
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| match (labels.get(k), v) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values_have_their_shapes() {
        for k in ["tier", "app.kubernetes", "a", "x-1_y.z", "0"] {
            assert!(valid_key(k), "{k}");
        }
        for k in ["", "Tier", "-a", "a-", "a b", "a=b", "a/b", &"k".repeat(64)] {
            assert!(!valid_key(k), "{k}");
        }
        for v in ["", "Web", "v1.2", "a_b-c"] {
            assert!(valid_value(v), "{v}");
        }
        for v in ["-x", "x.", "a b", "é", &"v".repeat(64)] {
            assert!(!valid_value(v), "{v}");
        }
        let too_many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let e = validate_labels("labels", &too_many).expect_err("too many");
        assert!(e.message.contains("at most 32"), "{e}");
        let e = validate_labels("labels", &labels(&[("Bad", "x")])).expect_err("bad key");
        assert!(e.message.contains("\"Bad\""), "{e}");
    }

    #[test]
    fn selectors_hold_when_every_term_does() {
        let s = LabelSelector::parse("label", "tier=web,canary").expect("parse");
        assert!(s.matches(&labels(&[("tier", "web"), ("canary", "")])));
        assert!(s.matches(&labels(&[("tier", "web"), ("canary", "yes"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("tier", "web")])));
        assert!(!s.matches(&labels(&[("tier", "db"), ("canary", "")])));
        assert!(
            LabelSelector::parse("label", "tier=")
                .expect("empty value")
                .matches(&labels(&[("tier", "")]))
        );
        for bad in ["", "a,,b", "Tier=x", "t=-x", "=x"] {
            let e = LabelSelector::parse("label", bad).expect_err(bad);
            assert_eq!(e.field, "label");
        }
    }
}
