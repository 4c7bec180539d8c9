//! Byte-level tests of the replication wire format (design.md §6).

use super::*;

fn gens() -> Generations {
    Generations { current: 0x1122_3344_5566_7788, bitmap: 3, history: [4, u64::MAX] }
}

fn vol(name: &str, size: u64) -> VolumeParams {
    VolumeParams {
        name: name.into(),
        size,
        granularity: 65536,
        al_extent_size: 4 << 20,
        al_extents: 127,
    }
}

fn every_message() -> Vec<Message> {
    let data = Bytes::from((0..4096u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: "alpha".into(),
            instance: 42,
            encrypt: true,
        },
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: String::new(),
            instance: 1,
            encrypt: false,
        },
        Message::Noise { msg: Bytes::from_static(&[0xAB; 48]) },
        Message::Params { volumes: vec![vol("vol0", 1 << 30), vol("vølume-ü", 4096)] },
        Message::Params { volumes: vec![] },
        Message::Ready { epoch: 7 },
        Message::Goodbye { reason: "volume sizes differ".into() },
        Message::Goodbye { reason: String::new() },
        Message::Ping,
        Message::State {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            gens: gens(),
            primary_when_stopped: true,
            dirty: 0,
            resolve: Resolve::None,
        },
        Message::State {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            gens: Generations::default(),
            primary_when_stopped: false,
            dirty: u64::MAX,
            resolve: Resolve::DiscardLocal,
        },
        Message::AskPromote,
        Message::RoleChanged(Role::Primary),
        Message::RoleChanged(Role::Secondary),
        Message::Write { offset: 4096, data: data.clone() },
        Message::WriteFua { offset: 0, data: data.slice(..512) },
        Message::WriteZeroes { offset: 8192, len: 1 << 20, punch: true },
        Message::WriteZeroes { offset: 8192, len: 1 << 20, punch: false },
        Message::Trim { offset: 1 << 40, len: 4096 },
        Message::Flush,
        Message::ResyncData { offset: 1 << 20, data },
        Message::ResyncZero { offset: 0, len: 1 << 30 },
        Message::ResyncDone { gens: gens() },
        Message::GetBitmap { offset: 1 << 20 },
        Message::GetSums { offset: 4096, len: 1 << 20 },
        Message::RunPromote,
    ]
}

fn every_reply() -> Vec<Message> {
    vec![
        Message::Pong,
        Message::BitmapPart { offset: 8, data: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]) },
        Message::BitmapPart { offset: 0, data: Bytes::new() },
        Message::Sums { data: Bytes::from_static(&[9; 16]) },
        Message::PromoteResult { code: -1, output: "promote: step mount db failed".into() },
        Message::PromoteResult { code: 0, output: String::new() },
        Message::Ack { error: 0 },
        Message::Ack { error: u32::MAX },
        Message::PromoteAnswer { granted: true },
        Message::PromoteAnswer { granted: false },
        Message::State {
            role: Role::Secondary,
            disk: DiskState::Outdated,
            gens: gens(),
            primary_when_stopped: false,
            dirty: 4096,
            resolve: Resolve::FullSync,
        },
        Message::State {
            role: Role::Primary,
            disk: DiskState::Failed,
            gens: gens(),
            primary_when_stopped: true,
            dirty: 1 << 40,
            resolve: Resolve::None,
        },
    ]
}

fn every_frame() -> Vec<Frame> {
    let req = every_message().into_iter().map(|msg| Frame { volume: 3, id: 99, reply: false, msg });
    let rep = every_reply().into_iter().map(|msg| Frame { volume: 65535, id: 1, reply: true, msg });
    req.chain(rep).collect()
}

#[test]
fn round_trip_every_kind_both_decoders() {
    for f in every_frame() {
        let bytes = encode(&f);
        assert_eq!(decode(&bytes).unwrap(), Decoded::Frame(f.clone(), bytes.len()), "{f:?}");
        let mut buf = bytes.clone();
        buf.extend_from_slice(b"next");
        assert_eq!(decode_buf(&mut buf).unwrap(), Some(f.clone()));
        assert_eq!(&buf[..], b"next", "decode_buf removes exactly one frame");
    }
}

