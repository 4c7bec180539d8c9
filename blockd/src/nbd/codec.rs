//! The NBD codec: bytes in, values out, and values into bytes. No I/O, no tokio.
//!
//! Every decoder first checks whether a whole frame is there; if not it answers
//! [`Decoded::NeedMore`] with the number of bytes the frame needs, which is an outcome and not an
//! error. Errors ([`CodecError`]) are protocol violations after which the connection is dropped.
//!
//! The rules of the protocol that do not need the volume live here too, so that they can be
//! tested with bytes alone: which reply an option gets in which state ([`classify_option`]), and
//! whether a request may run ([`validate`]). The latter is the ONE place where requests are
//! checked before dispatch (NBD-NOTES §2.5–2.7, and §2.9 on why it must be one place).

use crate::be::{u16_at, u32_at, u64_at};
use bytes::BufMut;

use super::proto::{self, chunk, cmd, cmdflag, hflag, info, opt, rep, tflag};
use crate::errno;

/// Handshake flags this server offers.
pub const SERVER_HANDSHAKE_FLAGS: u16 = hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES;

/// Transmission flags, the same on every connection to every export (NBD-NOTES §2.4): clients
/// compare connections. Nothing is offered that is not implemented: no READ_ONLY, DF, CACHE,
/// FAST_ZERO, RESIZE, BLOCK_STATUS. CAN_MULTI_CONN holds because FLUSH and FUA go to the one
/// shared backing store, so their effect covers writes acknowledged on any connection.
pub const TRANSMISSION_FLAGS: u16 = tflag::HAS_FLAGS
    | tflag::SEND_FLUSH
    | tflag::SEND_FUA
    | tflag::SEND_TRIM
    | tflag::SEND_WRITE_ZEROES
    | tflag::CAN_MULTI_CONN;

/// Longest option data accepted: a 4 KiB name plus 4 KiB for everything else (NBD-NOTES §2.1).
/// Anything longer is treated as a denial of service and the connection is dropped.
pub const MAX_OPTION_DATA: u32 = (proto::MAX_STRING as u32) + 4096;

/// A WRITE longer than `max_request` but at most this long is read and thrown away in bounded
/// chunks and answered EINVAL. Above it (and above 32 MiB, which NBD-NOTES §2.3 says must not be
/// treated as DoS) the server may hang up, and does: reading 4 GiB to refuse it helps nobody.
pub const WRITE_DISCARD_LIMIT: u32 = 64 << 20;

/// Whether a whole frame was available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The frame, which used exactly its fixed length from the front of the input.
    Frame(T),
    /// The frame needs this many bytes in total; read more and try again.
    NeedMore(usize),
}

/// A protocol violation: the connection is dropped without a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("client sent unknown or unoffered flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {length} bytes, more than the {MAX_OPTION_DATA} accepted")]
    OptionTooLong { option: u32, length: u32 },
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags (NBD-NOTES §2.1).
pub fn encode_greeting(buf: &mut impl BufMut) {
    buf.put_u64(proto::NBDMAGIC);
    buf.put_u64(proto::IHAVEOPT);
    buf.put_u16(SERVER_HANDSHAKE_FLAGS);
}

/// What the client's 32-bit flags agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// Without it the client may only send EXPORT_NAME (NBD-NOTES §2.1 "interop").
    pub fixed_newstyle: bool,
    /// Leave out the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Decodes the client flags. Any bit the server did not offer drops the connection (MUST).
pub fn decode_client_flags(b: &[u8]) -> Result<Decoded<ClientFlags>, CodecError> {
    if b.len() < 4 {
        return Ok(Decoded::NeedMore(4));
    }
    let flags = u32_at(b, 0);
    if flags & !u32::from(SERVER_HANDSHAKE_FLAGS) != 0 {
        return Err(CodecError::ClientFlags(flags));
    }
    Ok(Decoded::Frame(ClientFlags {
        fixed_newstyle: flags & proto::cflag::FIXED_NEWSTYLE != 0,
        no_zeroes: flags & proto::cflag::NO_ZEROES != 0,
    }))
}

/// An option header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Decodes an option header and bounds its length ([`MAX_OPTION_DATA`]).
pub fn decode_option_header(b: &[u8]) -> Result<Decoded<OptionHeader>, CodecError> {
    if b.len() < proto::OPTION_HEADER_LEN {
        return Ok(Decoded::NeedMore(proto::OPTION_HEADER_LEN));
    }
    let magic = u64_at(b, 0);
    if magic != proto::IHAVEOPT {
        return Err(CodecError::OptionMagic(magic));
    }
    let (option, length) = (u32_at(b, 8), u32_at(b, 12));
    if length > MAX_OPTION_DATA {
        return Err(CodecError::OptionTooLong { option, length });
    }
    Ok(Decoded::Frame(OptionHeader { option, length }))
}

