//! The smallest HTTP/1.1 client Nacos's API needs: one request per connection
//! (`Connection: close`), a bounded response, `Content-Length`, chunked or read-to-close
//! bodies. The response parser is pure and tested; [`exchange`] does the I/O.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::RegistryError;

/// The largest response read.
const MAX_RESPONSE: usize = 8 << 20;

/// A parsed response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// The request's bytes: `method` `target`, a form `body` for POST.
pub fn request(method: &str, host: &str, target: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: mse-vpn\r\n"
    );
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

/// Parses a whole response (read until the server closed).
pub fn parse(raw: &[u8]) -> Result<Response, RegistryError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(RegistryError::Malformed("an HTTP response without headers"))?;
    let head = std::str::from_utf8(&raw[..end])
        .map_err(|_| RegistryError::Malformed("HTTP headers that are not text"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(RegistryError::Malformed("an HTTP status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or(RegistryError::Malformed(
                "an HTTP body shorter than its length",
            ))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, RegistryError> {
    let bad = || RegistryError::Malformed("a broken chunked HTTP body");
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&b[..eol]).map_err(|_| bad())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Sends one request to `addr` and reads the whole response.
pub async fn exchange(
    addr: SocketAddr,
    host: &str,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<Response, RegistryError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|source| RegistryError::Connect { addr, source })?;
    s.write_all(&request(method, host, target, body)).await?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() > MAX_RESPONSE {
        return Err(RegistryError::Malformed("an HTTP response over 8 MiB"));
    }
    parse(&raw)
}

/// `application/x-www-form-urlencoded` / query escaping of one value.
pub fn escape(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_close() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"{}".to_vec()
            }
        );
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
        let r = parse(b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab\r\n").is_err()
        );
    }

    #[test]
    fn requests_and_escapes() {
        let r = String::from_utf8(request("GET", "h:8848", "/x?a=1", None)).unwrap();
        assert!(r.starts_with("GET /x?a=1 HTTP/1.1\r\nHost: h:8848\r\nConnection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        let r = String::from_utf8(request("POST", "h", "/l", Some("u=a&p=b"))).unwrap();
        assert!(r.ends_with("Content-Length: 7\r\n\r\nu=a&p=b"));
        assert_eq!(escape("providers:a.B:1.0:"), "providers%3Aa.B%3A1.0%3A");
        assert_eq!(escape("a b&c"), "a%20b%26c");
    }
}
