//! Raw clients: Unix frames and SSE over a plain TCP socket, so the
//! harness decides exactly when it reads, stalls or hangs up, and records
//! every complete frame or event the moment its bytes are read (a client
//! that hangs up has then seen all it consumed).

use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

/// Writes one length-prefixed JSON frame.
pub async fn write_frame(s: &mut (impl AsyncWriteExt + Unpin), v: &Value) -> io::Result<()> {
    let bytes = serde_json::to_vec(v).unwrap();
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    s.write_all(&out).await
}

/// A Unix connection with its own read buffer.
pub struct Frames {
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Frames {
    pub async fn connect(path: &Path) -> io::Result<Self> {
        Ok(Frames {
            s: UnixStream::connect(path).await?,
            buf: Vec::new(),
        })
    }

    pub async fn send(&mut self, v: &Value) -> io::Result<()> {
        write_frame(&mut self.s, v).await
    }

    /// One read; every frame it completed (maybe none). EOF is an error.
    pub async fn read(&mut self) -> io::Result<Vec<Value>> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len = u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap()) as usize;
            if self.buf.len() - at - 4 < len {
                break;
            }
            let v: Value = serde_json::from_slice(&self.buf[at + 4..at + 4 + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            frames.push(v);
            at += 4 + len;
        }
        self.buf.drain(..at);
        Ok(frames)
    }

    /// Reads until a frame satisfies `done` (other frames go to `other`).
    pub async fn until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> io::Result<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frames = tokio::time::timeout_at(deadline, self.read())
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            if let Some(f) = frames.into_iter().find(|f| done(f)) {
                return Ok(f);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// An SSE response read from a raw socket (HTTP/1.1, chunked or not).
pub struct Sse {
    s: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    /// Bytes left in the current chunk (`Some(0)`: its CRLF); `None`:
    /// the next size line.
    chunk: Option<usize>,
}

impl Sse {
    /// `GET path` on `addr` (`127.0.0.1:PORT`), optionally with
    /// `Last-Event-ID` and a small receive buffer (a slow client).
    pub async fn connect(
        addr: &str,
        path: &str,
        last_event_id: Option<u64>,
        rcvbuf: Option<u32>,
    ) -> io::Result<Self> {
        let sock = TcpSocket::new_v4()?;
        if let Some(size) = rcvbuf {
            sock.set_recv_buffer_size(size)?;
        }
        let mut s = sock
            .connect(addr.parse().map_err(|_| io::ErrorKind::InvalidInput)?)
            .await?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        );
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(p) = find(&raw, b"\r\n\r\n") {
                break p;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(io::Error::other(format!(
                "status: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        let chunked = head.contains("transfer-encoding: chunked");
        raw.drain(..head_end + 4);
        let mut sse = Sse {
            s,
            raw,
            body: Vec::new(),
            chunked,
            chunk: None,
        };
        sse.decode();
        Ok(sse)
    }

    /// One read; every event it completed. `Ok(None)` at the end.
    pub async fn next(&mut self) -> io::Result<Option<Vec<SseEvent>>> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        self.raw.extend_from_slice(&chunk[..n]);
        self.decode();
        Ok(Some(self.events()))
    }

    /// Everything already in the kernel's receive buffer, without waiting
    /// (what a client hanging up has consumed).
    pub fn drain_now(&mut self) -> Vec<SseEvent> {
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(n) = self.s.try_read(&mut chunk) {
            if n == 0 {
                break;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
        self.decode();
        self.events()
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        loop {
            match self.chunk {
                None => {
                    let Some(p) = find(&self.raw, b"\r\n") else {
                        return;
                    };
                    let line = String::from_utf8_lossy(&self.raw[..p]).into_owned();
                    let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                        .unwrap_or(0);
                    self.raw.drain(..p + 2);
                    if size == 0 {
                        // The end of the body: nothing more will count.
                        self.raw.clear();
                        return;
                    }
                    self.chunk = Some(size);
                }
                Some(0) => {
                    if self.raw.len() < 2 {
                        return;
                    }
                    self.raw.drain(..2);
                    self.chunk = None;
                }
                Some(left) => {
                    let take = left.min(self.raw.len());
                    if take == 0 {
                        return;
                    }
                    self.body.extend_from_slice(&self.raw[..take]);
                    self.raw.drain(..take);
                    self.chunk = Some(left - take);
                }
            }
        }
    }

    fn events(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(p) = find(&self.body[at..], b"\n\n") {
            let text = String::from_utf8_lossy(&self.body[at..at + p]).into_owned();
            at += p + 2;
            let mut ev = SseEvent::default();
            let mut data = Vec::new();
            for line in text.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => ev.id = Some(value.to_owned()),
                    "event" => ev.event = Some(value.to_owned()),
                    "data" => data.push(value.to_owned()),
                    _ => {}
                }
            }
            if data.is_empty() && ev.event.is_none() {
                continue; // a comment (keep-alive)
            }
            ev.data = data.join("\n");
            out.push(ev);
        }
        self.body.drain(..at);
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
