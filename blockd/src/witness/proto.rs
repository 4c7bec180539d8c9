//! The witness protocol: one request per TCP connection, four frames. Pure: bytes in, values
//! out; no I/O, no tokio.
//!
//! ```text
//!   node                                            witness
//!    │── HELLO { node, nonce_n } ────────────────────►│
//!    │◄──────────────────────── CHALLENGE { nonce_w } ─│
//!    │── REQUEST2 { degraded, proof } ────────────────►│  verify; ask the lease table;
//!    │                                                 │  persist a new epoch (fsync)
//!    │◄── GRANT | REFUSED { ..., proof = mac(H(nonce_n, answer), W→node) } ─│
//!    │    (or DENIED { reason }: bad proof, wrong version, witness failure)
//! ```
//!
//! Authentication reuses the replication link's HMAC (`replication/auth.rs`) with the witness
//! named [`WITNESS_ID`], which contains a `/` and so can never be a node's name: no MAC of the
//! replication handshake is valid here, nor the other way round. The witness's proof covers the
//! answer itself (through [`answer_nonce`]), not just the connection, so a forged or replayed
//! GRANT cannot pass: a fake witness would hand out leases to both nodes.
//!
//! **Degraded flag (REQUEST2, GRANT2, REFUSED2).** A node says in its request whether it is a
//! Primary that completes writes without its peer (`degraded`; its proof is a MAC over
//! [`request_nonce`], so the flag cannot be flipped in flight). The witness remembers it for the
//! holder's last grant and tells the other node in its answer: a refusal says whether the
//! holder's last grant was degraded, a grant of a new epoch whether the previous holder's was.
//! This is what lets a survivor promote safely the moment a dead primary's lease ran out: a
//! primary acknowledges writes without its peer only under a lease it asked for as degraded
//! (blockd `fence.rs`), so a holder whose last grant was not degraded acknowledged nothing the
//! survivor lacks. These three kinds were added to version 1 compatibly: a witness answers a
//! REQUEST (old nodes) with GRANT/REFUSED and a REQUEST2 with GRANT2/REFUSED2; an old witness
//! denies REQUEST2 as an unknown kind, so upgrade the witness first.
//!
//! Frame: `len: u32` (bytes after it, at most [`MAX_FRAME`]) · magic `BDWT` · version `u8` ·
//! kind `u8` · body. Integers big-endian; names are `u8` length + UTF-8; durations are whole
//! milliseconds, truncated, which only ever makes a node believe its lease is shorter.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// Version of this protocol; a peer speaking another is refused with DENIED.
pub const VERSION: u8 = 1;

/// The witness's name in the HMAC of `replication/auth.rs`.
pub const WITNESS_ID: &str = "blockd/witness";

/// No frame of this protocol is longer: the longest is an answer with a 255-byte name, or a
/// DENIED reason, which is cut to fit.
pub const MAX_FRAME: usize = 1024;

const MAGIC: &[u8; 4] = b"BDWT";
/// Domain separation of the digest the witness signs its answer with.
const ANSWER_CONTEXT: &[u8] = b"blockd-witness-answer-v1";

const HELLO: u8 = 1;
const CHALLENGE: u8 = 2;
const REQUEST: u8 = 3;
const GRANT: u8 = 4;
const REFUSED: u8 = 5;
const DENIED: u8 = 6;
const REQUEST2: u8 = 7;
const GRANT2: u8 = 8;
const REFUSED2: u8 = 9;

/// Domain separation of the digest a REQUEST2's proof is computed over.
const REQUEST_CONTEXT: &[u8] = b"blockd-witness-request-v2";

/// The lease part of an answer, without its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `holder` (the asker) holds `epoch`; the witness gives it to nobody else for `expires_in`
    /// from its answer. `term` is the witness's configured term (equal to `expires_in` today).
    /// `prev_degraded`: the previous holder's last grant was asked degraded (`Some(false)` for a
    /// renewal or a first grant; None in the old GRANT, or when the witness does not know).
    Grant {
        holder: String,
        epoch: u64,
        term: Duration,
        expires_in: Duration,
        prev_degraded: Option<bool>,
    },
    /// `holder` (if any) holds `epoch`; ask again after `retry_after`. `degraded`: the holder's
    /// last grant was asked degraded (None in the old REFUSED, or when the witness does not know).
    Refused { holder: Option<String>, epoch: u64, retry_after: Duration, degraded: Option<bool> },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        node: String,
        nonce: [u8; 32],
    },
    Challenge {
        nonce: [u8; 32],
    },
    /// `degraded` None: the old REQUEST, without the flag.
    Request {
        proof: [u8; 32],
        degraded: Option<bool>,
    },
    Answer {
        reply: Reply,
        proof: [u8; 32],
    },
    Denied {
        reason: String,
    },
}

/// A frame that cannot be decoded; the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes, more than {MAX_FRAME}")]
    TooLong(usize),
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    #[error("protocol version {0}, this side speaks {VERSION}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
    #[error("name is not UTF-8")]
    Utf8,
    #[error("{0}: flag byte {1}, not 0 or 1")]
    Flag(&'static str, u8),
}

