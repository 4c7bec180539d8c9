//! The session reader's reads of big records (`session.rs`, `Reader::tune_low_water`): a
//! record that arrives in pieces is reassembled whole, the low-water mark it raises comes down
//! again for a small record behind it, and a big record still trickling in keeps the session
//! up past `peer_timeout`, and every big write's payload arrives on a page boundary. Real TCP on 127.0.0.1, the fake peer writing the raw records.

use super::*;

fn big(id: u64, len: usize) -> Frame {
    let data = Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    Frame { volume: 0, id, reply: false, msg: Message::Write { offset: 8 << 20, data } }
}

async fn expect_request(a: &mut Node, want: &Message) -> Message {
    match next(a).await {
        LinkEvent::Request { msg, reply, .. } => {
            assert!(&msg == want, "request changed on the way");
            reply.send(Message::Ack { error: 0 });
            msg
        }
        e => panic!("expected the request, got {e:?}"),
    }
}

/// A write's payload as received starts on a page boundary: the Secondary writes it with
/// direct I/O where it lies (`Reader::place_big_record`).
fn assert_page_aligned(msg: &Message) {
    let Message::Write { data, .. } = msg else { panic!("not a write: {msg:?}") };
    let at = data.as_ptr() as usize % crate::storage::buf::BUF_ALIGN;
    assert_eq!(at, 0, "payload of {} bytes at {at} past a page boundary", data.len());
}

/// A 2 MiB write in five pieces, the last ending inside the next record's length prefix; then,
/// after a pause, that small record's rest alone: it must not wait for a mark meant for the
/// big one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_record_in_pieces_is_reassembled_and_a_small_one_follows() {
    let (ca, cb) = pair();
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let (mut f, _) = fake_peer(&cb.0).await.unwrap();
    let _sa = up(&mut a).await;
    let first = big(1, 2 << 20);
    let small = Frame { volume: 0, id: 2, reply: false, msg: write4k() };
    let mut stream = f.ch.tx.seal(&first).unwrap().to_vec();
    let cut = stream.len() + 2;
    stream.extend_from_slice(&f.ch.tx.seal(&small).unwrap());
    let step = cut / 5 + 1;
    let mut at = 0;
    while at < cut {
        let end = (at + step).min(cut);
        f.s.write_all(&stream[at..end]).await.unwrap();
        at = end;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_page_aligned(&expect_request(&mut a, &first.msg).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.s.write_all(&stream[cut..]).await.unwrap();
    expect_request(&mut a, &small.msg).await;
}

/// Big records back to back in one burst, of sizes that leave each next one at another offset
/// of the reader's buffer: every payload still arrives whole and page aligned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_records_back_to_back_each_arrive_page_aligned() {
    let (ca, cb) = pair();
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let (mut f, _) = fake_peer(&cb.0).await.unwrap();
    let _sa = up(&mut a).await;
    let frames: Vec<Frame> = [1 << 20, (512 << 10) + 4096, 1 << 20, 300 << 10]
        .iter()
        .zip(1..)
        .map(|(&n, id)| big(id, n))
        .collect();
    let mut stream = Vec::new();
    for fr in &frames {
        stream.extend_from_slice(&f.ch.tx.seal(fr).unwrap());
    }
    f.s.write_all(&stream).await.unwrap();
    for fr in &frames {
        assert_page_aligned(&expect_request(&mut a, &fr.msg).await);
    }
}

/// A 1 MiB write trickling in over about twice `peer_timeout`: bytes that arrive without
/// waking the reader (the raised mark) still count as hearing from the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_record_trickling_in_keeps_the_session_up() {
    let (mut ca, cb) = pair();
    ca.0.peer_timeout = Duration::from_millis(400);
    let mut a = run(ca, Tuning { higher_dial_delay: WAIT * 10, ..fast() });
    let (mut f, _) = fake_peer(&cb.0).await.unwrap();
    let sa = up(&mut a).await;
    let first = big(1, 1 << 20);
    let rec = f.ch.tx.seal(&first).unwrap();
    for piece in rec.chunks(rec.len() / 8 + 1) {
        f.s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_request(&mut a, &first.msg).await;
    assert!(sa.is_open(), "{:?}", sa.reason());
}
