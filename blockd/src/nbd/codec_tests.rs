//! Unit tests of the codec, on bytes alone. Test names cite NBD-NOTES sections.

use super::*;
use crate::nbd::proto::{cflag, REQUEST_MAGIC};

const MIB: u32 = 1 << 20;

fn header(option: u32, length: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u64(proto::IHAVEOPT);
    b.put_u32(option);
    b.put_u32(length);
    b
}

fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name);
    d.put_u16(infos.len() as u16);
    for i in infos {
        d.put_u16(*i);
    }
    d
}

fn fixed() -> HaggleState {
    HaggleState {
        client: ClientFlags { fixed_newstyle: true, no_zeroes: true },
        ..HaggleState::default()
    }
}

fn view() -> ExportView {
    ExportView { size: 1 << 30, max_request: 32 * MIB }
}

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request { flags, kind, cookie: 0xdead_beef_0000_0001, offset, length }
}

fn rejected(v: Verdict) -> Rejection {
    match v {
        Verdict::Reject(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

// --- §1 wire formats and partial frames ----------------------------------------------------

#[test]
fn s2_1_greeting_offers_fixed_newstyle_and_no_zeroes() {
    let mut b = Vec::new();
    encode_greeting(&mut b);
    assert_eq!(b.len(), proto::GREETING_LEN);
    assert_eq!(&b[..8], b"NBDMAGIC");
    assert_eq!(&b[8..16], b"IHAVEOPT");
    assert_eq!(u16_at(&b, 16), hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
}

#[test]
fn s2_1_client_flags_partial_needs_more() {
    assert_eq!(decode_client_flags(&[0, 0, 0]), Ok(Decoded::NeedMore(4)));
    assert_eq!(decode_client_flags(&[]), Ok(Decoded::NeedMore(4)));
}

#[test]
fn s2_1_client_flags_known_bits() {
    let both = (cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES).to_be_bytes();
    assert_eq!(
        decode_client_flags(&both),
        Ok(Decoded::Frame(ClientFlags { fixed_newstyle: true, no_zeroes: true }))
    );
    // A client without FIXED_NEWSTYLE is not an unknown flag (interop).
    assert_eq!(decode_client_flags(&[0; 4]), Ok(Decoded::Frame(ClientFlags::default())));
}

#[test]
fn s2_1_unknown_client_flags_drop_the_connection() {
    for bad in [1u32 << 2, 1 << 31, 0xffff_ffff] {
        assert_eq!(decode_client_flags(&bad.to_be_bytes()), Err(CodecError::ClientFlags(bad)));
    }
}

#[test]
fn s2_1_option_header_partial_needs_more() {
    let h = header(opt::GO, 10);
    for cut in 0..h.len() {
        assert_eq!(decode_option_header(&h[..cut]), Ok(Decoded::NeedMore(16)), "cut at {cut}");
    }
    assert_eq!(
        decode_option_header(&h),
        Ok(Decoded::Frame(OptionHeader { option: opt::GO, length: 10 }))
    );
}

#[test]
fn s2_1_option_bad_magic_is_a_violation() {
    let mut h = header(opt::GO, 0);
    h[0] ^= 1;
    assert!(matches!(decode_option_header(&h), Err(CodecError::OptionMagic(_))));
}

#[test]
fn s2_1_option_length_is_bounded() {
    let ok = header(opt::GO, MAX_OPTION_DATA);
    assert!(matches!(decode_option_header(&ok), Ok(Decoded::Frame(_))));
    let huge = header(99, MAX_OPTION_DATA + 1);
    assert_eq!(
        decode_option_header(&huge),
        Err(CodecError::OptionTooLong { option: 99, length: MAX_OPTION_DATA + 1 })
    );
    assert!(decode_option_header(&header(opt::LIST, u32::MAX)).is_err());
}

// --- §2.1/2.2 option decisions --------------------------------------------------------------

#[test]
fn s2_1_unknown_option_is_unsup_not_a_hangup() {
    for o in [0, opt::PEEK_EXPORT, 12, 0xffff_ffff] {
        assert!(matches!(
            classify_option(o, b"abc", &fixed()),
            OptionAction::Reply { reply: rep::ERR_UNSUP, .. }
        ));
    }
}

#[test]
fn s2_1_without_fixed_newstyle_only_export_name() {
    let st = HaggleState::default();
    assert_eq!(classify_option(opt::EXPORT_NAME, b"vol", &st), OptionAction::ExportName(b"vol"));
    for o in [opt::GO, opt::LIST, opt::ABORT, 42] {
        assert!(matches!(classify_option(o, &[], &st), OptionAction::Disconnect(_)));
    }
}

#[test]
fn s2_1_options_without_data_reject_data_with_invalid() {
    for o in [opt::LIST, opt::STRUCTURED_REPLY, opt::STARTTLS] {
        assert!(
            matches!(
                classify_option(o, b"x", &fixed()),
                OptionAction::Reply { reply: rep::ERR_INVALID, .. }
            ),
            "option {o}"
        );
    }
}

#[test]
fn s2_2_list_abort_structured() {
    assert_eq!(classify_option(opt::LIST, &[], &fixed()), OptionAction::List);
    assert_eq!(classify_option(opt::ABORT, &[], &fixed()), OptionAction::Abort);
    assert_eq!(
        classify_option(opt::STRUCTURED_REPLY, &[], &fixed()),
        OptionAction::EnableStructured
    );
    let st = HaggleState { structured: true, ..fixed() };
    assert!(matches!(
        classify_option(opt::STRUCTURED_REPLY, &[], &st),
        OptionAction::Reply { reply: rep::ERR_INVALID, .. }
    ));
}

#[test]
fn s2_2_starttls_is_policy_never_tls_reqd() {
    assert!(matches!(
        classify_option(opt::STARTTLS, &[], &fixed()),
        OptionAction::Reply { reply: rep::ERR_POLICY, .. }
    ));
}

#[test]
fn s2_2_meta_context_invalid_before_structured_unsup_after() {
    let after = HaggleState { structured: true, ..fixed() };
    for o in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
        assert!(matches!(
            classify_option(o, b"data", &fixed()),
            OptionAction::Reply { reply: rep::ERR_INVALID, .. }
        ));
        assert!(matches!(
            classify_option(o, b"data", &after),
            OptionAction::Reply { reply: rep::ERR_UNSUP, .. }
        ));
    }
}

#[test]
fn s2_2_extended_headers_unsup() {
    assert!(matches!(
        classify_option(opt::EXTENDED_HEADERS, &[], &fixed()),
        OptionAction::Reply { reply: rep::ERR_UNSUP, .. }
    ));
}

#[test]
fn s2_2_info_and_go_parse_name_and_types() {
    let d = info_data(b"vol", &[info::BLOCK_SIZE, 77]);
    let want = InfoRequest { name: b"vol", requested: vec![info::BLOCK_SIZE, 77] };
    assert_eq!(
        classify_option(opt::GO, &d, &fixed()),
        OptionAction::Info { request: want.clone(), go: true }
    );
    assert_eq!(
        classify_option(opt::INFO, &d, &fixed()),
        OptionAction::Info { request: want, go: false }
    );
    let empty = info_data(b"", &[]);
    assert_eq!(parse_info_request(&empty), Ok(InfoRequest { name: b"", requested: vec![] }));
}

#[test]
fn s2_2_info_name_length_beyond_data_is_invalid() {
    let mut d = info_data(b"vol", &[]);
    d[3] = 4; // claims 4 name bytes, but only 3 + count follow
    assert!(parse_info_request(&d).is_err());
    d[0] = 0xff; // absurd length must not overflow
    assert!(parse_info_request(&d).is_err());
    for short in [&[][..], &[0, 0, 0, 0, 0][..]] {
        assert!(parse_info_request(short).is_err());
    }
    assert!(matches!(
        classify_option(opt::GO, &d, &fixed()),
        OptionAction::Reply { reply: rep::ERR_INVALID, .. }
    ));
}

#[test]
fn s2_2_info_count_must_match_length() {
    let mut d = info_data(b"v", &[1, 2]);
    d.pop(); // one byte short of the second type
    assert!(parse_info_request(&d).is_err());
    let mut d = info_data(b"v", &[1]);
    d.push(0); // a stray byte
    assert!(parse_info_request(&d).is_err());
}

#[test]
fn s2_1_shutdown_answers_err_shutdown_except_abort() {
    let st = HaggleState { shutting_down: true, ..fixed() };
    for o in [opt::GO, opt::LIST, opt::INFO, 99] {
        assert!(matches!(
            classify_option(o, &[], &st),
            OptionAction::Reply { reply: rep::ERR_SHUTDOWN, .. }
        ));
    }
    assert_eq!(classify_option(opt::ABORT, &[], &st), OptionAction::Abort);
    assert!(matches!(classify_option(opt::EXPORT_NAME, b"v", &st), OptionAction::Disconnect(_)));
}

// --- §2.2 option reply encodings ------------------------------------------------------------

#[test]
fn s2_2_info_export_is_12_bytes() {
    let mut b = Vec::new();
    encode_info_export(&mut b, opt::GO, 0x1234_5678_9abc, TRANSMISSION_FLAGS);
    assert_eq!(b.len(), 20 + 12);
    assert_eq!(u64_at(&b, 0), proto::REPLY_MAGIC);
    assert_eq!(u32_at(&b, 8), opt::GO);
    assert_eq!(u32_at(&b, 12), rep::INFO);
    assert_eq!(u32_at(&b, 16), 12);
    assert_eq!(u16_at(&b, 20), info::EXPORT);
    assert_eq!(u64_at(&b, 22), 0x1234_5678_9abc);
    assert_eq!(u16_at(&b, 30), TRANSMISSION_FLAGS);
}

#[test]
fn s2_3_info_block_size_is_14_bytes() {
    let mut b = Vec::new();
    let sizes = BlockSizes { minimum: 1, preferred: 4096, maximum: 32 * MIB };
    encode_info_block_size(&mut b, opt::INFO, sizes);
    assert_eq!(b.len(), 20 + 14);
    assert_eq!(u32_at(&b, 16), 14);
    assert_eq!(u16_at(&b, 20), info::BLOCK_SIZE);
    assert_eq!((u32_at(&b, 22), u32_at(&b, 26), u32_at(&b, 30)), (1, 4096, 32 * MIB));
}

#[test]
fn s2_2_list_server_reply_names_the_export() {
    let mut b = Vec::new();
    encode_rep_server(&mut b, opt::LIST, "mariadb");
    assert_eq!(u32_at(&b, 12), rep::SERVER);
    assert_eq!(u32_at(&b, 16), 4 + 7);
    assert_eq!(u32_at(&b, 20), 7);
    assert_eq!(&b[24..], b"mariadb");
    let mut n = Vec::new();
    encode_info_name(&mut n, opt::GO, "mariadb");
    assert_eq!((u32_at(&n, 16), u16_at(&n, 20)), (9, info::NAME));
    assert_eq!(&n[22..], b"mariadb");
}

#[test]
fn s2_2_export_name_reply_zeroes_unless_no_zeroes() {
    let mut with = Vec::new();
    encode_export_name_reply(&mut with, 4096, TRANSMISSION_FLAGS, false);
    assert_eq!(with.len(), 10 + 124);
    assert!(with[10..].iter().all(|&b| b == 0));
    let mut without = Vec::new();
    encode_export_name_reply(&mut without, 4096, TRANSMISSION_FLAGS, true);
    assert_eq!(without.len(), 10);
    assert_eq!(u64_at(&without, 0), 4096);
}

#[test]
fn s2_2_option_error_reply_carries_message() {
    let mut b = Vec::new();
    encode_option_reply(&mut b, opt::GO, rep::ERR_UNKNOWN, b"no such export");
    assert_eq!(u32_at(&b, 12), rep::ERR_UNKNOWN);
    assert_eq!(u32_at(&b, 16) as usize, b"no such export".len());
    assert_eq!(&b[20..], b"no such export");
}

// --- §2.4 transmission flags ----------------------------------------------------------------

#[test]
fn s2_4_transmission_flags_are_exactly_the_implemented_ones() {
    assert_eq!(TRANSMISSION_FLAGS, 0b1_0110_1101);
    for never in [
        tflag::READ_ONLY,
        tflag::ROTATIONAL,
        tflag::SEND_DF,
        tflag::SEND_RESIZE,
        tflag::SEND_CACHE,
        tflag::SEND_FAST_ZERO,
        tflag::BLOCK_STATUS_PAYLOAD,
    ] {
        assert_eq!(TRANSMISSION_FLAGS & never, 0);
    }
}

// --- §2.5 requests --------------------------------------------------------------------------

#[test]
fn s2_5_request_partial_needs_more_and_roundtrips() {
    let r = req(cmd::WRITE, cmdflag::FUA, 0x0102_0304_0506_0708, 4096);
    let mut b = Vec::new();
    encode_request(&mut b, &r);
    assert_eq!(b.len(), 28);
    for cut in 0..28 {
        assert_eq!(decode_request(&b[..cut]), Ok(Decoded::NeedMore(28)));
    }
    b.extend_from_slice(&[7; 100]); // payload after the header is not the decoder's business
    assert_eq!(decode_request(&b), Ok(Decoded::Frame(r)));
}

#[test]
fn s2_5_bad_request_magic_is_a_violation() {
    let mut b = Vec::new();
    encode_request(&mut b, &req(cmd::READ, 0, 0, 512));
    b[0..4].copy_from_slice(&(REQUEST_MAGIC ^ 1).to_be_bytes());
    assert_eq!(decode_request(&b), Err(CodecError::RequestMagic(REQUEST_MAGIC ^ 1)));
}

#[test]
fn s2_5_valid_commands_run() {
    let v = view();
    assert_eq!(
        validate(&req(cmd::READ, 0, 512, 4096), &v),
        Verdict::Run(Command::Read { offset: 512, len: 4096 })
    );
    assert_eq!(
        validate(&req(cmd::WRITE, cmdflag::FUA, 0, 4096), &v),
        Verdict::Run(Command::Write { offset: 0, len: 4096, fua: true })
    );
    assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &v), Verdict::Run(Command::Flush));
    assert_eq!(
        validate(&req(cmd::TRIM, 0, 4096, 8192), &v),
        Verdict::Run(Command::Trim { offset: 4096, len: 8192, fua: false })
    );
    assert_eq!(
        validate(&req(cmd::WRITE_ZEROES, cmdflag::NO_HOLE, 1, 10), &v),
        Verdict::Run(Command::WriteZeroes { offset: 1, len: 10, punch: false, fua: false })
    );
    assert_eq!(
        validate(&req(cmd::WRITE_ZEROES, 0, 1, 10), &v),
        Verdict::Run(Command::WriteZeroes { offset: 1, len: 10, punch: true, fua: false })
    );
    assert_eq!(validate(&req(cmd::DISC, 0, 0, 0), &v), Verdict::Run(Command::Disc));
}

#[test]
fn s2_5_fua_is_valid_on_every_command() {
    let v = view();
    for kind in [cmd::READ, cmd::WRITE, cmd::FLUSH, cmd::TRIM, cmd::WRITE_ZEROES] {
        let len = if kind == cmd::FLUSH { 0 } else { 512 };
        assert!(
            matches!(validate(&req(kind, cmdflag::FUA, 0, len), &v), Verdict::Run(_)),
            "{kind}"
        );
    }
}

#[test]
fn s2_5_unknown_and_unoffered_commands_are_einval() {
    for kind in [cmd::CACHE, cmd::BLOCK_STATUS, cmd::RESIZE, 9, 0xffff] {
        let r = rejected(validate(&req(kind, 0, 0, 512), &view()));
        assert_eq!((r.error, r.discard), (errno::EINVAL, 0), "command {kind}");
    }
}

#[test]
fn s2_5_flags_not_valid_for_the_command_are_einval() {
    let cases = [
        (cmd::WRITE, cmdflag::NO_HOLE),
        (cmd::WRITE, cmdflag::DF),
        (cmd::READ, cmdflag::DF), // DF was not offered
        (cmd::READ, cmdflag::REQ_ONE),
        (cmd::TRIM, cmdflag::NO_HOLE),
        (cmd::WRITE_ZEROES, cmdflag::FAST_ZERO), // §2.9: never offered, never accepted
        (cmd::FLUSH, cmdflag::NO_HOLE),
        (cmd::READ, cmdflag::PAYLOAD_LEN),
        (cmd::READ, 1 << 15),
    ];
    for (kind, flags) in cases {
        let r = rejected(validate(&req(kind, flags, 0, 512), &view()));
        assert_eq!(r.error, errno::EINVAL, "command {kind} flags {flags:#x}");
        let want_discard = if kind == cmd::WRITE { 512 } else { 0 };
        assert_eq!(r.discard, want_discard, "a rejected WRITE's payload is still consumed");
    }
}

// --- §2.6/2.7 bounds ------------------------------------------------------------------------

#[test]
fn s2_7_read_and_trim_beyond_end_are_einval() {
    let v = view();
    for kind in [cmd::READ, cmd::TRIM] {
        assert_eq!(rejected(validate(&req(kind, 0, v.size - 512, 1024), &v)).error, errno::EINVAL);
        assert_eq!(rejected(validate(&req(kind, 0, v.size + 1, 0), &v)).error, errno::EINVAL);
    }
}

#[test]
fn s2_7_write_and_zeroes_beyond_end_are_enospc() {
    let v = view();
    let w = rejected(validate(&req(cmd::WRITE, 0, v.size - 512, 1024), &v));
    assert_eq!((w.error, w.discard), (errno::ENOSPC, 1024));
    let z = rejected(validate(&req(cmd::WRITE_ZEROES, 0, v.size, 1), &v));
    assert_eq!((z.error, z.discard), (errno::ENOSPC, 0));
}

#[test]
fn s2_6_bounds_are_overflow_safe() {
    let v = view();
    let off = u64::MAX - 511; // 2^64 - 512
    assert_eq!(rejected(validate(&req(cmd::READ, 0, off, 1024), &v)).error, errno::EINVAL);
    assert_eq!(rejected(validate(&req(cmd::WRITE, 0, off, 1024), &v)).error, errno::ENOSPC);
    assert_eq!(rejected(validate(&req(cmd::TRIM, 0, off, u32::MAX), &v)).error, errno::EINVAL);
    assert_eq!(
        rejected(validate(&req(cmd::WRITE_ZEROES, 0, u64::MAX, 1), &v)).error,
        errno::ENOSPC
    );
}

#[test]
fn s2_6_request_ending_exactly_at_the_end_is_fine() {
    let v = view();
    assert!(matches!(validate(&req(cmd::READ, 0, v.size - 4096, 4096), &v), Verdict::Run(_)));
    assert!(matches!(validate(&req(cmd::WRITE, 0, v.size - 1, 1), &v), Verdict::Run(_)));
}

#[test]
fn s2_5_zero_length_requests_succeed_without_io() {
    let v = view();
    assert_eq!(validate(&req(cmd::READ, 0, 0, 0), &v), Verdict::Run(Command::Empty { read: true }));
    for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
        assert_eq!(
            validate(&req(kind, 0, v.size, 0), &v),
            Verdict::Run(Command::Empty { read: false })
        );
    }
}

