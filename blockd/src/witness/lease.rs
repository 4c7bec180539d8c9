//! The lease table of the witness (DESIGN §7): pure, no I/O. The server feeds it requests with
//! the witness's monotonic time and persists what it says must be persisted.
//!
//! One lease exists at a time; it belongs to one node for an epoch and lasts one `term` from the
//! witness's answer. Epochs strictly increase on every change of holder, so a node that sees a
//! different epoch than the one it held knows someone else held the lease in between.
//!
//! | # | state at `now`                   | who | answer                   | epoch | persist |
//! |---|----------------------------------|-----|--------------------------|-------|---------|
//! | 1 | nobody ever held it, not quiet   | N   | Grant for `term`         | e + 1 | yes     |
//! | 2 | N holds it, unexpired            | N   | Grant (renewal)          | same  | no      |
//! | 3 | N held it, expired, nobody since | N   | Grant (renewal)          | same  | no      |
//! | 4 | H ≠ N holds it, unexpired        | N   | Refused until its expiry | -     | -       |
//! | 5 | H ≠ N held it, expired           | N   | Grant for `term`         | e + 1 | yes     |
//! | 6 | quiet (restart), N recorded      | N   | Grant (renewal)          | same  | no      |
//! | 7 | quiet (restart), H ≠ N recorded  | N   | Refused until quiet ends | -     | -       |
//!
//! "Expired" means `now >= granted + term`: the boundary instant belongs to the next holder, and
//! the client's own view of its lease ends `margin` earlier (see `client.rs`).
//!
//! **Restart.** The witness persists the holder and epoch before it answers any grant that changes
//! them (rows 1 and 5); renewals are not persisted because they change neither. So the recorded
//! holder is always the last node that was ever told it holds the lease, and its lease can have
//! been renewed at most just before the crash, so it ends at the latest one term after the restart.
//! Hence the quiet period ("quiet" above): for one full term after a start from a state file,
//! nobody *new* gets the lease (row 7). The recorded holder may renew its recorded epoch during
//! that term (row 6): no other node can hold an unexpired lease, so renewing creates no second
//! holder, and it keeps a degraded primary writing through a witness restart instead of freezing it
//! for a term. The quiet period uses the longer of the recorded term and the current one, so
//! shortening `--term` across a restart cannot shorten a lease already granted. A fresh witness (no
//! state file) has granted nothing and starts at epoch 0, not quiet.

use std::time::Duration;

use tokio::time::Instant;

/// What survives a restart: written before any grant that changes it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The last epoch given out; 0 before the first grant.
    pub epoch: u64,
    /// Who holds (or last held) `epoch`; None before the first grant.
    pub holder: Option<String>,
    /// The term leases were granted for, so a restart with a shorter term still waits the
    /// longer one.
    pub term: Duration,
}

/// A lease given (or renewed) to `holder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder: String,
    pub epoch: u64,
    /// How long the lease lasts from the witness's answer: always the term.
    pub expires_in: Duration,
    /// The epoch is new (rows 1 and 5): persist the record before answering.
    pub fresh: bool,
}

/// The lease is someone else's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The holder (or the recorded holder during the quiet period; None if there is none).
    pub holder: Option<String>,
    pub epoch: u64,
    /// Asking again this much later may succeed (if nobody renews meanwhile).
    pub retry_after: Duration,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Grant(Grant),
    Refused(Refused),
}

/// The lease table.
#[derive(Debug)]
pub struct Witness {
    term: Duration,
    epoch: u64,
    holder: Option<String>,
    /// When the holder's lease ends (witness clock). None: never granted by this process (a
    /// fresh witness, or a restarted one whose recorded holder has not renewed yet).
    expires: Option<Instant>,
    /// Before this instant only the recorded holder may be granted (rows 6 and 7).
    quiet_until: Option<Instant>,
}

