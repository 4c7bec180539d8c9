//! The record layer of an authenticated session (design.md §6): every frame after the handshake
//! travels as one record, sealed with the session's key for its direction. Pure: bytes in,
//! values out; no I/O.
//!
//! ```text
//!   +---------+---------------------------------------+--------+
//!   | len u32 | body: one encoded frame (wire.rs)     | tag 16 |
//!   +---------+---------------------------------------+--------+
//!   encryption on:  body = AES-256-GCM(key, nonce, ad = len, frame)
//!   encryption off: body = frame in clear, tag = AES-256-GCM(key, nonce, ad = len ‖ frame, "")
//! ```
//!
//! This is Noise's CipherState (noiseprotocol.org §5.1) applied to whole frames: the AEAD is
//! ring's AES-256-GCM, the nonce is a 64-bit counter per direction (4 zero bytes and the
//! counter big-endian, Noise's AESGCM nonce), the two keys come from the Noise handshake's
//! Split() (`handshake.rs`). Both sides count records, so a record replayed, dropped,
//! duplicated, reordered or moved from another session (other keys) fails its tag, and the
//! session ends before anything in it is used. Whole frames instead of 64 KiB Noise transport
//! messages: one AEAD call per frame, no chunking of a 32 MiB write. With encryption off the
//! same AEAD authenticates the whole record as associated data over an empty plaintext (that is
//! GMAC): every frame is still authenticated and numbered, only the cipher is gone.
//!
//! Every [`REKEY_EVERY`] records a direction's key is replaced by Noise's REKEY (the first 32
//! bytes of the encryption of 32 zero bytes under nonce 2^64-1), so one key never covers more
//! than 2^45 bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::wire::{self, Frame, WireError};

/// The length prefix.
pub const LEN_LEN: usize = 4;
/// The AEAD tag after the body.
pub const TAG_LEN: usize = 16;
/// Longest body: a frame with the largest data payload.
pub const MAX_BODY: usize = wire::HEADER_LEN + wire::MAX_DATA + wire::TRAILER_LEN;
/// Records sealed under one key before it is replaced.
pub const REKEY_EVERY: u64 = 1 << 20;

/// Whether bodies are encrypted (`[cluster] encryption`); authenticated either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Encrypt,
    AuthOnly,
}

/// A record that cannot be used: the session ends, nothing in it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {len} bytes, more than the {max} allowed here")]
    TooLong { len: usize, max: usize },
    #[error("record failed authentication (tampered, replayed, dropped, duplicated or reordered)")]
    Auth,
    #[error("record does not hold exactly one frame")]
    Framing,
    #[error("bad frame in an authenticated record: {0}")]
    Wire(#[from] WireError),
    #[error("record counter exhausted")]
    Exhausted,
}

/// One direction's key and record counter.
struct Direction {
    key: LessSafeKey,
    n: u64,
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // AES-256 takes exactly 32 bytes, which the type guarantees.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key is 32 bytes"))
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

impl Direction {
    fn new(k: &[u8; 32]) -> Direction {
        Direction { key: key(k), n: 0 }
    }

    /// The nonce of the next record; replaces the key every [`REKEY_EVERY`] records.
    fn next(&mut self) -> Result<Nonce, RecordError> {
        if self.n == u64::MAX - 1 {
            return Err(RecordError::Exhausted);
        }
        if self.n > 0 && self.n % REKEY_EVERY == 0 {
            self.rekey();
        }
        let n = nonce(self.n);
        self.n += 1;
        Ok(n)
    }

