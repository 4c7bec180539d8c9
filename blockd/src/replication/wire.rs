//! The replication wire format (design.md §6): bytes in, values out. No I/O, no tokio.
//!
//! Every frame is a fixed 44-byte header, a payload, and a 4-byte crc32 trailer:
//!
//! ```text
//!  0      4        6     8      10      12   20       28       36            40           44
//!  +------+--------+-----+------+-------+----+--------+--------+-------------+------------+---------+-------+
//!  |magic |version |kind |flags |volume | id | offset | length | payload_len | header_crc | payload | crc32 |
//!  +------+--------+-----+------+-------+----+--------+--------+-------------+------------+---------+-------+
//! ```
//!
//! All integers are big-endian. `header_crc` covers bytes 0..40, so a corrupted header (above all
//! a corrupted `payload_len`) is caught as soon as 44 bytes are there instead of leaving the
//! reader waiting for bytes that never come; the trailer covers the whole header and the payload.
//! `magic` and `version` stay at the front in every future version, so a peer speaking another
//! version is told apart from a corrupted frame ([`WireError::Version`]).
//!
//! Decoding first checks whether a whole frame is there: too few bytes is the outcome
//! [`Decoded::NeedMore`], not an error. Every [`WireError`] is a protocol violation after which the
//! link drops the connection; a frame that fails any check is never applied.
//!
//! Bulk data (WRITE, RESYNC_DATA) travels in the payload and is never copied by this module:
//! [`encode_into`] hands the data back as a separate [`Bytes`] for `writev`, and [`decode_buf`]
//! slices it out of the read buffer.

use crate::be::{u16_at, u32_at, u64_at};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::role::{DiskState, Role};
use crate::{meta::Generations, resync::Resolve};

/// "BKRP": blockd replication protocol.
pub const MAGIC: u32 = 0x424B_5250;
/// The protocol version this build speaks; the handshake requires both sides to be equal.
/// 4: `WriteFua` is sent (a peer of version 3 would refuse it).
pub const PROTOCOL_VERSION: u16 = 4;
/// Fixed header length, including `header_crc`.
pub const HEADER_LEN: usize = 44;
/// The crc32 trailer after the payload.
pub const TRAILER_LEN: usize = 4;
/// Largest data payload (WRITE, RESYNC_DATA): the NBD server's 32 MiB request limit.
pub const MAX_DATA: usize = 32 << 20;
/// Largest control payload (HELLO with many volumes, GOODBYE reasons).
pub const MAX_CONTROL: usize = 64 << 10;
/// Longest node or volume name, and longest GOODBYE reason.
pub const MAX_NAME: usize = 255;
/// Longest GOODBYE reason.
pub const MAX_REASON: usize = 1024;
/// Most volumes a PARAMS may list.
pub const MAX_VOLUMES: usize = 1024;
/// Largest payload of a frame read before the peer is authenticated (HELLO, NOISE, GOODBYE):
/// nothing larger is allocated for a connection that has not proven the secret.
pub const MAX_UNAUTHENTICATED: usize = 2048;
/// Largest Noise handshake message (NNpsk0's are 48 bytes).
pub const MAX_NOISE: usize = 256;

/// Header flag bits.
pub mod flag {
    /// The frame answers the request with the same `id`.
    pub const REPLY: u16 = 1;
    /// WRITE_ZEROES may deallocate (NBD: no NO_HOLE flag).
    pub const PUNCH: u16 = 2;
    /// Every bit defined in this version.
    pub const ALL: u16 = REPLY | PUNCH;
}