/// The data of INFO and GO: an export name and the info types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// The requested `NBD_INFO_*` types; unknown ones are ignored (MUST).
    pub requested: Vec<u16>,
}

/// Parses INFO/GO data; `Err` carries the reason for ERR_INVALID (NBD-NOTES §2.2).
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    if d.len() < 6 {
        return Err("INFO/GO data shorter than 6 bytes");
    }
    let name_len = u32_at(d, 0) as usize;
    if name_len > d.len() - 6 {
        return Err("export name length exceeds the option data");
    }
    if name_len > proto::MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = &d[4..4 + name_len];
    let rest = &d[4 + name_len..];
    let count = usize::from(u16_at(rest, 0));
    if rest.len() - 2 != count * 2 {
        return Err("information request count does not match the option length");
    }
    let requested = rest[2..].chunks_exact(2).map(|c| u16_at(c, 0)).collect();
    Ok(InfoRequest { name, requested })
}

/// Where the option haggling stands on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HaggleState {
    pub client: ClientFlags,
    /// STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// The server is shutting down: options get ERR_SHUTDOWN.
    pub shutting_down: bool,
}

/// What to do with one option. Decided here, purely; performed by `handshake`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionAction<'a> {
    /// Send one final reply of this type (ACK or an error) with a message, and go on.
    Reply { reply: u32, message: &'static str },
    /// ACK, then use structured replies in transmission.
    EnableStructured,
    /// One SERVER reply per export, then ACK.
    List,
    /// Describe an export; `go` then enters transmission.
    Info { request: InfoRequest<'a>, go: bool },
    /// Enter transmission with this export (or hang up if it cannot be served).
    ExportName(&'a [u8]),
    /// ACK, then close.
    Abort,
    /// Protocol violation: hang up without a reply.
    Disconnect(&'static str),
}

fn reply(reply: u32, message: &'static str) -> OptionAction<'static> {
    OptionAction::Reply { reply, message }
}

/// Decides how to answer option `option` with `data` (NBD-NOTES §2.1–2.2).
pub fn classify_option<'a>(option: u32, data: &'a [u8], st: &HaggleState) -> OptionAction<'a> {
    if !st.client.fixed_newstyle && option != opt::EXPORT_NAME {
        return OptionAction::Disconnect(
            "client without FIXED_NEWSTYLE sent an option other than EXPORT_NAME",
        );
    }
    if st.shutting_down {
        return match option {
            opt::ABORT => OptionAction::Abort,
            opt::EXPORT_NAME => OptionAction::Disconnect("server is shutting down"),
            _ => reply(rep::ERR_SHUTDOWN, "server is shutting down"),
        };
    }
    let no_data = |then: OptionAction<'a>| {
        if data.is_empty() {
            then
        } else {
            reply(rep::ERR_INVALID, "this option carries no data")
        }
    };
    match option {
        opt::EXPORT_NAME => OptionAction::ExportName(data),
        opt::ABORT => OptionAction::Abort,
        opt::LIST => no_data(OptionAction::List),
        opt::STARTTLS => no_data(reply(rep::ERR_POLICY, "TLS is not available on this server")),
        opt::INFO | opt::GO => match parse_info_request(data) {
            Ok(request) => OptionAction::Info { request, go: option == opt::GO },
            Err(why) => reply(rep::ERR_INVALID, why),
        },
        opt::STRUCTURED_REPLY if st.structured => {
            reply(rep::ERR_INVALID, "structured replies were already negotiated")
        }
        opt::STRUCTURED_REPLY => no_data(OptionAction::EnableStructured),
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT if !st.structured => {
            reply(rep::ERR_INVALID, "meta contexts need structured replies first")
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            reply(rep::ERR_UNSUP, "no meta contexts (BLOCK_STATUS) on this server")
        }
        opt::EXTENDED_HEADERS => reply(rep::ERR_UNSUP, "extended headers are not supported"),
        _ => reply(rep::ERR_UNSUP, "unsupported option"),
    }
}

/// One option reply: magic, option, type, length, data.
pub fn encode_option_reply(buf: &mut impl BufMut, option: u32, reply: u32, data: &[u8]) {
    buf.put_u64(proto::REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// NBD_REP_SERVER for LIST: name length, name (no description).
pub fn encode_rep_server(buf: &mut impl BufMut, option: u32, name: &str) {
    let name = truncate(name, proto::MAX_STRING);
    encode_reply_header(buf, option, rep::SERVER, 4 + name.len());
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
}

/// NBD_INFO_EXPORT: exactly 12 bytes of data (MUST).
pub fn encode_info_export(buf: &mut impl BufMut, option: u32, size: u64, flags: u16) {
    encode_reply_header(buf, option, rep::INFO, 12);
    buf.put_u16(info::EXPORT);
    buf.put_u64(size);
    buf.put_u16(flags);
}

/// NBD_INFO_NAME: the canonical name of the export.
pub fn encode_info_name(buf: &mut impl BufMut, option: u32, name: &str) {
    let name = truncate(name, proto::MAX_STRING);
    encode_reply_header(buf, option, rep::INFO, 2 + name.len());
    buf.put_u16(info::NAME);
    buf.put_slice(name.as_bytes());
}

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE (NBD-NOTES §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// NBD_INFO_BLOCK_SIZE: 14 bytes of data.
pub fn encode_info_block_size(buf: &mut impl BufMut, option: u32, b: BlockSizes) {
    encode_reply_header(buf, option, rep::INFO, 14);
    buf.put_u16(info::BLOCK_SIZE);
    buf.put_u32(b.minimum);
    buf.put_u32(b.preferred);
    buf.put_u32(b.maximum);
}

/// The answer to EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES was agreed (MUST).
pub fn encode_export_name_reply(buf: &mut impl BufMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, proto::EXPORT_NAME_ZEROES);
    }
}

fn encode_reply_header(buf: &mut impl BufMut, option: u32, reply: u32, len: usize) {
    buf.put_u64(proto::REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(len as u32);
}

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// A compact request header as received; nothing checked but the magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    /// Opaque; echoed in the reply (MUST).
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decodes a 28-byte request header. A bad magic is a protocol violation (hard disconnect).
pub fn decode_request(b: &[u8]) -> Result<Decoded<Request>, CodecError> {
    if b.len() < proto::REQUEST_LEN {
        return Ok(Decoded::NeedMore(proto::REQUEST_LEN));
    }
    let magic = u32_at(b, 0);
    if magic != proto::REQUEST_MAGIC {
        return Err(CodecError::RequestMagic(magic));
    }
    Ok(Decoded::Frame(Request {
        flags: u16_at(b, 4),
        kind: u16_at(b, 6),
        cookie: u64_at(b, 8),
        offset: u64_at(b, 16),
        length: u32_at(b, 24),
    }))
}

/// Encodes a request header (for tests and tools; the server never sends one).
pub fn encode_request(buf: &mut impl BufMut, r: &Request) {
    buf.put_u32(proto::REQUEST_MAGIC);
    buf.put_u16(r.flags);
    buf.put_u16(r.kind);
    buf.put_u64(r.cookie);
    buf.put_u64(r.offset);
    buf.put_u32(r.length);
}

/// What [`validate`] needs to know about the export and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportView {
    pub size: u64,
    /// Largest READ/WRITE payload (TRIM and WRITE_ZEROES may exceed it, NBD-NOTES §2.3).
    pub max_request: u32,
}

/// A request that passed [`validate`]: in range, flags valid, length within limits, non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// `punch`: no NO_HOLE flag, so the range may be deallocated.
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    },
    /// A zero-length READ/WRITE/TRIM/WRITE_ZEROES inside the export: success, disk untouched.
    Empty {
        read: bool,
    },
    /// Soft disconnect: no reply.
    Disc,
}

