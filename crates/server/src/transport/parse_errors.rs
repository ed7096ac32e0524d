//! Gives hyper's own answers to requests it cannot parse a JSON body, as every other error on the REST port has.
//!
//! hyper 1 answers a malformed request line or header (400), a URI over its limit (414) and headers over its limit
//! (431) itself, before any handler runs, with an empty body and `connection: close`, and offers no hook to change
//! that. [`JsonParseErrors`] wraps a connection's byte stream and rewrites exactly that answer as it is written:
//! a 4xx head with `connection: close` and `content-length: 0`, which no handler of Ferry's writes (every handler
//! error carries `{"error": ...}`). Anything else passes through untouched, so the cost on the normal path is a
//! prefix comparison per write.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose automatic parse-error answers get a JSON body.
pub struct JsonParseErrors<T> {
    inner: T,
    /// A rewritten answer and how much of it is written; hyper was told the original was written whole.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> JsonParseErrors<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: None,
        }
    }
}

/// The status line and headers hyper writes for a parse error, up to the date header (RFC 9110 names).
const AUTO_HEADERS: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";

/// The JSON answer for hyper's automatic response in `head`, or `None` when `head` is anything else.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let status_line = &head[..line_end];
    let code = status_line.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let message = match code {
        b"400" => {
            "the request could not be parsed as HTTP/1.1 (a malformed request line or header)"
        }
        b"414" => "the request target (URI) is longer than the server accepts",
        b"431" => "the request headers are larger than the server accepts",
        _ => return None,
    };
    // Exactly the head hyper writes: status line, `connection: close`, `content-length: 0`, then the date, and
    // nothing after the blank line.
    if !head[line_end..].starts_with(AUTO_HEADERS) || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let rest = &head[line_end + AUTO_HEADERS.len()..];
    let body = serde_json::json!({ "error": message }).to_string();
    let mut out = Vec::with_capacity(head.len() + body.len() + 64);
    out.extend_from_slice(status_line);
    out.extend_from_slice(
        b"\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ",
    );
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(rest);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

impl<T: AsyncWrite + Unpin> JsonParseErrors<T> {
    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as a rewritten answer when it is hyper's automatic one.
    fn try_rewrite(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        if !buf.starts_with(b"HTTP/1.1 4") {
            return None;
        }
        let rewritten = rewrite(buf)?;
        self.pending = Some((rewritten, 0));
        Some(match self.poll_pending(cx) {
            // The original is reported written whole; what remains goes out on the next write or flush.
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(done) = this.try_rewrite(cx, buf) {
            return done;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        // hyper queues a head in a slice of its own, and its automatic answer has no body: only a lone slice that
        // starts as a 4xx head is looked at (no allocation, one prefix comparison on the normal path).
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        if let Some(first) = nonempty.next() {
            if first.starts_with(b"HTTP/1.1 4") && nonempty.next().is_none() {
                if let Some(done) = this.try_rewrite(cx, first) {
                    return done;
                }
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const HYPER_431: &[u8] =
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
content-length: 0\r\ndate: Thu, 03 Dec 2026 17:59:12 GMT\r\n\r\n";

    #[test]
    fn hypers_automatic_answers_get_a_json_body() {
        let out = String::from_utf8(rewrite(HYPER_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.contains("\r\ndate: Thu, 03 Dec 2026 17:59:12 GMT"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("headers"));
    }

    #[test]
    fn other_answers_pass_untouched() {
        // A handler's 400 has its own body and keeps the connection; a 404 is never hyper's.
        for head in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
        ] {
            assert_eq!(rewrite(head), None, "{}", String::from_utf8_lossy(head));
        }
    }

    #[tokio::test]
    async fn a_rewritten_answer_is_written_whole_through_short_writes() {
        // A duplex pipe with a 7-byte buffer forces many partial writes.
        let (client, mut server) = tokio::io::duplex(7);
        let mut conn = JsonParseErrors::new(client);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut server, &mut got)
                .await
                .unwrap();
            got
        });
        conn.write_all(HYPER_431).await.unwrap();
        conn.shutdown().await.unwrap();
        drop(conn);
        let got = reader.await.unwrap();
        assert_eq!(got, rewrite(HYPER_431).unwrap());
    }
}