/// Message kinds as they appear in the header.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const NOISE: u16 = 2;
    pub const READY: u16 = 3;
    pub const GOODBYE: u16 = 4;
    pub const PING: u16 = 5;
    pub const PONG: u16 = 6;
    pub const PARAMS: u16 = 7;
    pub const STATE: u16 = 16;
    pub const ASK_PROMOTE: u16 = 17;
    pub const ROLE_CHANGED: u16 = 18;
    pub const PROMOTE_ANSWER: u16 = 19;
    pub const RUN_PROMOTE: u16 = 20;
    pub const PROMOTE_RESULT: u16 = 21;
    pub const WRITE: u16 = 32;
    pub const WRITE_FUA: u16 = 33;
    pub const WRITE_ZEROES: u16 = 34;
    pub const TRIM: u16 = 35;
    pub const FLUSH: u16 = 36;
    pub const READ: u16 = 37;
    pub const READ_DATA: u16 = 38;
    pub const RESYNC_DATA: u16 = 48;
    pub const RESYNC_ZERO: u16 = 49;
    pub const RESYNC_DONE: u16 = 50;
    pub const GET_BITMAP: u16 = 51;
    pub const BITMAP_PART: u16 = 52;
    pub const GET_SUMS: u16 = 53;
    pub const SUMS: u16 = 54;
    pub const ACK: u16 = 64;
}

/// A protocol violation: the connection is dropped and the frame never applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    Magic(u32),
    #[error("peer speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("header crc mismatch (frame corrupted)")]
    HeaderCrc,
    #[error("frame crc mismatch (frame corrupted)")]
    Crc,
    #[error("unknown message kind {0}")]
    Kind(u16),
    #[error("flags {flags:#x} not allowed on message kind {kind}")]
    Flags { kind: u16, flags: u16 },
    #[error("payload of {len} bytes out of bounds for message kind {kind}")]
    PayloadLen { kind: u16, len: u32 },
    #[error("field {field} = {value} out of bounds for message kind {kind}")]
    Field { kind: u16, field: &'static str, value: u64 },
    #[error("malformed payload of message kind {kind}: {what}")]
    Payload { kind: u16, what: &'static str },
}

/// The raw header, public so that tests can build frames no honest node would send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub magic: u32,
    pub version: u16,
    pub kind: u16,
    pub flags: u16,
    pub volume: u16,
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
}

/// Every message of the protocol. Link-level ones (HELLO .. PONG) are handled inside the link;
/// the rest are carried for the node, `volume` being the frame's volume field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame both ways, in clear. `version` travels in the header; `instance` is random
    /// per process start, so a restarted peer is told apart from a reconnecting one; `encrypt`
    /// is `[cluster] encryption`. All of it is bound into the Noise prologue (`handshake.rs`).
    Hello {
        version: u16,
        node: String,
        instance: u64,
        encrypt: bool,
    },
    /// One Noise handshake message (`handshake.rs`).
    Noise {
        msg: Bytes,
    },
    /// The first record each way after the Noise handshake: the volumes, which must be equal.
    Params {
        volumes: Vec<VolumeParams>,
    },
    /// Sent by the lower-named node only: this connection becomes the session. `epoch` grows with
    /// every connection that node adopts, so the other side keeps the newest (see `link.rs`).
    Ready {
        epoch: u64,
    },
    /// Sent before closing on purpose, so the other side can log why.
    Goodbye {
        reason: String,
    },
    Ping,
    Pong,
    /// The node's view of a volume; the reply to a STATE is a STATE.
    State {
        role: Role,
        disk: DiskState,
        gens: Generations,
        primary_when_stopped: bool,
        /// Bytes this node's dirty bitmap marks (it may differ there from the peer).
        dirty: u64,
        /// What the operator asked this node to give up at this handshake.
        resolve: Resolve,
    },
    AskPromote,
    RoleChanged(Role),
    PromoteAnswer {
        granted: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
    },
    /// A WRITE with NBD's FUA: the reply means the data is durable on the peer.
    WriteFua {
        offset: u64,
        data: Bytes,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The Primary's disk is Failed: it reads the peer's copy; the reply is `ReadData` (or an
    /// error `Ack`).
    Read {
        offset: u64,
        len: u32,
    },
    ReadData {
        data: Bytes,
    },
    ResyncData {
        offset: u64,
        data: Bytes,
    },
    ResyncZero {
        offset: u64,
        len: u64,
    },
    ResyncDone {
        gens: Generations,
    },
    /// Asks for the peer's dirty bitmap from byte `offset` of its serialised form; the reply is
    /// a `BitmapPart`, empty past the end.
    GetBitmap {
        offset: u64,
    },
    BitmapPart {
        offset: u64,
        data: Bytes,
    },
    /// Asks for the checksums of `offset..offset+len`, one per [`SUM_BLOCK`]; the reply is
    /// `Sums`, [`SUM_LEN`] bytes per block.
    GetSums {
        offset: u64,
        len: u64,
    },
    Sums {
        data: Bytes,
    },
    /// Run the whole promote plan on the receiving node (`blockctl swap`, planned switchover).
    RunPromote,
    /// The reply to `RunPromote`: the plan's exit code and the tail of its output.
    PromoteResult {
        code: i32,
        output: String,
    },
    /// The reply to a data or role request: 0 = ok, else a value of [`crate::errno`]'s table.
    Ack {
        error: u32,
    },
}

/// What both nodes must agree on about one volume, carried in PARAMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub name: String,
    pub size: u64,
    /// Bytes per dirty-bitmap bit (fixed when the metadata was created): the bitmaps the nodes
    /// exchange for a resync are only comparable at the same granularity.
    pub granularity: u32,
    /// Activity-log geometry: bytes per extent and hot extents (reported, not compared).
    pub al_extent_size: u64,
    pub al_extents: u32,
}