impl Witness {
    /// A fresh witness: nothing was ever granted.
    pub fn new(term: Duration) -> Witness {
        Witness { term, epoch: 0, holder: None, expires: None, quiet_until: None }
    }

    /// A witness restarted at `started` from `record`: quiet for the longer of both terms.
    pub fn restored(term: Duration, record: Record, started: Instant) -> Witness {
        let quiet = term.max(record.term);
        Witness {
            term,
            epoch: record.epoch,
            holder: record.holder,
            expires: None,
            quiet_until: Some(started + quiet),
        }
    }

    pub fn term(&self) -> Duration {
        self.term
    }

    /// What to persist (after a fresh grant, before answering it).
    pub fn record(&self) -> Record {
        Record { epoch: self.epoch, holder: self.holder.clone(), term: self.term }
    }

    /// Node `node` asks for the lease at `now` (the witness's monotonic clock).
    pub fn request(&mut self, node: &str, now: Instant) -> Answer {
        let own = self.holder.as_deref() == Some(node);
        if own {
            // Rows 2, 3, 6: the holder keeps its epoch.
            return self.grant(now, false);
        }
        if let Some(quiet) = self.quiet_until.filter(|q| now < *q) {
            return self.refuse(quiet - now); // Row 7.
        }
        match self.expires {
            Some(end) if now < end => self.refuse(end - now), // Row 4.
            _ => {
                // Rows 1, 5: a new holder, a new epoch.
                self.epoch += 1;
                self.holder = Some(node.to_string());
                self.grant(now, true)
            }
        }
    }

    fn grant(&mut self, now: Instant, fresh: bool) -> Answer {
        self.expires = Some(now + self.term);
        let holder = self.holder.clone().unwrap_or_default();
        Answer::Grant(Grant { holder, epoch: self.epoch, expires_in: self.term, fresh })
    }

    fn refuse(&self, retry_after: Duration) -> Answer {
        Answer::Refused(Refused { holder: self.holder.clone(), epoch: self.epoch, retry_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    #[track_caller]
    fn granted(a: Answer, holder: &str, epoch: u64, fresh: bool) {
        let want = Grant { holder: holder.into(), epoch, expires_in: TERM, fresh };
        assert_eq!(a, Answer::Grant(want));
    }

    #[track_caller]
    fn refused(a: Answer, holder: &str, epoch: u64, retry_after: Duration) {
        let want = Refused { holder: Some(holder.into()), epoch, retry_after };
        assert_eq!(a, Answer::Refused(want));
    }

    fn record(holder: &str, epoch: u64, term: Duration) -> Record {
        Record { epoch, holder: Some(holder.into()), term }
    }

    #[test]
    fn row1_first_grant_is_epoch_1_and_persisted() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        granted(w.request("alpha", t0), "alpha", 1, true);
        assert_eq!(w.record(), record("alpha", 1, TERM));
    }

    #[test]
    fn row2_holder_renews_same_epoch_new_term() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", t0);
        granted(w.request("alpha", t0 + 9 * TERM / 10), "alpha", 1, false);
        // The renewal counts from its own answer: beta is refused until then.
        let renewed = t0 + 9 * TERM / 10;
        refused(w.request("beta", t0 + TERM), "alpha", 1, renewed + TERM - (t0 + TERM));
    }

    #[test]
    fn row3_holder_expired_gets_it_back_with_same_epoch() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", t0);
        granted(w.request("alpha", t0 + 5 * TERM), "alpha", 1, false);
    }

