//! Reading and writing whole [`proto`](super::proto) frames on a stream, for both sides.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, Message, ProtoError};

/// Why a frame could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("bad frame")]
    Proto(#[from] ProtoError),
}

/// Reads the next frame. Bytes past it stay in `buf` (a well-behaved peer sends none).
pub async fn recv<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Message, FrameError> {
    loop {
        if let Some((msg, used)) = proto::decode(buf)? {
            buf.drain(..used);
            return Ok(msg);
        }
        let mut chunk = [0u8; 512];
        match s.read(&mut chunk).await? {
            0 => return Err(FrameError::Closed),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes one frame and flushes it.
pub async fn send<S: AsyncWrite + Unpin>(s: &mut S, msg: &Message) -> Result<(), FrameError> {
    s.write_all(&proto::encode(msg)).await?;
    s.flush().await?;
    Ok(())
}