/// A decoded or to-be-encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub volume: u16,
    /// Request id; a reply echoes the id of its request.
    pub id: u64,
    pub reply: bool,
    pub msg: Message,
}

/// Whether a whole frame was in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The frame and the number of bytes it used from the front of the input.
    Frame(Frame, usize),
    /// The frame needs this many bytes in total; read more and try again.
    NeedMore(usize),
}

/// How a kind uses the header fields and the payload.
#[derive(Clone, Copy)]
struct Shape {
    offset: bool,
    length: bool,
    /// Inclusive payload bounds.
    payload: (u32, u32),
    /// Flags the kind may carry.
    flags: u16,
    /// Some(true): must be a reply; Some(false): must not; None: either.
    reply: Option<bool>,
}

const fn shape(
    offset: bool,
    length: bool,
    payload: (u32, u32),
    flags: u16,
    reply: Option<bool>,
) -> Shape {
    Shape { offset, length, payload, flags, reply }
}

const GENS_LEN: u32 = 32;
const STATE_LEN: u32 = 3 + GENS_LEN + 8;

/// Bytes covered by one checksum of `GetSums`.
pub const SUM_BLOCK: u64 = 4096;
/// Bytes of one checksum (a truncated SHA-256).
pub const SUM_LEN: usize = 8;

fn shape_of(kind: u16) -> Option<Shape> {
    let data = (1, MAX_DATA as u32);
    let ctl = MAX_CONTROL as u32;
    let s = match kind {
        kind::HELLO => shape(false, false, (10, MAX_UNAUTHENTICATED as u32), 0, Some(false)),
        kind::NOISE => shape(false, false, (1, MAX_NOISE as u32), 0, Some(false)),
        kind::PARAMS => shape(false, false, (2, ctl), 0, Some(false)),
        kind::READY => shape(false, false, (8, 8), 0, Some(false)),
        kind::GOODBYE => shape(false, false, (0, MAX_REASON as u32), 0, Some(false)),
        kind::PING | kind::ASK_PROMOTE | kind::FLUSH | kind::RUN_PROMOTE => {
            shape(false, false, (0, 0), 0, Some(false))
        }
        kind::PROMOTE_RESULT => shape(false, false, (4, ctl), flag::REPLY, Some(true)),
        kind::PONG => shape(false, false, (0, 0), flag::REPLY, Some(true)),
        kind::STATE => shape(false, false, (STATE_LEN, STATE_LEN), flag::REPLY, None),
        kind::ROLE_CHANGED => shape(false, true, (0, 0), 0, Some(false)),
        kind::PROMOTE_ANSWER | kind::ACK => shape(false, true, (0, 0), flag::REPLY, Some(true)),
        kind::WRITE | kind::WRITE_FUA | kind::RESYNC_DATA => {
            shape(true, true, data, 0, Some(false))
        }
        kind::WRITE_ZEROES => shape(true, true, (0, 0), flag::PUNCH, Some(false)),
        kind::TRIM | kind::RESYNC_ZERO => shape(true, true, (0, 0), 0, Some(false)),
        kind::RESYNC_DONE => shape(false, false, (GENS_LEN, GENS_LEN), 0, Some(false)),
        kind::GET_BITMAP => shape(true, false, (0, 0), 0, Some(false)),
        kind::BITMAP_PART => shape(true, true, (0, MAX_DATA as u32), flag::REPLY, Some(true)),
        kind::GET_SUMS => shape(true, true, (0, 0), 0, Some(false)),
        kind::READ => shape(true, true, (0, 0), 0, Some(false)),
        kind::READ_DATA => shape(false, true, data, flag::REPLY, Some(true)),
        kind::SUMS => shape(false, true, (0, MAX_DATA as u32), flag::REPLY, Some(true)),
        _ => return None,
    };
    Some(s)
}