/// The 32 bytes the witness's proof of an answer is computed over: the node's nonce and the
/// answer, hashed, in place of the nonce of `auth::mac`.
pub fn answer_nonce(node_nonce: &[u8; 32], reply: &Reply) -> [u8; 32] {
    let mut body = Vec::new();
    encode_reply(&mut body, reply);
    let mut h = Sha256::new();
    h.update(ANSWER_CONTEXT);
    h.update(node_nonce);
    h.update(&body);
    h.finalize().into()
}

/// The 32 bytes a REQUEST2's proof is computed over, in place of the witness's nonce: the
/// challenge and the degraded flag, hashed.
pub fn request_nonce(challenge: &[u8; 32], degraded: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(REQUEST_CONTEXT);
    h.update(challenge);
    h.update([u8::from(degraded)]);
    h.finalize().into()
}

/// The frame's bytes, length prefix included.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    match msg {
        Message::Hello { node, nonce } => {
            out.push(HELLO);
            out.extend_from_slice(nonce);
            put_name(&mut out, node);
        }
        Message::Challenge { nonce } => {
            out.push(CHALLENGE);
            out.extend_from_slice(nonce);
        }
        Message::Request { proof, degraded: None } => {
            out.push(REQUEST);
            out.extend_from_slice(proof);
        }
        Message::Request { proof, degraded: Some(d) } => {
            out.push(REQUEST2);
            out.push(u8::from(*d));
            out.extend_from_slice(proof);
        }
        Message::Answer { reply, proof } => {
            out.push(reply_kind(reply));
            encode_reply(&mut out, reply);
            out.extend_from_slice(proof);
        }
        Message::Denied { reason } => {
            out.push(DENIED);
            put_name(&mut out, reason);
        }
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn reply_kind(reply: &Reply) -> u8 {
    match reply {
        Reply::Grant { prev_degraded: None, .. } => GRANT,
        Reply::Grant { .. } => GRANT2,
        Reply::Refused { degraded: None, .. } => REFUSED,
        Reply::Refused { .. } => REFUSED2,
    }
}

fn encode_reply(out: &mut Vec<u8>, reply: &Reply) {
    out.push(reply_kind(reply));
    let flag = match reply {
        Reply::Grant { holder, epoch, term, expires_in, prev_degraded } => {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&millis(*term).to_be_bytes());
            out.extend_from_slice(&millis(*expires_in).to_be_bytes());
            put_name(out, holder);
            prev_degraded
        }
        Reply::Refused { holder, epoch, retry_after, degraded } => {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&millis(*retry_after).to_be_bytes());
            put_name(out, holder.as_deref().unwrap_or(""));
            degraded
        }
    };
    if let Some(d) = flag {
        out.push(u8::from(*d));
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Names and reasons longer than 255 bytes are cut (at a character boundary).
fn put_name(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// message and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    let Some(len) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLong(len));
    }
    let Some(frame) = buf.get(4..4 + len) else { return Ok(None) };
    let mut r = Reader(frame);
    let magic = r.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(ProtoError::Version(version));
    }
    let msg = match r.u8("kind")? {
        HELLO => Message::Hello { nonce: r.array("HELLO")?, node: r.name()? },
        CHALLENGE => Message::Challenge { nonce: r.array("CHALLENGE")? },
        REQUEST => Message::Request { proof: r.array("REQUEST")?, degraded: None },
        REQUEST2 => {
            let degraded = Some(r.flag("REQUEST2")?);
            Message::Request { degraded, proof: r.array("REQUEST2")? }
        }
        kind @ (GRANT | REFUSED | GRANT2 | REFUSED2) => {
            let reply = decode_reply(&mut r, kind)?;
            Message::Answer { reply, proof: r.array("proof")? }
        }
        DENIED => Message::Denied { reason: r.name()? },
        k => return Err(ProtoError::Kind(k)),
    };
    match r.0.len() {
        0 => Ok(Some((msg, 4 + len))),
        n => Err(ProtoError::Trailing(n)),
    }
}

