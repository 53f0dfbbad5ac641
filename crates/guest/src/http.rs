//! A tiny HTTP/1.1 request reader and response writer (one request per connection,
//! `Connection: close`).
//!
//! It must never panic or allocate without bound on hostile input: the head and the
//! body are both size-capped, and every malformed request maps to a 4xx/5xx error.

use std::io::{self, BufRead, Read, Write};

/// Largest accepted request head (request line plus headers).
pub const MAX_HEAD_BYTES: u64 = 16 * 1024;
/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The request line and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string, e.g. `/files/a`.
    pub path: String,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the client asked for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// A complete request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Request line and headers.
    pub head: Head,
    /// The body (empty when there was none).
    pub body: Vec<u8>,
}

impl Request {
    /// Convenience constructor for tests.
    #[cfg(test)]
    pub fn new(method: &str, target: &str, body: &[u8]) -> Self {
        let (path, query) = split_target(target);
        Request {
            head: Head {
                method: method.to_string(),
                path,
                query,
                headers: Vec::new(),
            },
            body: body.to_vec(),
        }
    }

    /// First query parameter named `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.head
            .query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The peer closed the connection before sending anything.
    Closed,
    /// Malformed request; the reason is sent to the client.
    BadRequest(String),
    /// The head exceeded [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// The body exceeded the limit.
    BodyTooLarge(usize),
    /// A feature we do not implement (e.g. chunked bodies).
    NotImplemented(String),
    /// Socket error or timeout (nothing useful can be sent back).
    Io,
}

impl HttpError {
    /// The response to send for this error, if the connection is still usable.
    pub fn response(&self) -> Option<Response> {
        match self {
            HttpError::Closed | HttpError::Io => None,
            HttpError::BadRequest(why) => Some(Response::text(400, &format!("bad request: {why}"))),
            HttpError::HeadTooLarge => Some(Response::text(431, "request head too large")),
            HttpError::BodyTooLarge(limit) => Some(Response::text(
                413,
                &format!("request body larger than {limit} bytes"),
            )),
            HttpError::NotImplemented(why) => Some(Response::text(501, why)),
        }
    }
}

/// Reads one line (without CR LF) of the head, charging it against `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut u64) -> Result<Option<String>, HttpError> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*budget)
        .read_until(b'\n', &mut buf)
        .map_err(|_| HttpError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    *budget = budget.saturating_sub(n as u64);
    if buf.last() != Some(&b'\n') {
        // Either the budget ran out or the peer closed mid-line.
        return if *budget == 0 {
            Err(HttpError::HeadTooLarge)
        } else {
            Err(HttpError::BadRequest("truncated request head".to_string()))
        };
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| HttpError::BadRequest("request head is not UTF-8".to_string()))
}

/// Reads the request line and headers.
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Head, HttpError> {
    let mut budget = MAX_HEAD_BYTES;
    let line = match read_line(r, &mut budget)? {
        None => return Err(HttpError::Closed),
        Some(l) => l,
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest(format!(
            "malformed request line {line:?}"
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::BadRequest(format!("invalid method {method:?}")));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadRequest(format!(
            "unsupported version {version:?}"
        )));
    }
    if !target.starts_with('/') {
        return Err(HttpError::BadRequest(format!(
            "request target must be a path: {target:?}"
        )));
    }
    let (path, query) = split_target(target);
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?
            .ok_or_else(|| HttpError::BadRequest("connection closed inside head".to_string()))?;
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::BadRequest(
                "folded header lines are not allowed".to_string(),
            ));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::BadRequest(format!("malformed header {line:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        path,
        query,
        headers,
    })
}

/// Reads the body announced by `head` (Content-Length only), at most `max` bytes.
pub fn read_body<R: Read>(r: &mut R, head: &Head, max: usize) -> Result<Vec<u8>, HttpError> {
    if let Some(te) = head.header("transfer-encoding")
        && !te.eq_ignore_ascii_case("identity")
    {
        return Err(HttpError::NotImplemented(format!(
            "transfer-encoding {te:?} is not supported; send Content-Length"
        )));
    }
    let mut length: Option<usize> = None;
    for (k, v) in &head.headers {
        if k != "content-length" {
            continue;
        }
        let n: usize = v
            .parse()
            .map_err(|_| HttpError::BadRequest(format!("invalid Content-Length {v:?}")))?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::BadRequest(
                "conflicting Content-Length headers".to_string(),
            ));
        }
        length = Some(n);
    }
    let n = length.unwrap_or(0);
    if n > max {
        return Err(HttpError::BodyTooLarge(max));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HttpError::BadRequest("body shorter than Content-Length".to_string())
        } else {
            HttpError::Io
        }
    })?;
    Ok(body)
}

