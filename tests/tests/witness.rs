//! The lease witness (design.md §7) as a real `blockd witness` process in its own network
//! namespace, asked by the library's `LeaseClient` from two node namespaces: one holder at a
//! time, a new holder only after a silent term, a restarted witness that gives the lease to
//! nobody new for a full term, authentication, and a corrupt state file.

use std::{fs, os::unix::fs::PermissionsExt, time::Duration};

use blockd::witness::{Lease, WitnessError};
use blockd_tests::witness::{write_secret, WitnessNet};
use tokio::time::Instant;

const TERM: Duration = Duration::from_secs(2);
const TERM_ARG: &str = "2s";
/// How often a waiting node asks again.
const POLL: Duration = Duration::from_millis(50);
/// Start-up and scheduling slack on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// Calls `ask` every [`POLL`] until it grants; every refusal must name `holder` and `epoch`.
/// Returns when the grant arrived and the lease.
fn first_grant(
    holder: &str,
    epoch: u64,
    mut ask: impl FnMut() -> Result<Lease, WitnessError>,
) -> (Instant, Lease) {
    let deadline = Instant::now() + 5 * TERM;
    loop {
        match ask() {
            Ok(lease) => return (Instant::now(), lease),
            Err(WitnessError::Refused { holder: h, epoch: e, retry_after, .. }) => {
                assert_eq!((h.as_deref(), e), (Some(holder), epoch), "refusal names the holder");
                assert!(retry_after <= TERM, "retry after {retry_after:?}");
            }
            Err(e) => panic!("witness failed: {e}"),
        }
        assert!(Instant::now() < deadline, "no grant within {:?}", 5 * TERM);
        std::thread::sleep(POLL);
    }
}

#[test]
fn lease_moves_only_after_a_silent_term_and_survives_a_witness_restart() {
    let mut net = WitnessNet::create("witness-lease", 2);
    net.start(TERM_ARG);
    let secret = fs::read(&net.secret).unwrap();
    let (alpha, beta) = (net.client("alpha", &secret), net.client("beta", &secret));

    // alpha gets epoch 1 and renews every quarter term for three terms; beta is refused.
    let mut a = net.acquire(0, &alpha).expect("alpha gets the first lease");
    assert_eq!((a.epoch, a.term), (1, TERM));
    let until = Instant::now() + 3 * TERM;
    let mut refusals = 0;
    while Instant::now() < until {
        a = net.renew(0, &alpha, &a).expect("alpha renews");
        assert!(a.is_valid(Instant::now()));
        match net.acquire(1, &beta) {
            Err(WitnessError::Refused { holder, epoch: 1, .. }) => {
                assert_eq!(holder.as_deref(), Some("alpha"));
                refusals += 1;
            }
            other => panic!("beta got {other:?} while alpha renews"),
        }
        std::thread::sleep(TERM / 4);
    }
    assert!(refusals >= 8, "only {refusals} rounds");

    // alpha stops renewing: beta gets epoch 2 a term after alpha's last renewal was sent, not
    // before, and alpha's own view of its lease ended earlier still.
    let a_sent = Instant::now();
    a = net.renew(0, &alpha, &a).expect("last renewal");
    let (b_at, b) = first_grant("alpha", 1, || net.acquire(1, &beta));
    assert_eq!(b.epoch, 2);
    let waited = b_at - a_sent;
    assert!(waited >= TERM, "beta got the lease {waited:?} after alpha's last renewal");
    assert!(waited <= TERM + SLACK, "beta waited {waited:?}, far more than a term");
    assert!(a.valid_until + alpha.margin(TERM) <= b_at);
    assert!(!a.is_valid(b_at));

    // beta renews; the witness is SIGKILLed right after and restarted half a term later.
    // A fresh witness would grant alpha at once; this one refuses everyone new for a full
    // term from its restart, although beta's lease ended before that.
    let b = net.renew(1, &beta, &b).expect("beta renews");
    net.kill();
    std::thread::sleep(TERM / 2);
    let restarted = Instant::now();
    net.start(TERM_ARG);
    let (a_at, a3) = first_grant("beta", 2, || net.acquire(0, &alpha));
    assert_eq!(a3.epoch, 3, "a new holder, the next epoch (the last one survived the crash)");
    let quiet = a_at - restarted;
    assert!(quiet >= TERM, "alpha got the lease {quiet:?} after the restart");
    assert!(quiet <= TERM + SLACK, "alpha waited {quiet:?}");
    assert!(!b.is_valid(a_at));

    // Restarted again while alpha holds epoch 3: the recorded holder renews at once, beta
    // stays refused.
    let a3 = net.renew(0, &alpha, &a3).expect("alpha renews");
    net.kill();
    net.start(TERM_ARG);
    let a3 = net.renew(0, &alpha, &a3).expect("recorded holder renews during the quiet term");
    assert_eq!(a3.epoch, 3);
    let refused = net.acquire(1, &beta).expect_err("beta during the quiet term");
    assert!(refused.is_refused(), "{refused}");

    // A few MiB: the witness after all of the above. Most of VmRSS is pages of the binary
    // (a debug build here); its own memory is RssAnon.
    let (rss, anon) = net.memory_kib();
    eprintln!("witness memory: VmRSS {rss} KiB, of which RssAnon {anon} KiB");
    assert!(anon < 4 * 1024, "witness RssAnon {anon} KiB");
    assert!(rss < 16 * 1024, "witness VmRSS {rss} KiB");
    net.stop();
    let logs = net.logs();
    for line in ["lease epoch 1 granted to alpha", "lease epoch 2 granted to beta"] {
        assert!(logs.contains(line), "log lacks {line:?}:\n{logs}");
    }
    assert!(logs.contains("no new holder for 2s"), "{logs}");
}

