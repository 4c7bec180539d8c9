//! Handshake tests: `serve` over a duplex pipe with a real volume. Names cite NBD-NOTES sections.

use std::time::Duration;

use tempfile::TempDir;

use crate::{
    nbd::{
        codec::TRANSMISSION_FLAGS,
        proto::{cflag, cmd, hflag, info, opt, rep},
        testkit::{connect, info_data, volume, Client, OptReply},
        Exports, Limits,
    },
    role::Role,
};

use std::sync::Arc;

const SIZE: u64 = 8 << 20;
const FIXED: u32 = cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES;

fn exports(role: Role) -> (TempDir, Arc<Exports>) {
    let dir = tempfile::tempdir().unwrap();
    let vols = vec![volume(&dir, "vol", SIZE, role), volume(&dir, "other", SIZE / 2, role)];
    (dir, Arc::new(Exports::new(vols, Some("vol"))))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// (size, flags) from the INFO_EXPORT reply among `r`.
fn export_info(r: &[OptReply]) -> (u64, u16) {
    let e = r.iter().find(|r| r.kind == rep::INFO && be16(&r.data, 0) == info::EXPORT).unwrap();
    assert_eq!(e.data.len(), 12, "INFO_EXPORT is exactly 12 bytes [M]");
    (be64(&e.data, 2), be16(&e.data, 10))
}

fn info_of(r: &[OptReply], kind: u16) -> Vec<u8> {
    r.iter().find(|r| r.kind == rep::INFO && be16(&r.data, 0) == kind).unwrap().data[2..].to_vec()
}

async fn expect_reply(c: &mut Client, option: u32, kind: u32) -> OptReply {
    let r = c.reply().await;
    assert_eq!((r.option, r.kind), (option, kind), "reply {r:?}");
    r
}

#[tokio::test]
async fn s2_1_greeting_then_go_sends_infos_ack_and_no_padding() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    assert_eq!(conn.c.greeting().await, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
    // Without NO_ZEROES: GO must still not send the 124 zero bytes (§2.2).
    conn.c.send(&cflag::FIXED_NEWSTYLE.to_be_bytes()).await;
    let r = conn.c.info(opt::GO, "vol", &[info::BLOCK_SIZE, 0x7777]).await;
    assert!(r[..r.len() - 1].iter().all(|r| r.kind == rep::INFO && r.option == opt::GO));
    assert_eq!(r.last().unwrap().kind, rep::ACK);
    assert_eq!(export_info(&r), (SIZE, TRANSMISSION_FLAGS));
    assert_eq!(info_of(&r, info::NAME), b"vol");
    let bs = info_of(&r, info::BLOCK_SIZE);
    assert_eq!((be32(&bs, 0), be32(&bs, 4), be32(&bs, 8)), (1, 4096, 32 << 20), "§2.3");
    // The very next bytes are a reply to a request: no padding came before it.
    let (err, data) = conn.c.read(7, 0, 512).await;
    assert_eq!((err, data), (0, vec![0; 512]));
}

#[tokio::test]
async fn s2_2_info_then_go_report_the_same_size_and_flags() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    let i = conn.c.info(opt::INFO, "other", &[]).await;
    assert_eq!(i.last().unwrap().kind, rep::ACK);
    let g = conn.c.info(opt::GO, "other", &[]).await;
    assert_eq!(export_info(&i), export_info(&g));
    assert_eq!(export_info(&g), (SIZE / 2, TRANSMISSION_FLAGS));
}

#[tokio::test]
async fn s2_2_go_unknown_export_is_err_unknown_and_connection_stays_usable() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    let r = conn.c.info(opt::GO, "nope", &[]).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, rep::ERR_UNKNOWN);
    let r = conn.c.info(opt::INFO, "\u{ff}bad", &[]).await;
    assert_eq!(r[0].kind, rep::ERR_UNKNOWN);
    // The default export "" is "vol".
    let r = conn.c.info(opt::GO, "", &[]).await;
    assert_eq!(export_info(&r).0, SIZE);
    assert_eq!(info_of(&r, info::NAME), b"vol");
}

