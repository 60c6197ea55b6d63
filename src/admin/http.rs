//! The admin port's HTTP/1.1 without I/O: request heads (httparse), the
//! body's length, and responses. Keep-alive unless the client says close.

/// Largest request head.
pub const MAX_HEAD_BYTES: usize = 8192;
const MAX_HEADERS: usize = 32;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub content_length: usize,
    pub authorization: Option<Vec<u8>>,
    pub binary: bool,
    pub close: bool,
    /// Bytes of the head, including its blank line.
    pub head_len: usize,
}

/// Why a request could not be read; answered with the status, then closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Bad(pub u16, pub &'static str);

/// Parses a request head from `buf`. `Ok(None)`: incomplete.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Option<Request>, Bad> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(Bad(431, "request head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Bad(431, "too many headers")),
        Err(_) => return Err(Bad(400, "malformed request")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Bad(431, "request head too large"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut content_length = 0;
    let mut authorization = None;
    let mut binary = false;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let value = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(value).map_err(|_| Bad(400, "bad content-length"))?;
            content_length = text.trim().parse().map_err(|_| Bad(400, "bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // RFC 7230 3.3.3: chunked bodies are not accepted here.
            return Err(Bad(411, "send a content-length"));
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_vec());
        } else if h.name.eq_ignore_ascii_case("content-type") {
            binary = value.starts_with(b"application/octet-stream");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    if content_length > max_body {
        return Err(Bad(413, "body over the size limit"));
    }
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_length,
        authorization,
        binary,
        close,
        head_len,
    }))
}

/// The value of `name` in a query string (no percent-decoding: topic names
/// and the other values we take need none).
pub fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Percent-decodes a query value (`%20`, `+` for space).
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A whole response.
pub fn response(status: u16, content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}{}\r\n",
        reason(status),
        body.len(),
        if status == 401 {
            "WWW-Authenticate: Bearer\r\n"
        } else {
            ""
        },
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A JSON `{"error": ...}` response.
pub fn error(status: u16, message: &str, close: bool) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    response(status, "application/json", body.as_bytes(), close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let r = parse(
            b"POST /publish?topic=a HTTP/1.1\r\nContent-Length: 5\r\nAuthorization: Bearer t\r\n\r\nhello",
            100,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/publish", "topic=a")
        );
        assert_eq!((r.content_length, r.close, r.binary), (5, false, false));
        assert_eq!(r.authorization.as_deref(), Some(&b"Bearer t"[..]));
        assert_eq!(r.head_len, 78);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 0), Ok(None));
        assert!(parse(b"GET / HTTP/1.0\r\n\r\n", 0).unwrap().unwrap().close);
    }

    #[test]
    fn limits() {
        assert_eq!(
            parse(b"POST /p HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100),
            Err(Bad(413, "body over the size limit"))
        );
        assert!(parse(b"POST /p HTTP/1.1\r\nContent-Length: 100\r\n\r\n", 100).is_ok());
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes(), 0).unwrap_err().0, 431);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 0).unwrap_err().0,
            400
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 0)
                .unwrap_err()
                .0,
            411
        );
        assert_eq!(parse(b"\x01\x02 garbage\r\n\r\n", 0).unwrap_err().0, 400);
    }

    #[test]
    fn queries() {
        assert_eq!(query_value("topic=a&code=4000", "code"), Some("4000"));
        assert_eq!(query_value("topic=a", "code"), None);
        assert_eq!(percent_decode("going%20away+now").as_deref(), Some("going away now"));
        assert_eq!(percent_decode("%zz"), None);
    }
}