// --- §2.3 size limits -----------------------------------------------------------------------

#[test]
fn s2_3_32mib_read_and_write_are_accepted() {
    let v = view();
    assert!(matches!(validate(&req(cmd::READ, 0, 0, 32 * MIB), &v), Verdict::Run(_)));
    assert!(matches!(validate(&req(cmd::WRITE, 0, 0, 32 * MIB), &v), Verdict::Run(_)));
}

#[test]
fn s2_3_over_max_payload_is_einval_and_write_payload_discarded() {
    let v = view();
    let r = rejected(validate(&req(cmd::READ, 0, 0, 32 * MIB + 1), &v));
    assert_eq!((r.error, r.discard), (errno::EINVAL, 0));
    let w = rejected(validate(&req(cmd::WRITE, 0, 0, 48 * MIB), &v));
    assert_eq!((w.error, w.discard), (errno::EINVAL, 48 * MIB));
    // Also when it is beyond the end: the size limit is reported, the payload still consumed.
    let w = rejected(validate(&req(cmd::WRITE, 0, v.size, WRITE_DISCARD_LIMIT), &v));
    assert_eq!(w.discard, WRITE_DISCARD_LIMIT);
}

#[test]
fn s2_3_absurd_write_payload_hangs_up() {
    let v = view();
    let r = req(cmd::WRITE, 0, 0, WRITE_DISCARD_LIMIT + 1);
    assert!(matches!(validate(&r, &v), Verdict::Disconnect(_)));
    assert!(matches!(validate(&req(cmd::WRITE, 0, 0, u32::MAX), &v), Verdict::Disconnect(_)));
}