/// Whether a message of this kind may be sent as a reply.
pub fn is_reply_kind(kind: u16) -> bool {
    shape_of(kind).is_some_and(|s| s.reply != Some(false))
}

/// Serializes a header and computes its `header_crc`. No checks: tests use it to build bad frames.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    let mut w = &mut b[..];
    w.put_u32(h.magic);
    w.put_u16(h.version);
    w.put_u16(h.kind);
    w.put_u16(h.flags);
    w.put_u16(h.volume);
    w.put_u64(h.id);
    w.put_u64(h.offset);
    w.put_u64(h.length);
    w.put_u32(h.payload_len);
    let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
    b[HEADER_LEN - 4..].copy_from_slice(&crc.to_be_bytes());
    b
}

/// The crc32 trailer of a frame: over the encoded header and the payload.
pub fn trailer(header: &[u8], payload: &[u8]) -> [u8; TRAILER_LEN] {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize().to_be_bytes()
}

/// Builds a whole frame from a raw header and payload (`payload_len` is taken from `payload`).
/// For tests and fake peers; the link uses [`encode_into`].
pub fn encode_raw(h: &Header, payload: &[u8]) -> BytesMut {
    let h = Header { payload_len: payload.len() as u32, ..*h };
    let head = encode_header(&h);
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.put_slice(&head);
    out.put_slice(payload);
    out.put_slice(&trailer(&head, payload));
    out
}

/// Parses and checks a header: magic, version, header crc, kind, flags, payload bounds and the
/// header fields the kind does not use (must be 0).
pub fn decode_header(b: &[u8]) -> Result<Option<Header>, WireError> {
    if b.len() < HEADER_LEN {
        return Ok(None);
    }
    let magic = u32_at(b, 0);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = u16_at(b, 4);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    if crc32fast::hash(&b[..HEADER_LEN - 4]) != u32_at(b, HEADER_LEN - 4) {
        return Err(WireError::HeaderCrc);
    }
    let h = Header {
        magic,
        version,
        kind: u16_at(b, 6),
        flags: u16_at(b, 8),
        volume: u16_at(b, 10),
        id: u64_at(b, 12),
        offset: u64_at(b, 20),
        length: u64_at(b, 28),
        payload_len: u32_at(b, 36),
    };
    check_header(&h)?;
    Ok(Some(h))
}

fn check_header(h: &Header) -> Result<(), WireError> {
    let s = shape_of(h.kind).ok_or(WireError::Kind(h.kind))?;
    let reply = h.flags & flag::REPLY != 0;
    if h.flags & !s.flags != 0 || s.reply.is_some_and(|r| r != reply) {
        return Err(WireError::Flags { kind: h.kind, flags: h.flags });
    }
    if h.payload_len < s.payload.0 || h.payload_len > s.payload.1 {
        return Err(WireError::PayloadLen { kind: h.kind, len: h.payload_len });
    }
    let field = |field, value| Err(WireError::Field { kind: h.kind, field, value });
    if !s.offset && h.offset != 0 {
        return field("offset", h.offset);
    }
    if !s.length && h.length != 0 {
        return field("length", h.length);
    }
    if s.payload.1 > 0 && s.length && u64::from(h.payload_len) != h.length {
        return field("length", h.length);
    }
    if s.offset && h.offset.checked_add(h.length).is_none() {
        return field("offset", h.offset);
    }
    match h.kind {
        kind::ROLE_CHANGED if !(1..=2).contains(&h.length) => field("length", h.length),
        kind::PROMOTE_ANSWER if h.length > 1 => field("length", h.length),
        kind::ACK if h.length > u64::from(u32::MAX) => field("length", h.length),
        _ => Ok(()),
    }
}