#[tokio::test]
async fn s2_2_info_name_length_beyond_data_is_err_invalid() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    let mut d = info_data(b"vol", &[]);
    d[3] = 200;
    conn.c.option(opt::GO, &d).await;
    expect_reply(&mut conn.c, opt::GO, rep::ERR_INVALID).await;
    conn.c.go_after_start("vol").await;
}

#[tokio::test]
async fn s2_2_list_names_every_export_then_ack() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    conn.c.option(opt::LIST, &[]).await;
    let r = conn.c.replies().await;
    assert_eq!(r.len(), 3);
    let names: Vec<&[u8]> = r[..2].iter().map(|r| &r.data[4..]).collect();
    assert_eq!(names, [&b"vol"[..], b"other"]);
    assert!(r[..2]
        .iter()
        .all(|r| r.kind == rep::SERVER && be32(&r.data, 0) as usize == r.data.len() - 4));
    assert_eq!(r[2].kind, rep::ACK);
    conn.c.option(opt::LIST, b"junk").await;
    expect_reply(&mut conn.c, opt::LIST, rep::ERR_INVALID).await;
}

#[tokio::test]
async fn s2_2_export_name_sends_zeroes_unless_no_zeroes() {
    let (_dir, ex) = exports(Role::Primary);
    for (flags, zeroes) in
        [(cflag::FIXED_NEWSTYLE, 124), (FIXED, 0), (0, 124), (cflag::NO_ZEROES, 0)]
    {
        let mut conn = connect(&ex, Limits::default());
        conn.c.start(flags).await;
        conn.c.option(opt::EXPORT_NAME, b"other").await;
        assert_eq!(conn.c.u64().await, SIZE / 2);
        assert_eq!(conn.c.u16().await, TRANSMISSION_FLAGS);
        assert_eq!(conn.c.bytes(zeroes).await, vec![0; zeroes]);
        // Transmission follows directly.
        assert_eq!(conn.c.read(1, 0, 16).await, (0, vec![0; 16]));
    }
}

#[tokio::test]
async fn s2_2_export_name_unknown_hangs_up() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    conn.c.option(opt::EXPORT_NAME, b"nope").await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_1_unknown_client_flags_hang_up() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED | 1 << 5).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_1_non_fixed_client_other_option_hangs_up() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(0).await;
    conn.c.option(opt::LIST, &[]).await;
    conn.c.expect_eof().await;
}

#[tokio::test]
async fn s2_1_unknown_and_unimplemented_options_are_answered_and_data_consumed() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    let c = &mut conn.c;
    c.option(0x4242, &[0xaa; 300]).await;
    expect_reply(c, 0x4242, rep::ERR_UNSUP).await;
    c.option(opt::PEEK_EXPORT, &[]).await;
    expect_reply(c, opt::PEEK_EXPORT, rep::ERR_UNSUP).await;
    c.option(opt::STARTTLS, &[]).await;
    expect_reply(c, opt::STARTTLS, rep::ERR_POLICY).await;
    c.option(opt::EXTENDED_HEADERS, &[]).await;
    expect_reply(c, opt::EXTENDED_HEADERS, rep::ERR_UNSUP).await;
    c.option(opt::SET_META_CONTEXT, &[0; 8]).await;
    expect_reply(c, opt::SET_META_CONTEXT, rep::ERR_INVALID).await;
    c.option(opt::STRUCTURED_REPLY, &[1]).await;
    expect_reply(c, opt::STRUCTURED_REPLY, rep::ERR_INVALID).await;
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    expect_reply(c, opt::STRUCTURED_REPLY, rep::ACK).await;
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    expect_reply(c, opt::STRUCTURED_REPLY, rep::ERR_INVALID).await;
    c.option(opt::LIST_META_CONTEXT, &[0; 8]).await;
    expect_reply(c, opt::LIST_META_CONTEXT, rep::ERR_UNSUP).await;
    c.go_after_start("vol").await;
}

