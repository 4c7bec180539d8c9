use bytes::{Bytes, BytesMut};

use super::*;
use crate::replication::wire::Message;

fn pair(p: Protection) -> (Sealer, Opener) {
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let ours = Channel::new(&a, &b, p);
    let theirs = Channel::new(&b, &a, p);
    (ours.tx, theirs.rx)
}

fn write(i: u8) -> Frame {
    let data = Bytes::from(vec![0xC3 ^ i; 4096]);
    Frame { volume: 1, id: u64::from(i), reply: false, msg: Message::Write { offset: 4096, data } }
}

fn open_all(rx: &mut Opener, bytes: &[u8]) -> Result<Vec<Frame>, RecordError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = rx.open(&mut buf, MAX_BODY)? {
        out.push(f);
    }
    Ok(out)
}

#[test]
fn frames_round_trip_in_both_modes() {
    for p in [Protection::Encrypt, Protection::AuthOnly] {
        let (mut tx, mut rx) = pair(p);
        let frames: Vec<Frame> = (0..5).map(write).collect();
        let wire: Vec<u8> = frames.iter().flat_map(|f| tx.seal(f).unwrap().to_vec()).collect();
        // Fed a byte at a time as well as at once.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &wire {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = rx.open(&mut buf, MAX_BODY).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames, "{p:?}");
    }
}

#[test]
fn the_cipher_hides_the_payload_and_auth_only_does_not() {
    let pattern = [0xC3u8; 64];
    let contains = |rec: &[u8]| rec.windows(64).any(|w| w == pattern);
    let (mut tx, _) = pair(Protection::Encrypt);
    assert!(!contains(&tx.seal(&write(0)).unwrap()), "plaintext visible with encryption on");
    let (mut tx, _) = pair(Protection::AuthOnly);
    assert!(contains(&tx.seal(&write(0)).unwrap()), "auth-only must send the data as is");
}

/// Every way of changing the stream fails authentication at the changed record, and the
/// records before it are delivered intact.
#[test]
fn flipped_dropped_duplicated_reordered_or_foreign_records_fail() {
    for p in [Protection::Encrypt, Protection::AuthOnly] {
        let (mut tx, _) = pair(p);
        let recs: Vec<Vec<u8>> = (0..3).map(|i| tx.seal(&write(i)).unwrap().to_vec()).collect();
        let (mut other, _) = {
            let o = Channel::new(&[9u8; 32], &[2u8; 32], p);
            (o.tx, o.rx)
        };
        let foreign = other.seal(&write(1)).unwrap().to_vec();
        let mut flipped = recs[1].clone();
        flipped[LEN_LEN + 100] ^= 0x01;
        let mut flipped_len = recs[1].clone();
        flipped_len[3] ^= 0x01;
        let cases: Vec<(&str, Vec<&[u8]>)> = vec![
            ("flipped", vec![&recs[0], &flipped, &recs[2]]),
            ("dropped", vec![&recs[0], &recs[2]]),
            ("duplicated", vec![&recs[0], &recs[0], &recs[1]]),
            ("reordered", vec![&recs[0], &recs[2], &recs[1]]),
            ("foreign", vec![&recs[0], &foreign]),
        ];
        for (what, stream) in cases {
            let (_, mut rx) = pair(p);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut err = None;
            for r in stream {
                buf.extend_from_slice(r);
                loop {
                    match rx.open(&mut buf, MAX_BODY) {
                        Ok(Some(f)) => got.push(f),
                        Ok(None) => break,
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                if err.is_some() {
                    break;
                }
            }
            assert_eq!(err, Some(RecordError::Auth), "{p:?} {what}");
            assert_eq!(got, vec![write(0)], "{p:?} {what}: only the record before it");
        }
        // A changed length prefix: the record is cut elsewhere and fails too.
        let (_, mut rx) = pair(p);
        let mut stream = recs[0].clone();
        stream.extend_from_slice(&flipped_len);
        stream.extend_from_slice(&recs[2]);
        stream.extend_from_slice(&[0u8; 64]);
        assert_eq!(open_all(&mut rx, &stream), Err(RecordError::Auth), "{p:?} length");
    }
}

#[test]
fn a_long_record_is_refused_before_it_is_reserved() {
    let (_, mut rx) = pair(Protection::Encrypt);
    let mut buf = BytesMut::from(&(32u32 << 20).to_be_bytes()[..]);
    let r = rx.open(&mut buf, 4096);
    assert!(matches!(r, Err(RecordError::TooLong { len, max: 4096 }) if len == 32 << 20), "{r:?}");
    assert!(buf.capacity() < 64 << 10, "reserved {} bytes", buf.capacity());
}

#[test]
fn both_sides_rekey_at_the_same_record() {
    let (mut tx, mut rx) = pair(Protection::Encrypt);
    tx.dir.n = REKEY_EVERY - 1;
    rx.dir.n = REKEY_EVERY - 1;
    let recs: Vec<Vec<u8>> = (0..3).map(|i| tx.seal(&write(i)).unwrap().to_vec()).collect();
    assert_eq!(open_all(&mut rx, &recs.concat()).unwrap().len(), 3);
    // The rekeyed key is another key: the same nonce and plaintext seal differently.
    let (a, mut b) = (Direction::new(&[1u8; 32]), Direction::new(&[1u8; 32]));
    b.rekey();
    let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
    let ta = a.key.seal_in_place_separate_tag(nonce(5), Aad::empty(), &mut x).unwrap();
    let tb = b.key.seal_in_place_separate_tag(nonce(5), Aad::empty(), &mut y).unwrap();
    assert_ne!((x, ta.as_ref()), (y, tb.as_ref()));
}