#[test]
fn encode_into_does_not_copy_data() {
    let data = Bytes::from(vec![5u8; 8192]);
    let f = Frame {
        volume: 0,
        id: 1,
        reply: false,
        msg: Message::Write { offset: 0, data: data.clone() },
    };
    let mut out = BytesMut::new();
    let (d, crc) = encode_into(&f, &mut out).expect("data returned separately");
    assert_eq!(out.len(), HEADER_LEN);
    assert_eq!(d.as_ptr(), data.as_ptr(), "same memory, not a copy");
    let mut whole = out.clone();
    whole.extend_from_slice(&d);
    whole.extend_from_slice(&crc);
    assert_eq!(whole, encode(&f));
}

#[test]
fn decode_buf_slices_data_out_of_the_read_buffer() {
    let f = Frame {
        volume: 0,
        id: 1,
        reply: false,
        msg: Message::Write { offset: 0, data: Bytes::from(vec![1u8; 4096]) },
    };
    let mut buf = encode(&f);
    let base = buf.as_ptr();
    let Some(Frame { msg: Message::Write { data, .. }, .. }) = decode_buf(&mut buf).unwrap() else {
        panic!("not a write");
    };
    assert_eq!(data.as_ptr(), base.wrapping_add(HEADER_LEN), "payload is a slice, not a copy");
}

#[test]
fn need_more_on_every_prefix() {
    for f in every_frame() {
        let bytes = encode(&f);
        for n in 0..bytes.len() {
            let want = if n < HEADER_LEN { HEADER_LEN } else { bytes.len() };
            assert_eq!(decode(&bytes[..n]).unwrap(), Decoded::NeedMore(want), "{n} of {f:?}");
            let mut buf = BytesMut::from(&bytes[..n]);
            assert_eq!(decode_buf(&mut buf).unwrap(), None);
            assert_eq!(buf.len(), n, "nothing consumed");
            assert!(buf.capacity() >= want, "capacity reserved for the whole frame");
        }
    }
}

#[test]
fn flipped_byte_anywhere_is_an_error() {
    // Every bit of every byte: the header crc or the trailer crc (or an earlier check of magic
    // or version) must catch it; a corrupted frame is never a frame.
    for f in every_frame() {
        let bytes = encode(&f);
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.to_vec();
                b[at] ^= 1 << bit;
                let r = decode(&b);
                assert!(r.is_err(), "flip at {at} bit {bit} of {f:?}: {r:?}");
                let expect = match at {
                    0..=3 => matches!(r, Err(WireError::Magic(_))),
                    4..=5 => matches!(r, Err(WireError::Version(_))),
                    6..=43 => r == Err(WireError::HeaderCrc),
                    _ => r == Err(WireError::Crc),
                };
                assert!(expect, "flip at {at}: {r:?}");
            }
        }
    }
}

#[test]
fn payload_flip_fails_crc_in_decode_buf_too() {
    let f = Frame {
        volume: 0,
        id: 1,
        reply: false,
        msg: Message::Write { offset: 0, data: Bytes::from(vec![0u8; 4096]) },
    };
    let mut buf = encode(&f);
    buf[HEADER_LEN + 100] ^= 0x10;
    assert_eq!(decode_buf(&mut buf), Err(WireError::Crc));
}

fn hdr(kind: u16) -> Header {
    Header { magic: MAGIC, version: PROTOCOL_VERSION, kind, ..Header::default() }
}

fn err(h: Header, payload: &[u8]) -> WireError {
    decode(&encode_raw(&h, payload)).expect_err("must be refused")
}

#[test]
fn magic_version_and_kind_bounds() {
    assert_eq!(
        err(Header { magic: 0x4E42_4400, ..hdr(kind::PING) }, &[]),
        WireError::Magic(0x4E42_4400)
    );
    for v in [0, PROTOCOL_VERSION + 1, u16::MAX] {
        assert_eq!(err(Header { version: v, ..hdr(kind::PING) }, &[]), WireError::Version(v));
    }
    for k in [0, 8, 15, 22, 31, 39, 47, 55, 63, 65, u16::MAX] {
        assert_eq!(err(hdr(k), &[]), WireError::Kind(k));
    }
    assert_eq!(
        decode(&encode_raw(&hdr(kind::PING), &[])).unwrap(),
        Decoded::Frame(Frame { volume: 0, id: 0, reply: false, msg: Message::Ping }, 48)
    );
}