fn decode_reply(r: &mut Reader<'_>, kind: u8) -> Result<Reply, ProtoError> {
    if r.u8("reply kind")? != kind {
        return Err(ProtoError::Kind(kind));
    }
    let epoch = r.u64("epoch")?;
    let flagged = matches!(kind, GRANT2 | REFUSED2);
    if matches!(kind, GRANT | GRANT2) {
        let term = Duration::from_millis(r.u64("term")?);
        let expires_in = Duration::from_millis(r.u64("expires-in")?);
        let holder = r.name()?;
        let prev_degraded = if flagged { Some(r.flag("GRANT2")?) } else { None };
        Ok(Reply::Grant { epoch, term, expires_in, holder, prev_degraded })
    } else {
        let retry_after = Duration::from_millis(r.u64("retry-after")?);
        let holder = Some(r.name()?).filter(|h| !h.is_empty());
        let degraded = if flagged { Some(r.flag("REFUSED2")?) } else { None };
        Ok(Reply::Refused { holder, epoch, retry_after, degraded })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }

    /// A boolean byte: 0 or 1, anything else is a bad frame.
    fn flag(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ProtoError::Flag(what, b)),
        }
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn name(&mut self) -> Result<String, ProtoError> {
        let n = self.u8("name length")? as usize;
        let bytes = self.take(n, "name")?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let grant = |prev_degraded| Reply::Grant {
            holder: "alpha".into(),
            epoch: 7,
            term: Duration::from_secs(10),
            expires_in: Duration::from_millis(9_999),
            prev_degraded,
        };
        let refused = |degraded| Reply::Refused {
            holder: Some("beta".into()),
            epoch: 8,
            retry_after: Duration::ZERO,
            degraded,
        };
        let nobody = Reply::Refused {
            holder: None,
            epoch: 0,
            retry_after: Duration::from_secs(3),
            degraded: None,
        };
        let mut all = vec![
            Message::Hello { node: "alpha".into(), nonce: [1; 32] },
            Message::Challenge { nonce: [2; 32] },
            Message::Answer { reply: nobody, proof: [6; 32] },
            Message::Denied { reason: "authentication failed".into() },
        ];
        for flag in [None, Some(false), Some(true)] {
            all.push(Message::Request { proof: [3; 32], degraded: flag });
            all.push(Message::Answer { reply: grant(flag), proof: [4; 32] });
            all.push(Message::Answer { reply: refused(flag), proof: [5; 32] });
        }
        all
    }

    #[test]
    fn every_message_round_trips_and_needs_all_its_bytes() {
        for m in samples() {
            let bytes = encode(&m);
            assert_eq!(decode(&bytes), Ok(Some((m.clone(), bytes.len()))), "{m:?}");
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
            // A second frame behind it is left alone.
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            assert_eq!(decode(&two).map(|o| o.map(|(_, n)| n)), Ok(Some(bytes.len())));
        }
    }

    #[test]
    fn other_version_magic_kind_and_length_are_refused() {
        let good = encode(&Message::Challenge { nonce: [0; 32] });
        let mut v = good.clone();
        v[8] = 2;
        assert_eq!(decode(&v), Err(ProtoError::Version(2)));
        let mut m = good.clone();
        m[4] = b'X';
        assert!(matches!(decode(&m), Err(ProtoError::Magic(_))));
        let mut k = good.clone();
        k[9] = 99;
        assert_eq!(decode(&k), Err(ProtoError::Kind(99)));
        let long = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(decode(&long), Err(ProtoError::TooLong(MAX_FRAME + 1)));
    }

    #[test]
    fn trailing_and_truncated_bodies_are_refused() {
        let mut t = encode(&Message::Request { proof: [0; 32], degraded: None });
        t.push(0);
        let len = (t.len() - 4) as u32;
        t[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&t), Err(ProtoError::Trailing(1)));
        let mut s = encode(&Message::Request { proof: [0; 32], degraded: None });
        s.pop();
        let len = (s.len() - 4) as u32;
        s[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&s), Err(ProtoError::Truncated("REQUEST")));
    }

    #[test]
    fn long_names_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(200);
        let bytes = encode(&Message::Denied { reason: reason.clone() });
        let Ok(Some((Message::Denied { reason: got }, _))) = decode(&bytes) else {
            panic!("decodes")
        };
        assert_eq!(got.len(), 254);
        assert!(reason.starts_with(&got));
    }

    #[test]
    fn answer_nonce_binds_nonce_and_every_field() {
        let g = |epoch, ms, prev_degraded| Reply::Grant {
            holder: "alpha".into(),
            epoch,
            term: Duration::from_millis(ms),
            expires_in: Duration::from_millis(ms),
            prev_degraded,
        };
        let base = answer_nonce(&[1; 32], &g(1, 10, Some(false)));
        assert_ne!(base, answer_nonce(&[2; 32], &g(1, 10, Some(false))));
        assert_ne!(base, answer_nonce(&[1; 32], &g(2, 10, Some(false))));
        assert_ne!(base, answer_nonce(&[1; 32], &g(1, 11, Some(false))));
        assert_ne!(base, answer_nonce(&[1; 32], &g(1, 10, Some(true))));
        assert_ne!(base, answer_nonce(&[1; 32], &g(1, 10, None)));
        let r = |degraded| Reply::Refused {
            holder: Some("alpha".into()),
            epoch: 1,
            retry_after: ms(10),
            degraded,
        };
        assert_ne!(base, answer_nonce(&[1; 32], &r(Some(false))));
        assert_ne!(answer_nonce(&[1; 32], &r(Some(false))), answer_nonce(&[1; 32], &r(Some(true))));
    }

    #[test]
    fn the_degraded_flag_is_bound_to_the_request_proof_and_checked() {
        assert_ne!(request_nonce(&[1; 32], false), request_nonce(&[1; 32], true));
        assert_ne!(request_nonce(&[1; 32], false), request_nonce(&[2; 32], false));
        let mut bad = encode(&Message::Request { proof: [0; 32], degraded: Some(true) });
        bad[10] = 2;
        assert_eq!(decode(&bad), Err(ProtoError::Flag("REQUEST2", 2)));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}
