//! Pagination of lists: at most `limit` items in name order, and when more
//! remain, the `x-skyvisor-continue` header with the token that asks for
//! the next page (like Kubernetes' `continue`). The body stays a plain
//! array, so a client that never pages sees no change.

use axum::http::{HeaderMap, HeaderValue};

use crate::error::{ApiError, ApiResult};

/// The header that carries the next page's token.
pub const CONTINUE_HEADER: &str = "x-skyvisor-continue";

/// Largest page.
pub const MAX_LIMIT: usize = 1000;

/// One page of `items` (any order; sorted here by `key`) after the
/// `continue` token, and the headers to answer with.
pub fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> &str,
    limit: Option<usize>,
    after: Option<&str>,
) -> ApiResult<(Vec<T>, HeaderMap)> {
    let limit = match limit {
        None => usize::MAX,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(n) => {
            let mut e = ApiError::invalid(format!(
                "limit {n} is out of range; allowed: 1 to {MAX_LIMIT}"
            ));
            e.field = Some("limit".into());
            return Err(e);
        }
    };
    items.sort_by(|a, b| key(a).cmp(key(b)));
    if let Some(after) = after {
        // The token is the last name of the previous page: names are
        // unique and the order total, so nothing is skipped or repeated
        // even when objects come and go between pages.
        items.retain(|i| key(i) > after);
    }
    let mut headers = HeaderMap::new();
    if items.len() > limit {
        items.truncate(limit);
        if let Some(last) = items.last()
            && let Ok(v) = HeaderValue::from_str(key(last))
        {
            headers.insert(CONTINUE_HEADER, v);
        }
    }
    Ok((items, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once_in_order() {
        let all: Vec<String> = (0..25).map(|i| format!("vm-{i:02}")).collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (items, headers) =
                page(all.clone(), |s| s.as_str(), Some(10), after.as_deref()).expect("page");
            seen.extend(items);
            match headers.get(CONTINUE_HEADER) {
                Some(v) => after = Some(v.to_str().expect("text").to_string()),
                None => break,
            }
        }
        assert_eq!(seen, all);
        assert!(page(all.clone(), |s| s.as_str(), Some(0), None).is_err());
        assert!(page(all, |s| s.as_str(), Some(MAX_LIMIT + 1), None).is_err());
    }
}
