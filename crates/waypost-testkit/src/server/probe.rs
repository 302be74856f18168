//! Tiny network probes: a ZooKeeper four-letter-word exchange and a minimal HTTP/1.0
//! request, both over a plain `TcpStream`, both bounded by a timeout.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of a reply the probes read.
const MAX_REPLY: u64 = 1 << 20;

/// How long one readiness probe may take in all.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Sends a ZooKeeper four-letter word (`ruok`, `srvr`, ...) and returns the whole reply.
pub(crate) async fn four_letter(addr: &str, word: &str, timeout: Duration) -> io::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(word.as_bytes()).await?;
        let mut reply = Vec::new();
        (&mut stream)
            .take(MAX_REPLY)
            .read_to_end(&mut reply)
            .await?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| timed_out(word))?
}

/// A parsed HTTP response.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// One HTTP/1.0 request (the server closes the connection after answering, so the
/// response is simply read to the end).
pub(crate) async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method != "GET" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream).take(MAX_REPLY).read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| timed_out(&format!("{method} {path}")))?
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status_line = head.lines().next().ok_or_else(bad)?;
    let mut parts = status_line.split_whitespace();
    let version = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/") {
        return Err(bad());
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() {
        let r =
            parse_response(b"HTTP/1.0 200 OK\r\nContent-Type: x\r\n\r\n\"127.0.0.1:1\"").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "\"127.0.0.1:1\"");
        assert!(parse_response(b"garbage").is_err());
    }
}