#[test]
fn s2_3_trim_and_zeroes_may_exceed_max_payload() {
    let v = ExportView { size: 8 << 30, ..view() };
    assert!(matches!(validate(&req(cmd::TRIM, 0, 0, u32::MAX), &v), Verdict::Run(_)));
    assert!(matches!(validate(&req(cmd::WRITE_ZEROES, 0, 0, 512 * MIB), &v), Verdict::Run(_)));
}

// --- §2.5 replies ---------------------------------------------------------------------------

fn encoded(h: ReplyHead) -> Vec<u8> {
    let mut b = Vec::new();
    h.encode(&mut b);
    assert_eq!(b.len(), h.encoded_len());
    b
}

#[test]
fn s2_5_simple_reply_echoes_cookie() {
    let b = encoded(ReplyHead::Simple { cookie: 0x0102_0304_0506_0708, error: errno::ENOSPC });
    assert_eq!(b.len(), 16);
    assert_eq!(u32_at(&b, 0), proto::SIMPLE_REPLY_MAGIC);
    assert_eq!(u32_at(&b, 4), 28);
    assert_eq!(u64_at(&b, 8), 0x0102_0304_0506_0708);
}

#[test]
fn s2_5_structured_read_is_one_offset_data_chunk_with_done() {
    let b = encoded(ReplyHead::Data { cookie: 9, offset: 4096, len: 512 });
    assert_eq!(u32_at(&b, 0), proto::STRUCTURED_REPLY_MAGIC);
    assert_eq!((u16_at(&b, 4), u16_at(&b, 6)), (chunk::FLAG_DONE, chunk::OFFSET_DATA));
    assert_eq!(u64_at(&b, 8), 9);
    assert_eq!(u32_at(&b, 16), 8 + 512);
    assert_eq!(u64_at(&b, 20), 4096);
}

#[test]
fn s2_5_structured_error_chunk_with_message() {
    let b = encoded(ReplyHead::Error { cookie: 3, error: errno::EIO, message: "I/O error" });
    assert_eq!((u16_at(&b, 4), u16_at(&b, 6)), (chunk::FLAG_DONE, chunk::ERROR));
    assert_eq!(u32_at(&b, 16), 6 + 9);
    assert_eq!(u32_at(&b, 20), errno::EIO);
    assert_eq!(u16_at(&b, 24), 9);
    assert_eq!(&b[26..], b"I/O error");
    let long = "é".repeat(100); // truncated on a character boundary
    let b = encoded(ReplyHead::Error { cookie: 3, error: errno::EIO, message: long.leak() });
    let n = usize::from(u16_at(&b, 24));
    assert!(n <= MAX_ERROR_MESSAGE);
    assert!(std::str::from_utf8(&b[26..26 + n]).is_ok());
}

#[test]
fn s2_5_structured_done_chunk_for_empty_read() {
    let b = encoded(ReplyHead::Done { cookie: 5 });
    assert_eq!((u16_at(&b, 4), u16_at(&b, 6), u32_at(&b, 16)), (chunk::FLAG_DONE, chunk::NONE, 0));
}