/// A request refused with an NBD error; nothing is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// NBD error value for the reply.
    pub error: u32,
    /// Why, for the one log line.
    pub reason: &'static str,
    /// Payload bytes that follow the header and must be read and thrown away (WRITE only).
    pub discard: u32,
}

/// The verdict on one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Run(Command),
    Reject(Rejection),
    /// Protocol violation or DoS: hang up without reading further.
    Disconnect(&'static str),
}

/// Command flags each command accepts. FUA is valid on every command once SEND_FUA is offered
/// (MUST); NO_HOLE only on WRITE_ZEROES. DF, REQ_ONE and FAST_ZERO were not offered.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE,
        _ => cmdflag::FUA,
    }
}

/// The one check before dispatch (NBD-NOTES §2.5–2.7). Order: payload length limits (they
/// decide whether the stream can be kept in sync), command, flags, bounds, emptiness.
pub fn validate(r: &Request, v: &ExportView) -> Verdict {
    let discard = if r.kind == cmd::WRITE { r.length } else { 0 };
    let reject = |error, reason| Verdict::Reject(Rejection { error, reason, discard });
    let payload_cmd = matches!(r.kind, cmd::READ | cmd::WRITE);
    if r.kind == cmd::WRITE && r.length > v.max_request.max(WRITE_DISCARD_LIMIT) {
        return Verdict::Disconnect("WRITE payload larger than the server will read");
    }
    match r.kind {
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::WRITE_ZEROES | cmd::DISC => {}
        cmd::CACHE | cmd::BLOCK_STATUS | cmd::RESIZE => {
            return reject(errno::EINVAL, "command not offered on this export")
        }
        _ => return reject(errno::EINVAL, "unknown command"),
    }
    if r.kind == cmd::DISC {
        // No reply is possible, so the flags do not matter.
        return Verdict::Run(Command::Disc);
    }
    if r.flags & !allowed_flags(r.kind) != 0 {
        return reject(errno::EINVAL, "command flag not valid for this command");
    }
    if payload_cmd && r.length > v.max_request {
        return reject(errno::EINVAL, "request larger than the maximum payload");
    }
    let fua = r.flags & cmdflag::FUA != 0;
    if r.kind == cmd::FLUSH {
        // Offset and length are reserved for FLUSH; a flush covers everything anyway.
        return Verdict::Run(Command::Flush);
    }
    let (offset, len) = (r.offset, u64::from(r.length));
    // Overflow-safe: offset + len is never computed (NBD-NOTES §2.6).
    if offset > v.size || len > v.size - offset {
        return match r.kind {
            cmd::WRITE | cmd::WRITE_ZEROES => reject(errno::ENOSPC, "write beyond the end"),
            _ => reject(errno::EINVAL, "request beyond the end"),
        };
    }
    if len == 0 {
        return Verdict::Run(Command::Empty { read: r.kind == cmd::READ });
    }
    Verdict::Run(match r.kind {
        cmd::READ => Command::Read { offset, len: r.length },
        cmd::WRITE => Command::Write { offset, len: r.length, fua },
        cmd::TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, punch: r.flags & cmdflag::NO_HOLE == 0, fua },
    })
}