/// Decodes one frame from the front of `b`, copying any payload (tests, fuzzing, fake peers).
/// The link uses [`decode_buf`], which does not copy.
pub fn decode(b: &[u8]) -> Result<Decoded, WireError> {
    let Some(h) = decode_header(b)? else {
        return Ok(Decoded::NeedMore(HEADER_LEN));
    };
    let total = HEADER_LEN + h.payload_len as usize + TRAILER_LEN;
    if b.len() < total {
        return Ok(Decoded::NeedMore(total));
    }
    check_crc(&b[..total])?;
    let payload = Bytes::copy_from_slice(&b[HEADER_LEN..total - TRAILER_LEN]);
    Ok(Decoded::Frame(frame_from(&h, payload)?, total))
}

/// Decodes one frame from the front of `buf` and removes it; data payloads are slices of `buf`'s
/// memory. `Ok(None)`: incomplete; `buf` has then been given the capacity the whole frame needs,
/// so a large WRITE is read into one allocation.
pub fn decode_buf(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    let Some(h) = decode_header(buf)? else {
        buf.reserve(HEADER_LEN - buf.len());
        return Ok(None);
    };
    let total = HEADER_LEN + h.payload_len as usize + TRAILER_LEN;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    check_crc(&buf[..total])?;
    let mut whole = buf.split_to(total).freeze();
    whole.truncate(total - TRAILER_LEN);
    let payload = whole.slice(HEADER_LEN..);
    frame_from(&h, payload).map(Some)
}

fn check_crc(frame: &[u8]) -> Result<(), WireError> {
    let end = frame.len() - TRAILER_LEN;
    if crc32fast::hash(&frame[..end]) != u32_at(frame, end) {
        return Err(WireError::Crc);
    }
    Ok(())
}

fn frame_from(h: &Header, payload: Bytes) -> Result<Frame, WireError> {
    let msg = message_from(h, payload)?;
    Ok(Frame { volume: h.volume, id: h.id, reply: h.flags & flag::REPLY != 0, msg })
}

fn message_from(h: &Header, mut p: Bytes) -> Result<Message, WireError> {
    let (offset, len) = (h.offset, h.length);
    let msg = match h.kind {
        kind::HELLO => parse_hello(h, &mut p)?,
        kind::NOISE => Message::Noise { msg: p },
        kind::PARAMS => parse_params(h.kind, &mut p)?,
        kind::READY => Message::Ready { epoch: p.get_u64() },
        kind::GOODBYE => Message::Goodbye { reason: utf8(h.kind, &p)? },
        kind::PING => Message::Ping,
        kind::PONG => Message::Pong,
        kind::STATE => parse_state(h.kind, &mut p)?,
        kind::ASK_PROMOTE => Message::AskPromote,
        kind::ROLE_CHANGED => Message::RoleChanged(codes::role_from(h.kind, len)?),
        kind::PROMOTE_ANSWER => Message::PromoteAnswer { granted: len == 1 },
        kind::WRITE => Message::Write { offset, data: p },
        kind::WRITE_FUA => Message::WriteFua { offset, data: p },
        kind::WRITE_ZEROES => {
            Message::WriteZeroes { offset, len, punch: h.flags & flag::PUNCH != 0 }
        }
        kind::TRIM => Message::Trim { offset, len },
        kind::FLUSH => Message::Flush,
        kind::READ => match u32::try_from(len) {
            Ok(len) if len > 0 && len as usize <= MAX_DATA => Message::Read { offset, len },
            _ => return Err(WireError::Field { kind: h.kind, field: "length", value: len }),
        },
        kind::READ_DATA => Message::ReadData { data: p },
        kind::RESYNC_DATA => Message::ResyncData { offset, data: p },
        kind::RESYNC_ZERO => Message::ResyncZero { offset, len },
        kind::RESYNC_DONE => Message::ResyncDone { gens: get_gens(&mut p) },
        kind::GET_BITMAP => Message::GetBitmap { offset },
        kind::BITMAP_PART => Message::BitmapPart { offset, data: p },
        kind::GET_SUMS => Message::GetSums { offset, len },
        kind::SUMS => Message::Sums { data: p },
        kind::RUN_PROMOTE => Message::RunPromote,
        kind::PROMOTE_RESULT => {
            let code = p.get_i32();
            Message::PromoteResult { code, output: utf8(h.kind, &p)? }
        }
        kind::ACK => Message::Ack { error: len as u32 },
        k => return Err(WireError::Kind(k)),
    };
    Ok(msg)
}