    #[test]
    fn row4_other_node_refused_while_unexpired() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", t0);
        refused(w.request("beta", t0), "alpha", 1, TERM);
        refused(w.request("beta", t0 + TERM - MS), "alpha", 1, MS);
        assert_eq!(w.record(), record("alpha", 1, TERM), "a refusal changes nothing");
    }

    #[test]
    fn row5_other_node_after_expiry_gets_next_epoch() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", t0);
        // Exactly at expiry the lease is the next holder's.
        granted(w.request("beta", t0 + TERM), "beta", 2, true);
        assert_eq!(w.record(), record("beta", 2, TERM));
        // And alpha, coming back, is the one refused now; after beta's term it gets epoch 3.
        refused(w.request("alpha", t0 + TERM), "beta", 2, TERM);
        granted(w.request("alpha", t0 + 2 * TERM), "alpha", 3, true);
    }

    #[test]
    fn row6_recorded_holder_renews_during_quiet() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 7, TERM), t0);
        granted(w.request("alpha", t0 + MS), "alpha", 7, false);
        // Its renewal extends past the quiet period like any renewal.
        refused(w.request("beta", t0 + TERM), "alpha", 7, MS);
    }

    #[test]
    fn row7_nobody_new_during_quiet() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 7, TERM), t0);
        refused(w.request("beta", t0), "alpha", 7, TERM);
        refused(w.request("beta", t0 + TERM - MS), "alpha", 7, MS);
        granted(w.request("beta", t0 + TERM), "beta", 8, true);
    }

    #[test]
    fn quiet_uses_the_longer_of_recorded_and_current_term() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 3, 3 * TERM), t0);
        refused(w.request("beta", t0 + 2 * TERM), "alpha", 3, TERM);
        granted(w.request("beta", t0 + 3 * TERM), "beta", 4, true);
        // The new grant uses the current term.
        let at = t0 + 3 * TERM;
        refused(w.request("alpha", at + TERM - MS), "beta", 4, MS);
    }

    #[test]
    fn restored_without_holder_is_quiet_too() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, Record { epoch: 0, holder: None, term: TERM }, t0);
        let a = w.request("beta", t0);
        assert_eq!(a, Answer::Refused(Refused { holder: None, epoch: 0, retry_after: TERM }));
        granted(w.request("beta", t0 + TERM), "beta", 1, true);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_expiry_and_renewal() {
        let mut w = Witness::new(TERM);
        granted(w.request("alpha", Instant::now()), "alpha", 1, true);
        // alpha renews every third of a term for ten terms: beta never gets it.
        for _ in 0..30 {
            tokio::time::sleep(TERM / 3).await;
            granted(w.request("alpha", Instant::now()), "alpha", 1, false);
            assert!(matches!(w.request("beta", Instant::now()), Answer::Refused(_)));
        }
        // alpha stops: beta is refused up to the last instant of the term, then granted.
        let last = Instant::now();
        tokio::time::sleep(TERM - MS).await;
        refused(w.request("beta", Instant::now()), "alpha", 1, MS);
        tokio::time::sleep(MS).await;
        assert_eq!(Instant::now() - last, TERM);
        granted(w.request("beta", Instant::now()), "beta", 2, true);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_restart_mid_failover_grants_no_second_lease() {
        // alpha holds the lease; beta waits for it. The witness restarts just after alpha's
        // last renewal: beta must wait a full term from the restart, not from before it.
        let mut w = Witness::new(TERM);
        w.request("alpha", Instant::now());
        tokio::time::sleep(TERM / 2).await;
        granted(w.request("alpha", Instant::now()), "alpha", 1, false);
        let alpha_until = Instant::now() + TERM;
        let saved = w.record();
        drop(w);
        tokio::time::sleep(TERM / 4).await;
        let mut w = Witness::restored(TERM, saved, Instant::now());
        let mut first_grant = None;
        while first_grant.is_none() {
            if let Answer::Grant(g) = w.request("beta", Instant::now()) {
                assert_eq!(g.epoch, 2);
                first_grant = Some(Instant::now());
            }
            tokio::time::sleep(100 * MS).await;
        }
        let at = first_grant.unwrap_or_else(Instant::now);
        assert!(
            at >= alpha_until,
            "beta granted {:?} before alpha's lease ended",
            alpha_until - at
        );
    }
}