#[test]
fn wrong_secret_is_refused_and_grants_nothing() {
    let mut net = WitnessNet::create("witness-auth", 2);
    net.start(TERM_ARG);
    let impostor = net.client("alpha", b"not the cluster's secret\n");
    match net.acquire(0, &impostor) {
        Err(WitnessError::Denied { reason, .. }) => {
            assert!(reason.contains("authentication failed"), "{reason}")
        }
        other => panic!("impostor got {other:?}"),
    }
    // The refused attempt left no trace: beta gets epoch 1 at once.
    let secret = fs::read(&net.secret).unwrap();
    let lease = net.acquire(1, &net.client("beta", &secret)).expect("beta");
    assert_eq!(lease.epoch, 1);
    net.stop();
    assert!(net.logs().contains("failed authentication"), "{}", net.logs());
}

#[test]
fn corrupt_state_or_open_secret_refuses_to_start() {
    let mut net = WitnessNet::create("witness-corrupt", 1);
    // A state file cut short (not what an atomic rename leaves, but what a bad disk might).
    fs::write(&net.state, "{\"format\":\"blockd-witness-state\",\"version\":1,\"epo").unwrap();
    let (status, log) = net.start_expecting_exit(TERM_ARG, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{log}");
    let path = net.state.display().to_string();
    for needle in [path.as_str(), "is corrupt", "refusing to start", "move the file away"] {
        assert!(log.contains(needle), "message lacks {needle:?}:\n{log}");
    }
    let secret = fs::read(&net.secret).unwrap();
    let e = net.acquire(0, &net.client("alpha", &secret)).expect_err("nothing listens");
    assert!(matches!(e, WitnessError::Connect { .. }), "{e}");

    // A secret others may read is a configuration error (exit 2), as for the daemon.
    fs::remove_file(&net.state).unwrap();
    let secret_path = net.secret.clone();
    write_secret(&secret_path, &secret);
    fs::set_permissions(&secret_path, fs::Permissions::from_mode(0o644)).unwrap();
    let (status, log) = net.start_expecting_exit(TERM_ARG, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    assert!(!net.state.exists(), "no state written by a witness that did not start");
}