#[test]
fn flag_bounds() {
    let reply = flag::REPLY;
    // Unknown bits.
    for bad in [4u16, 0x8000, 0xFFFF] {
        assert!(matches!(
            err(Header { flags: bad, ..hdr(kind::PING) }, &[]),
            WireError::Flags { .. }
        ));
    }
    // PUNCH only on WRITE_ZEROES.
    assert!(matches!(
        err(Header { flags: flag::PUNCH, length: 1, ..hdr(kind::TRIM) }, &[]),
        WireError::Flags { .. }
    ));
    // Requests may not carry REPLY; replies must.
    assert!(matches!(
        err(Header { flags: reply, ..hdr(kind::PING) }, &[]),
        WireError::Flags { .. }
    ));
    assert!(matches!(
        err(Header { flags: reply, length: 1, ..hdr(kind::WRITE) }, &[1]),
        WireError::Flags { .. }
    ));
    assert!(matches!(err(hdr(kind::PONG), &[]), WireError::Flags { .. }));
    assert!(matches!(err(hdr(kind::ACK), &[]), WireError::Flags { .. }));
    assert!(matches!(
        err(Header { flags: reply, ..hdr(kind::HELLO) }, &[0; 10]),
        WireError::Flags { .. }
    ));
}

#[test]
fn payload_len_bounds() {
    let pl = |kind, len| WireError::PayloadLen { kind, len };
    assert_eq!(err(hdr(kind::PING), &[0]), pl(kind::PING, 1));
    assert_eq!(err(hdr(kind::NOISE), &[]), pl(kind::NOISE, 0));
    assert_eq!(err(hdr(kind::NOISE), &[0; MAX_NOISE + 1]), pl(kind::NOISE, MAX_NOISE as u32 + 1));
    let big = [0; MAX_UNAUTHENTICATED + 1];
    assert_eq!(err(hdr(kind::HELLO), &big), pl(kind::HELLO, MAX_UNAUTHENTICATED as u32 + 1));
    assert_eq!(err(hdr(kind::READY), &[0; 7]), pl(kind::READY, 7));
    assert_eq!(err(hdr(kind::STATE), &[1; 42]), pl(kind::STATE, 42));
    assert_eq!(err(hdr(kind::HELLO), &[0; 9]), pl(kind::HELLO, 9));
    assert_eq!(
        err(hdr(kind::GOODBYE), &[b'x'; MAX_REASON + 1]),
        pl(kind::GOODBYE, MAX_REASON as u32 + 1)
    );
    assert_eq!(err(hdr(kind::WRITE), &[]), pl(kind::WRITE, 0));
    // An oversized data frame is refused from its header alone, before any payload arrives.
    let big = Header {
        payload_len: MAX_DATA as u32 + 1,
        length: MAX_DATA as u64 + 1,
        ..hdr(kind::WRITE)
    };
    assert_eq!(decode(&encode_header(&big)), Err(pl(kind::WRITE, MAX_DATA as u32 + 1)));
    let max = Header { payload_len: MAX_DATA as u32, length: MAX_DATA as u64, ..hdr(kind::WRITE) };
    assert_eq!(
        decode(&encode_header(&max)).unwrap(),
        Decoded::NeedMore(HEADER_LEN + MAX_DATA + TRAILER_LEN)
    );
}