/// The header of one reply; any READ payload is written after it by the caller, straight from
/// the read buffer. Every variant ends the reply (simple, or a structured chunk with DONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHead {
    /// Simple reply; with `error` 0 on a READ, `len` data bytes follow.
    Simple { cookie: u64, error: u32 },
    /// Structured OFFSET_DATA chunk with DONE; `len` data bytes follow.
    Data { cookie: u64, offset: u64, len: u32 },
    /// Structured NONE chunk with DONE: success without data (zero-length READ).
    Done { cookie: u64 },
    /// Structured ERROR chunk with DONE and a short message.
    Error { cookie: u64, error: u32, message: &'static str },
}

/// Longest message put in an ERROR chunk; keeps reply headers small and fixed.
pub const MAX_ERROR_MESSAGE: usize = 64;

impl ReplyHead {
    /// Bytes [`ReplyHead::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            ReplyHead::Simple { .. } => proto::SIMPLE_REPLY_LEN,
            ReplyHead::Data { .. } => proto::CHUNK_HEADER_LEN + 8,
            ReplyHead::Done { .. } => proto::CHUNK_HEADER_LEN,
            ReplyHead::Error { message, .. } => {
                proto::CHUNK_HEADER_LEN + 6 + truncate(message, MAX_ERROR_MESSAGE).len()
            }
        }
    }

    pub fn encode(&self, buf: &mut impl BufMut) {
        match *self {
            ReplyHead::Simple { cookie, error } => {
                buf.put_u32(proto::SIMPLE_REPLY_MAGIC);
                buf.put_u32(error);
                buf.put_u64(cookie);
            }
            ReplyHead::Data { cookie, offset, len } => {
                encode_chunk_header(buf, chunk::OFFSET_DATA, cookie, 8 + len);
                buf.put_u64(offset);
            }
            ReplyHead::Done { cookie } => encode_chunk_header(buf, chunk::NONE, cookie, 0),
            ReplyHead::Error { cookie, error, message } => {
                let message = truncate(message, MAX_ERROR_MESSAGE);
                encode_chunk_header(buf, chunk::ERROR, cookie, 6 + message.len() as u32);
                buf.put_u32(error);
                buf.put_u16(message.len() as u16);
                buf.put_slice(message.as_bytes());
            }
        }
    }
}

fn encode_chunk_header(buf: &mut impl BufMut, kind: u16, cookie: u64, len: u32) {
    buf.put_u32(proto::STRUCTURED_REPLY_MAGIC);
    buf.put_u16(chunk::FLAG_DONE);
    buf.put_u16(kind);
    buf.put_u64(cookie);
    buf.put_u32(len);
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