/// Splits `/path?a=b` into the path and its decoded query parameters.
pub fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_string(), params)
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes are kept literally.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    out.push(v);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content-Type header value.
    pub content_type: &'static str,
    /// Extra headers (e.g. `Allow`).
    pub headers: Vec<(String, String)>,
    /// Body bytes (omitted on the wire for HEAD).
    pub body: Vec<u8>,
}

impl Response {
    /// A `text/plain` response; a newline is appended.
    pub fn text(status: u16, text: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: format!("{text}\n").into_bytes(),
        }
    }

    /// An `application/json` response.
    pub fn json(status: u16, json: String) -> Self {
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: json.into_bytes(),
        }
    }

    /// A response with arbitrary bytes.
    pub fn bytes(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    /// The body as text (for tests).
    #[cfg(test)]
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Writes the response; `head_only` omits the body (HEAD requests).
    pub fn write_to<W: Write>(&self, w: &mut W, head_only: bool) -> io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        w.write_all(out.as_bytes())?;
        if !head_only {
            w.write_all(&self.body)?;
        }
        w.flush()
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        let mut c = Cursor::new(raw.to_vec());
        let head = read_head(&mut c)?;
        let body = read_body(&mut c, &head, 1024)?;
        Ok(Request { head, body })
    }

    #[test]
    fn parses_request_with_query_headers_and_body() {
        let req = parse(
            b"POST /memtest/start?mib=16&rate_mib_s=2.5&x=a%20b+c HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nX-Y:  z \r\n\r\nhelloEXTRA",
        )
        .expect("valid");
        assert_eq!(req.head.method, "POST");
        assert_eq!(req.head.path, "/memtest/start");
        assert_eq!(req.query("mib"), Some("16"));
        assert_eq!(req.query("rate_mib_s"), Some("2.5"));
        assert_eq!(req.query("x"), Some("a b c"));
        assert_eq!(req.head.header("x-y"), Some("z"));
        assert_eq!(req.body, b"hello");
    }

    #[test]
    fn accepts_bare_lf_and_no_body() {
        let req = parse(b"GET /health HTTP/1.0\n\n").expect("valid");
        assert_eq!(req.head.path, "/health");
        assert!(req.body.is_empty());
    }

    #[test]
    fn maps_malformed_requests_to_client_errors() {
        let cases: &[(&[u8], u16)] = &[
            (b"GARBAGE\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET / SPDY/3\r\n\r\n", 400),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n folded\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nHost: x", 400),
        ];
        for (raw, status) in cases {
            let err = parse(raw).expect_err("must fail");
            let resp = err.response().expect("has a response");
            assert_eq!(
                resp.status,
                *status,
                "{:?}: {}",
                String::from_utf8_lossy(raw),
                resp.body_text()
            );
        }
    }

    #[test]
    fn oversized_head_is_rejected() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 20_000));
        raw.extend_from_slice(b"\r\n\r\n");
        let err = parse(&raw).expect_err("too big");
        assert!(matches!(err, HttpError::HeadTooLarge));
    }

    #[test]
    fn empty_connection_is_closed_not_an_error_response() {
        let err = parse(b"").expect_err("nothing to read");
        assert!(matches!(err, HttpError::Closed));
        assert!(err.response().is_none());
    }

    #[test]
    fn writes_status_headers_and_omits_body_for_head() {
        let mut r = Response::text(405, "method not allowed");
        r.headers.push(("Allow".into(), "GET, HEAD".into()));
        let mut out = Vec::new();
        r.write_to(&mut out, false).expect("write");
        let s = String::from_utf8(out).expect("utf8");
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(s.contains("Allow: GET, HEAD\r\n"));
        assert!(s.contains("Content-Length: 19\r\n"));
        assert!(s.ends_with("\r\n\r\nmethod not allowed\n"));
        let mut out = Vec::new();
        r.write_to(&mut out, true).expect("write");
        assert!(String::from_utf8(out).expect("utf8").ends_with("\r\n\r\n"));
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("%41%zz%4"), "A%zz%4");
    }
}