pub(super) fn get_gens(p: &mut Bytes) -> Generations {
    Generations { current: p.get_u64(), bitmap: p.get_u64(), history: [p.get_u64(), p.get_u64()] }
}

fn put_gens(out: &mut BytesMut, g: &Generations) {
    for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
        out.put_u64(v);
    }
}

pub(super) fn utf8(kind: u16, b: &[u8]) -> Result<String, WireError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| WireError::Payload { kind, what: "text is not UTF-8" })
}

impl Message {
    /// The header kind of this message.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Noise { .. } => kind::NOISE,
            Message::Params { .. } => kind::PARAMS,
            Message::Ready { .. } => kind::READY,
            Message::Goodbye { .. } => kind::GOODBYE,
            Message::Ping => kind::PING,
            Message::Pong => kind::PONG,
            Message::State { .. } => kind::STATE,
            Message::AskPromote => kind::ASK_PROMOTE,
            Message::RoleChanged(_) => kind::ROLE_CHANGED,
            Message::PromoteAnswer { .. } => kind::PROMOTE_ANSWER,
            Message::Write { .. } => kind::WRITE,
            Message::WriteFua { .. } => kind::WRITE_FUA,
            Message::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Message::Trim { .. } => kind::TRIM,
            Message::Flush => kind::FLUSH,
            Message::Read { .. } => kind::READ,
            Message::ReadData { .. } => kind::READ_DATA,
            Message::ResyncData { .. } => kind::RESYNC_DATA,
            Message::ResyncZero { .. } => kind::RESYNC_ZERO,
            Message::ResyncDone { .. } => kind::RESYNC_DONE,
            Message::GetBitmap { .. } => kind::GET_BITMAP,
            Message::BitmapPart { .. } => kind::BITMAP_PART,
            Message::GetSums { .. } => kind::GET_SUMS,
            Message::Sums { .. } => kind::SUMS,
            Message::RunPromote => kind::RUN_PROMOTE,
            Message::PromoteResult { .. } => kind::PROMOTE_RESULT,
            Message::Ack { .. } => kind::ACK,
        }
    }

    /// The bulk payload, sent by reference rather than copied.
    pub(crate) fn data(&self) -> Option<&Bytes> {
        match self {
            Message::Write { data, .. }
            | Message::WriteFua { data, .. }
            | Message::ResyncData { data, .. }
            | Message::BitmapPart { data, .. }
            | Message::ReadData { data }
            | Message::Sums { data } => Some(data),
            _ => None,
        }
    }

    /// (version, flags, offset, length) of the header.
    fn header_fields(&self) -> (u16, u16, u64, u64) {
        let v = PROTOCOL_VERSION;
        match self {
            Message::Hello { version, .. } => (*version, 0, 0, 0),
            Message::RoleChanged(r) => (v, 0, 0, u64::from(role_code(*r))),
            Message::PromoteAnswer { granted } => (v, 0, 0, u64::from(*granted)),
            Message::Ack { error } => (v, 0, 0, u64::from(*error)),
            Message::Write { offset, data }
            | Message::WriteFua { offset, data }
            | Message::ResyncData { offset, data } => (v, 0, *offset, data.len() as u64),
            Message::WriteZeroes { offset, len, punch } => {
                (v, if *punch { flag::PUNCH } else { 0 }, *offset, *len)
            }
            Message::Trim { offset, len }
            | Message::ResyncZero { offset, len }
            | Message::GetSums { offset, len } => (v, 0, *offset, *len),
            Message::GetBitmap { offset } => (v, 0, *offset, 0),
            Message::BitmapPart { offset, data } => (v, 0, *offset, data.len() as u64),
            Message::Sums { data } | Message::ReadData { data } => (v, 0, 0, data.len() as u64),
            Message::Read { offset, len } => (v, 0, *offset, u64::from(*len)),
            _ => (v, 0, 0, 0),
        }
    }

    /// Appends the inline (non-data) payload.
    fn put_inline(&self, out: &mut BytesMut) {
        match self {
            Message::Hello { node, instance, encrypt, .. } => {
                put_name(out, node);
                out.put_u64(*instance);
                out.put_u8(u8::from(*encrypt));
            }
            Message::Noise { msg } => out.put_slice(&msg[..msg.len().min(MAX_NOISE)]),
            Message::Params { volumes } => {
                out.put_u16(volumes.len().min(MAX_VOLUMES) as u16);
                for v in volumes.iter().take(MAX_VOLUMES) {
                    put_name(out, &v.name);
                    out.put_u64(v.size);
                    out.put_u32(v.granularity);
                    out.put_u64(v.al_extent_size);
                    out.put_u32(v.al_extents);
                }
            }
            Message::Ready { epoch } => out.put_u64(*epoch),
            Message::Goodbye { reason } => out.put_slice(truncate(reason, MAX_REASON).as_bytes()),
            Message::State { role, disk, gens, primary_when_stopped, dirty, resolve } => {
                out.put_u8(role_code(*role));
                out.put_u8(disk_code(*disk));
                let resolve = match resolve {
                    Resolve::None => 0,
                    Resolve::DiscardLocal => 1,
                    Resolve::FullSync => 2,
                };
                out.put_u8(u8::from(*primary_when_stopped) | resolve << 1);
                put_gens(out, gens);
                out.put_u64(*dirty);
            }
            Message::ResyncDone { gens } => put_gens(out, gens),
            Message::PromoteResult { code, output } => {
                out.put_i32(*code);
                // Keep the end: that is where a failing plan says why.
                let max = MAX_CONTROL - 4;
                let start = output.len().saturating_sub(max);
                let start = (start..=output.len()).find(|&i| output.is_char_boundary(i));
                out.put_slice(&output.as_bytes()[start.unwrap_or(output.len())..]);
            }
            _ => {}
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_name(out: &mut BytesMut, s: &str) {
    let s = truncate(s, MAX_NAME);
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

/// Appends `frame` to `out` without copying bulk data. For a message without data the whole
/// frame is appended and `None` returned. For WRITE/WRITE_FUA/RESYNC_DATA only the header is
/// appended; the data (a reference count, not a copy) and the trailer are returned, to be sent
/// right after in that order (`writev`).
///
/// Names longer than [`MAX_NAME`] and reasons longer than [`MAX_REASON`] are cut; the config
/// validation keeps real names shorter.
pub fn encode_into(frame: &Frame, out: &mut BytesMut) -> Option<(Bytes, [u8; TRAILER_LEN])> {
    let (version, flags, offset, length) = frame.msg.header_fields();
    let reply = if frame.reply { flag::REPLY } else { 0 };
    let mut h = Header {
        magic: MAGIC,
        version,
        kind: frame.msg.kind(),
        flags: flags | reply,
        volume: frame.volume,
        id: frame.id,
        offset,
        length,
        payload_len: 0,
    };
    let start = out.len();
    if let Some(data) = frame.msg.data() {
        h.payload_len = data.len() as u32;
        let head = encode_header(&h);
        out.put_slice(&head);
        return Some((data.clone(), trailer(&head, data)));
    }
    out.put_slice(&[0u8; HEADER_LEN]);
    frame.msg.put_inline(out);
    h.payload_len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&encode_header(&h));
    let crc = crc32fast::hash(&out[start..]);
    out.put_u32(crc);
    None
}

/// Encodes a whole frame into one buffer (copies data; for tests and fake peers).
pub fn encode(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    if let Some((data, crc)) = encode_into(frame, &mut out) {
        out.put_slice(&data);
        out.put_slice(&crc);
    }
    out
}

#[path = "wire_codes.rs"]
mod codes;
use codes::{disk_code, parse_hello, parse_params, parse_state, role_code};

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