#[tokio::test]
async fn s2_1_absurd_option_length_hangs_up() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    let mut h = Vec::new();
    h.extend_from_slice(&crate::nbd::proto::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&(64u32 << 20).to_be_bytes());
    conn.c.send(&h).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_2_abort_acks_then_closes() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    conn.c.option(opt::ABORT, &[]).await;
    expect_reply(&mut conn.c, opt::ABORT, rep::ACK).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_2_abort_client_gone_before_reply_is_fine() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    conn.c.option(opt::ABORT, &[]).await;
    drop(conn.c);
    tokio::time::timeout(super::super::testkit::WAIT, conn.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn s3_secondary_refuses_go_and_info_with_policy_naming_the_node() {
    let (_dir, ex) = exports(Role::Secondary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    for option in [opt::INFO, opt::GO] {
        let r = conn.c.info(option, "vol", &[]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, rep::ERR_POLICY);
        let msg = String::from_utf8(r[0].data.clone()).unwrap();
        assert!(msg.contains("alpha") && msg.contains("Secondary"), "message: {msg}");
    }
    conn.c.option(opt::EXPORT_NAME, b"vol").await;
    conn.c.expect_eof().await;
}

#[tokio::test]
async fn s2_2_too_many_connections_is_policy() {
    let (_dir, ex) = exports(Role::Primary);
    let limits = Limits { max_connections: 1, ..Limits::default() };
    let mut first = connect(&ex, limits.clone());
    first.c.go("vol", false).await;
    let mut second = connect(&ex, limits.clone());
    second.c.start(FIXED).await;
    let r = second.c.info(opt::GO, "vol", &[]).await;
    assert_eq!(r[0].kind, rep::ERR_POLICY);
    // INFO does not take a slot.
    assert_eq!(second.c.info(opt::INFO, "vol", &[]).await.last().unwrap().kind, rep::ACK);
    second.c.option(opt::EXPORT_NAME, b"vol").await;
    second.c.expect_eof().await;
    // Another export is counted separately.
    let mut other = connect(&ex, limits.clone());
    other.c.go("other", false).await;
    // Once the first client leaves, its slot is free again.
    first.c.request(cmd::DISC, 0, 0, 0, 0).await;
    first.c.expect_eof().await;
    first.finished().await;
    let mut third = connect(&ex, limits);
    third.c.go("vol", false).await;
}

#[tokio::test]
async fn s2_1_handshake_is_bounded_by_the_timeout() {
    let (_dir, ex) = exports(Role::Primary);
    let limits = Limits { handshake_timeout: Duration::from_millis(100), ..Limits::default() };
    let mut conn = connect(&ex, limits);
    conn.c.greeting().await; // and then say nothing
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_8_shutdown_during_haggling_answers_err_shutdown() {
    let (_dir, ex) = exports(Role::Primary);
    let mut conn = connect(&ex, Limits::default());
    conn.c.start(FIXED).await;
    conn.c.option(opt::LIST, &[]).await;
    conn.c.replies().await; // the server is now waiting for the next option
    conn.shutdown.cancel();
    conn.c.option(opt::GO, &info_data(b"vol", &[])).await;
    expect_reply(&mut conn.c, opt::GO, rep::ERR_SHUTDOWN).await;
    conn.c.option(opt::ABORT, &[]).await;
    expect_reply(&mut conn.c, opt::ABORT, rep::ACK).await;
    conn.c.expect_eof().await;
    conn.finished().await;
}

#[tokio::test]
async fn s2_8_shutdown_with_idle_haggler_does_not_wait_for_the_timeout() {
    let (_dir, ex) = exports(Role::Primary);
    let limits = Limits { handshake_timeout: Duration::from_secs(3600), ..Limits::default() };
    let mut conn = connect(&ex, limits);
    conn.c.start(FIXED).await;
    conn.shutdown.cancel();
    conn.c.expect_eof().await;
    conn.finished().await;
}