    /// Noise's REKEY(k): ENCRYPT(k, 2^64-1, "", zeros[32])[..32].
    fn rekey(&mut self) {
        let mut k = [0u8; 32];
        // Sealing into a 32-byte buffer cannot fail (ring fails only past GCM's length limit).
        let _tag = self.key.seal_in_place_separate_tag(nonce(u64::MAX), Aad::empty(), &mut k);
        self.key = key(&k);
    }
}

/// The sending half of a session's record layer.
pub struct Sealer {
    dir: Direction,
    protection: Protection,
}

/// The receiving half.
pub struct Opener {
    dir: Direction,
    protection: Protection,
}

/// Both halves, as the handshake hands them to the session.
pub struct Channel {
    pub tx: Sealer,
    pub rx: Opener,
}

impl Channel {
    /// `send`/`recv` are the 32-byte keys of this side's two directions.
    pub fn new(send: &[u8; 32], recv: &[u8; 32], protection: Protection) -> Channel {
        Channel {
            tx: Sealer { dir: Direction::new(send), protection },
            rx: Opener { dir: Direction::new(recv), protection },
        }
    }
}

impl Sealer {
    /// The record of `frame`. Data payloads are copied once, into the record.
    pub fn seal(&mut self, frame: &Frame) -> Result<Bytes, RecordError> {
        let hint = frame.msg.data().map_or(256, |d| d.len() + wire::HEADER_LEN + 8);
        let mut rec = BytesMut::with_capacity(LEN_LEN + hint + TAG_LEN);
        rec.put_u32(0);
        if let Some((data, crc)) = wire::encode_into(frame, &mut rec) {
            rec.put_slice(&data);
            rec.put_slice(&crc);
        }
        let len = rec.len() - LEN_LEN;
        rec[..LEN_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        let nonce = self.dir.next()?;
        let key = &self.dir.key;
        let tag = match self.protection {
            Protection::Encrypt => {
                let (head, body) = rec.split_at_mut(LEN_LEN);
                key.seal_in_place_separate_tag(nonce, Aad::from(&*head), body)
            }
            Protection::AuthOnly => {
                key.seal_in_place_separate_tag(nonce, Aad::from(&rec[..]), &mut [])
            }
        };
        rec.put_slice(tag.map_err(|_| RecordError::Auth)?.as_ref());
        Ok(rec.freeze())
    }
}

impl Opener {
    /// Takes one record from the front of `buf` and returns its frame; `Ok(None)`: incomplete
    /// (`buf` then has the capacity the record needs). A body longer than `max` is refused
    /// before anything is reserved for it.
    pub fn open(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, RecordError> {
        if buf.len() < LEN_LEN {
            buf.reserve(LEN_LEN + wire::HEADER_LEN + TAG_LEN);
            return Ok(None);
        }
        let len = crate::be::u32_at(buf, 0) as usize;
        if len > max.min(MAX_BODY) {
            return Err(RecordError::TooLong { len, max: max.min(MAX_BODY) });
        }
        let total = LEN_LEN + len + TAG_LEN;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut rec = buf.split_to(total);
        let nonce = self.dir.next()?;
        let key = &self.dir.key;
        let opened = match self.protection {
            Protection::Encrypt => {
                let (head, body) = rec.split_at_mut(LEN_LEN);
                key.open_in_place(nonce, Aad::from(&*head), body).map(|_| ())
            }
            Protection::AuthOnly => {
                let (msg, tag) = rec.split_at_mut(LEN_LEN + len);
                key.open_in_place(nonce, Aad::from(&*msg), tag).map(|_| ())
            }
        };
        opened.map_err(|_| RecordError::Auth)?;
        rec.advance(LEN_LEN);
        rec.truncate(len);
        let frame = wire::decode_buf(&mut rec)?.ok_or(RecordError::Framing)?;
        if !rec.is_empty() {
            return Err(RecordError::Framing);
        }
        Ok(Some(frame))
    }
}

/// Length of the whole record at the front of `b` (prefix, body, tag), once its prefix is
/// there. For relays in tests that cut a stream into records without the keys.
pub fn record_len(b: &[u8]) -> Option<usize> {
    (b.len() >= LEN_LEN).then(|| LEN_LEN + crate::be::u32_at(b, 0) as usize + TAG_LEN)
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
