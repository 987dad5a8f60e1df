//! Framing of the PostgreSQL frontend/backend protocol over one byte stream.
//!
//! In: bytes from a TCP, TLS or unix-socket stream. Out: whole backend messages, parsed by
//! `postgres-protocol`, except `CopyBothResponse` (`'W'`), which that parser does not know: the
//! tag byte is peeked first and `'W'` frames are consumed here.
//!
//! Invariant kept here: no byte is lost when a future is dropped. Partial input stays in
//! `rbuf`, unsent output in `wbuf`; [`Wire::fill`] and [`Wire::flush`] are cancellation-safe.
//! See <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorFields, Header, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::{ServerFields, SourceError};

/// Largest backend message accepted (PostgreSQL caps a message at 1 GB plus headers).
const MAX_FRAME: usize = (1 << 30) + (1 << 20);

/// Bytes to make room for before each read.
const READ_CHUNK: usize = 64 * 1024;

/// The byte stream under the protocol.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One backend frame.
pub(crate) enum Frame {
    /// `CopyBothResponse` (`'W'`): the server entered COPY BOTH mode (START_REPLICATION).
    CopyBoth,
    /// Any other message, parsed by `postgres-protocol`.
    Msg(Message),
}

/// A connection's byte stream plus its read and write buffers.
pub(crate) struct Wire {
    io: Transport,
    /// Bytes received and not yet consumed as whole frames.
    rbuf: BytesMut,
    /// Bytes encoded and not yet written.
    pub(crate) wbuf: BytesMut,
}

impl Wire {
    pub(crate) fn new(io: Transport) -> Wire {
        Wire {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Writes out `wbuf` and flushes the stream.
    // This is cancellation-safe: `write_buf` writes nothing when dropped before completing, and
    // advances `wbuf` past exactly what was written, so the rest is sent by the next call.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = self.io.write_buf(&mut self.wbuf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the server stopped accepting data",
                ));
            }
        }
        self.io.flush().await
    }

    /// Reads more bytes into `rbuf`; `Ok(0)` is end of stream.
    // This is cancellation-safe: `read_buf` reads nothing when dropped before completing.
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        self.io.read_buf(&mut self.rbuf).await
    }

    /// Takes one whole frame from `rbuf`, if one is there.
    pub(crate) fn try_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let header = match Header::parse(&self.rbuf) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(e) => return Err(SourceError::protocol(format!("bad message header: {e}"))),
        };
        // Header::parse rejects lengths below 4, so this is positive.
        let total = header.len() as usize + 1;
        if total > MAX_FRAME {
            return Err(SourceError::protocol(format!(
                "message '{}' of {total} bytes exceeds the 1 GB protocol limit",
                char::from(header.tag())
            )));
        }
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        if header.tag() == b'W' {
            // CopyBothResponse: format byte and column formats, all irrelevant to replication.
            let _ = self.rbuf.split_to(total);
            return Ok(Some(Frame::CopyBoth));
        }
        match Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Frame::Msg(m))),
            Ok(None) => Err(SourceError::protocol(
                "a complete message could not be parsed",
            )),
            Err(e) => Err(SourceError::protocol(format!(
                "cannot parse message '{}': {e}",
                char::from(header.tag())
            ))),
        }
    }

    /// Waits for the next frame. `what` names the step for a lost-connection error.
    pub(crate) async fn recv(&mut self, what: &str) -> Result<Frame, SourceError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            match self.fill().await {
                Ok(0) => {
                    return Err(SourceError::ConnectionLost {
                        last_lsn: crate::lsn::Lsn::ZERO,
                        reason: format!("the server closed the connection during {what}"),
                    })
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(SourceError::ConnectionLost {
                        last_lsn: crate::lsn::Lsn::ZERO,
                        reason: format!("reading during {what}: {e}"),
                    })
                }
            }
        }
    }

    /// Flushes, mapping an I/O failure to a lost connection.
    pub(crate) async fn send(&mut self, what: &str) -> Result<(), SourceError> {
        self.flush().await.map_err(|e| SourceError::ConnectionLost {
            last_lsn: crate::lsn::Lsn::ZERO,
            reason: format!("writing during {what}: {e}"),
        })
    }

    /// Closes the write side (best effort).
    pub(crate) async fn close(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

/// Owned fields of an ErrorResponse or NoticeResponse.
pub(crate) fn server_fields(mut it: ErrorFields<'_>) -> ServerFields {
    let mut f = ServerFields::default();
    while let Ok(Some(field)) = it.next() {
        let v = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => f.code = v,
            b'M' => f.message = v,
            b'D' => f.detail = Some(v),
            b'H' => f.hint = Some(v),
            b'W' => f.where_ = Some(v),
            _ => {}
        }
    }
    f
}

/// The payload of a CopyData frame, zero-copy.
pub(crate) fn copy_data(body: postgres_protocol::message::backend::CopyDataBody) -> Bytes {
    body.into_bytes()
}