#[test]
fn header_field_bounds() {
    let field = |h: Header, p: &[u8]| match err(h, p) {
        WireError::Field { field, .. } => field,
        e => panic!("{e:?}"),
    };
    // Unused fields must be zero.
    assert_eq!(field(Header { offset: 1, ..hdr(kind::PING) }, &[]), "offset");
    assert_eq!(field(Header { length: 1, ..hdr(kind::FLUSH) }, &[]), "length");
    assert_eq!(field(Header { offset: 1, length: 1, ..hdr(kind::ROLE_CHANGED) }, &[]), "offset");
    // Data length must equal the payload length.
    assert_eq!(field(Header { length: 2, ..hdr(kind::WRITE) }, &[0]), "length");
    // offset + length must not overflow.
    assert_eq!(field(Header { offset: u64::MAX, length: 1, ..hdr(kind::TRIM) }, &[]), "offset");
    assert_eq!(field(Header { offset: u64::MAX, length: 1, ..hdr(kind::WRITE) }, &[0]), "offset");
    // Enumerated values.
    for v in [0, 3, u64::MAX] {
        assert_eq!(field(Header { length: v, ..hdr(kind::ROLE_CHANGED) }, &[]), "length");
    }
    let ans = Header { flags: flag::REPLY, length: 2, ..hdr(kind::PROMOTE_ANSWER) };
    assert_eq!(field(ans, &[]), "length");
    let ack = Header { flags: flag::REPLY, length: 1 << 32, ..hdr(kind::ACK) };
    assert_eq!(field(ack, &[]), "length");
    let mut state = [1u8; 43];
    state[0] = 3;
    assert_eq!(field(hdr(kind::STATE), &state), "role");
    state[0] = 1;
    state[1] = 0;
    assert_eq!(field(hdr(kind::STATE), &state), "disk");
    state[1] = 5;
    assert_eq!(field(hdr(kind::STATE), &state), "disk");
    state[1] = 1;
    state[2] = 7;
    assert_eq!(field(hdr(kind::STATE), &state), "state flags");
}

#[test]
fn malformed_hello_and_text() {
    let payload = |f: Frame| {
        let b = encode(&f);
        b[HEADER_LEN..b.len() - TRAILER_LEN].to_vec()
    };
    let hello = Frame { volume: 0, id: 0, reply: false, msg: every_message().remove(0) };
    let good = payload(hello);
    // Trailing garbage, truncation, a name running past the end, a bad flag.
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(err(hdr(kind::HELLO), &long), WireError::Payload { .. }));
    assert!(matches!(err(hdr(kind::HELLO), &good[..good.len() - 1]), WireError::Payload { .. }));
    let mut name = good.clone();
    name[0] = 250;
    assert!(matches!(err(hdr(kind::HELLO), &name), WireError::Payload { .. }));
    let mut flag = good.clone();
    *flag.last_mut().unwrap() = 2;
    assert!(matches!(err(hdr(kind::HELLO), &flag), WireError::Field { field: "encrypt", .. }));
    // PARAMS: truncated inside the volume list, too many volumes.
    let params = Frame { volume: 0, id: 0, reply: false, msg: every_message().remove(3) };
    let good = payload(params);
    assert!(matches!(err(hdr(kind::PARAMS), &good[..good.len() - 3]), WireError::Payload { .. }));
    let many = ((MAX_VOLUMES + 1) as u16).to_be_bytes();
    assert!(matches!(err(hdr(kind::PARAMS), &many), WireError::Field { field: "volumes", .. }));
    // Not UTF-8.
    assert!(matches!(err(hdr(kind::GOODBYE), &[0xFF, 0xFE]), WireError::Payload { .. }));
}

#[test]
fn overlong_text_is_cut_on_a_char_boundary() {
    let reason = "é".repeat(MAX_REASON); // 2 bytes each
    let f = Frame { volume: 0, id: 0, reply: false, msg: Message::Goodbye { reason } };
    let Decoded::Frame(Frame { msg: Message::Goodbye { reason }, .. }, _) =
        decode(&encode(&f)).unwrap()
    else {
        panic!("goodbye expected");
    };
    assert_eq!(reason.len(), MAX_REASON);
}

#[test]
fn two_frames_back_to_back() {
    let frames = every_frame();
    let mut buf = BytesMut::new();
    for f in &frames {
        buf.extend_from_slice(&encode(f));
    }
    for f in &frames {
        assert_eq!(decode_buf(&mut buf).unwrap().as_ref(), Some(f));
    }
    assert!(buf.is_empty());
}

proptest::proptest! {
    /// Any bytes: an error, a frame, or "need more", never a panic (the fuzz target's property).
    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
        let _ = decode(&b);
        let _ = decode_buf(&mut BytesMut::from(&b[..]));
    }

    /// A valid header with an arbitrary payload: parsed or refused, never a panic.
    #[test]
    fn arbitrary_payloads_never_panic(
        kind in 0u16..70,
        flags in 0u16..4,
        length in proptest::num::u64::ANY,
        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
    ) {
        let h = Header { flags, length, ..hdr(kind) };
        let _ = decode(&encode_raw(&h, &payload));
    }
}
