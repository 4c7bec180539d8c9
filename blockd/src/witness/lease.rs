//! The lease table of the witness (design.md §7): pure, no I/O. The server feeds it requests with
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
//! **Degraded.** Each request says whether the asker is a Primary completing writes without its
//! peer (`degraded`, None from nodes that predate the flag). The table keeps the flag of the
//! holder's last grant and reports it: a refusal says whether the holder's last grant was
//! degraded; a grant of a new epoch (rows 1, 5) whether the previous holder's was; a renewal says
//! `Some(false)` (no other node held the lease since). The flag is part of the record and so
//! persisted whenever it changes, before the grant that changed it is answered: a restarted
//! witness still knows whether its recorded holder may have acknowledged writes alone.
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
    /// The holder's last grant was asked degraded (None: unknown, e.g. a file written before
    /// the flag existed, or a node that does not send it).
    pub degraded: Option<bool>,
}

/// A lease given (or renewed) to `holder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder: String,
    pub epoch: u64,
    /// How long the lease lasts from the witness's answer: always the term.
    pub expires_in: Duration,
    /// The epoch is new (rows 1 and 5).
    pub fresh: bool,
    /// The previous holder's last grant was degraded (`Some(false)` for a renewal).
    pub prev_degraded: Option<bool>,
}

/// The lease is someone else's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The holder (or the recorded holder during the quiet period; None if there is none).
    pub holder: Option<String>,
    pub epoch: u64,
    /// Asking again this much later may succeed (if nobody renews meanwhile).
    pub retry_after: Duration,
    /// The holder's last grant was asked degraded.
    pub degraded: Option<bool>,
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
    /// The holder's last grant was asked degraded.
    degraded: Option<bool>,
}

impl Witness {
    /// A fresh witness: nothing was ever granted.
    pub fn new(term: Duration) -> Witness {
        Witness {
            term,
            epoch: 0,
            holder: None,
            expires: None,
            quiet_until: None,
            degraded: Some(false),
        }
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
            degraded: record.degraded,
        }
    }

    pub fn term(&self) -> Duration {
        self.term
    }

    /// What to persist whenever it changed (before answering the request that changed it).
    pub fn record(&self) -> Record {
        Record {
            epoch: self.epoch,
            holder: self.holder.clone(),
            term: self.term,
            degraded: self.degraded,
        }
    }

    /// Node `node`, degraded or not, asks for the lease at `now` (the witness's monotonic
    /// clock).
    pub fn request(&mut self, node: &str, degraded: Option<bool>, now: Instant) -> Answer {
        let own = self.holder.as_deref() == Some(node);
        if own {
            // Rows 2, 3, 6: the holder keeps its epoch.
            self.degraded = degraded;
            return self.grant(now, false, Some(false));
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
                let prev = std::mem::replace(&mut self.degraded, degraded);
                self.grant(now, true, prev)
            }
        }
    }

    fn grant(&mut self, now: Instant, fresh: bool, prev_degraded: Option<bool>) -> Answer {
        self.expires = Some(now + self.term);
        let holder = self.holder.clone().unwrap_or_default();
        let expires_in = self.term;
        Answer::Grant(Grant { holder, epoch: self.epoch, expires_in, fresh, prev_degraded })
    }

    fn refuse(&self, retry_after: Duration) -> Answer {
        let (holder, epoch, degraded) = (self.holder.clone(), self.epoch, self.degraded);
        Answer::Refused(Refused { holder, epoch, retry_after, degraded })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);
    /// A node that is not degraded.
    const N: Option<bool> = Some(false);

    #[track_caller]
    fn granted(a: Answer, holder: &str, epoch: u64, fresh: bool) {
        let Answer::Grant(g) = a else { panic!("want a grant, got {a:?}") };
        assert_eq!(
            (g.holder.as_str(), g.epoch, g.expires_in, g.fresh),
            (holder, epoch, TERM, fresh)
        );
    }

    #[track_caller]
    fn refused(a: Answer, holder: &str, epoch: u64, retry_after: Duration) {
        let Answer::Refused(r) = a else { panic!("want a refusal, got {a:?}") };
        assert_eq!(
            (r.holder.as_deref(), r.epoch, r.retry_after),
            (Some(holder), epoch, retry_after)
        );
    }

    fn record(holder: &str, epoch: u64, term: Duration) -> Record {
        Record { epoch, holder: Some(holder.into()), term, degraded: N }
    }

    #[test]
    fn row1_first_grant_is_epoch_1_and_persisted() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        granted(w.request("alpha", N, t0), "alpha", 1, true);
        assert_eq!(w.record(), record("alpha", 1, TERM));
    }

    #[test]
    fn row2_holder_renews_same_epoch_new_term() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", N, t0);
        granted(w.request("alpha", N, t0 + 9 * TERM / 10), "alpha", 1, false);
        // The renewal counts from its own answer: beta is refused until then.
        let renewed = t0 + 9 * TERM / 10;
        refused(w.request("beta", N, t0 + TERM), "alpha", 1, renewed + TERM - (t0 + TERM));
    }

    #[test]
    fn row3_holder_expired_gets_it_back_with_same_epoch() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", N, t0);
        granted(w.request("alpha", N, t0 + 5 * TERM), "alpha", 1, false);
    }

    #[test]
    fn row4_other_node_refused_while_unexpired() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", N, t0);
        refused(w.request("beta", N, t0), "alpha", 1, TERM);
        refused(w.request("beta", N, t0 + TERM - MS), "alpha", 1, MS);
        assert_eq!(w.record(), record("alpha", 1, TERM), "a refusal changes nothing");
    }

    #[test]
    fn row5_other_node_after_expiry_gets_next_epoch() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        w.request("alpha", N, t0);
        // Exactly at expiry the lease is the next holder's.
        granted(w.request("beta", N, t0 + TERM), "beta", 2, true);
        assert_eq!(w.record(), record("beta", 2, TERM));
        // And alpha, coming back, is the one refused now; after beta's term it gets epoch 3.
        refused(w.request("alpha", N, t0 + TERM), "beta", 2, TERM);
        granted(w.request("alpha", N, t0 + 2 * TERM), "alpha", 3, true);
    }

    #[test]
    fn row6_recorded_holder_renews_during_quiet() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 7, TERM), t0);
        granted(w.request("alpha", N, t0 + MS), "alpha", 7, false);
        // Its renewal extends past the quiet period like any renewal.
        refused(w.request("beta", N, t0 + TERM), "alpha", 7, MS);
    }

    #[test]
    fn row7_nobody_new_during_quiet() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 7, TERM), t0);
        refused(w.request("beta", N, t0), "alpha", 7, TERM);
        refused(w.request("beta", N, t0 + TERM - MS), "alpha", 7, MS);
        granted(w.request("beta", N, t0 + TERM), "beta", 8, true);
    }

    #[test]
    fn quiet_uses_the_longer_of_recorded_and_current_term() {
        let t0 = Instant::now();
        let mut w = Witness::restored(TERM, record("alpha", 3, 3 * TERM), t0);
        refused(w.request("beta", N, t0 + 2 * TERM), "alpha", 3, TERM);
        granted(w.request("beta", N, t0 + 3 * TERM), "beta", 4, true);
        // The new grant uses the current term.
        let at = t0 + 3 * TERM;
        refused(w.request("alpha", N, at + TERM - MS), "beta", 4, MS);
    }

    #[test]
    fn restored_without_holder_is_quiet_too() {
        let t0 = Instant::now();
        let r = Record { epoch: 0, holder: None, term: TERM, degraded: N };
        let mut w = Witness::restored(TERM, r, t0);
        let a = w.request("beta", N, t0);
        let want = Refused { holder: None, epoch: 0, retry_after: TERM, degraded: N };
        assert_eq!(a, Answer::Refused(want));
        granted(w.request("beta", N, t0 + TERM), "beta", 1, true);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_expiry_and_renewal() {
        let mut w = Witness::new(TERM);
        granted(w.request("alpha", N, Instant::now()), "alpha", 1, true);
        // alpha renews every third of a term for ten terms: beta never gets it.
        for _ in 0..30 {
            tokio::time::sleep(TERM / 3).await;
            granted(w.request("alpha", N, Instant::now()), "alpha", 1, false);
            assert!(matches!(w.request("beta", N, Instant::now()), Answer::Refused(_)));
        }
        // alpha stops: beta is refused up to the last instant of the term, then granted.
        let last = Instant::now();
        tokio::time::sleep(TERM - MS).await;
        refused(w.request("beta", N, Instant::now()), "alpha", 1, MS);
        tokio::time::sleep(MS).await;
        assert_eq!(Instant::now() - last, TERM);
        granted(w.request("beta", N, Instant::now()), "beta", 2, true);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_restart_mid_failover_grants_no_second_lease() {
        // alpha holds the lease; beta waits for it. The witness restarts just after alpha's
        // last renewal: beta must wait a full term from the restart, not from before it.
        let mut w = Witness::new(TERM);
        w.request("alpha", N, Instant::now());
        tokio::time::sleep(TERM / 2).await;
        granted(w.request("alpha", N, Instant::now()), "alpha", 1, false);
        let alpha_until = Instant::now() + TERM;
        let saved = w.record();
        drop(w);
        tokio::time::sleep(TERM / 4).await;
        let mut w = Witness::restored(TERM, saved, Instant::now());
        let mut first_grant = None;
        while first_grant.is_none() {
            if let Answer::Grant(g) = w.request("beta", N, Instant::now()) {
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

    fn flags(a: &Answer) -> Option<bool> {
        match a {
            Answer::Grant(g) => g.prev_degraded,
            Answer::Refused(r) => r.degraded,
        }
    }

    #[test]
    fn the_holders_degraded_flag_is_reported_to_the_other_node_and_recorded() {
        let mut w = Witness::new(TERM);
        let t0 = Instant::now();
        assert_eq!(flags(&w.request("alpha", N, t0)), N, "a first grant follows nobody");
        assert_eq!(flags(&w.request("beta", N, t0)), N, "alpha mirrors: not degraded");
        // alpha loses beta and renews as degraded: beta learns it, and it is on record.
        assert_eq!(flags(&w.request("alpha", Some(true), t0 + MS)), N, "a renewal");
        assert_eq!(w.record().degraded, Some(true));
        assert_eq!(flags(&w.request("beta", N, t0 + 2 * MS)), Some(true));
        // After alpha's term the grant to beta still says alpha's last grant was degraded.
        let g = w.request("beta", N, t0 + MS + TERM);
        assert!(matches!(g, Answer::Grant(Grant { epoch: 2, .. })), "{g:?}");
        assert_eq!(flags(&g), Some(true));
        assert_eq!(w.record().degraded, N, "beta's own grant was not degraded");
        // A node that does not send the flag: unknown, reported as such.
        let g = w.request("alpha", None, t0 + MS + 2 * TERM);
        assert_eq!(flags(&g), N);
        assert_eq!(flags(&w.request("beta", N, t0 + MS + 2 * TERM)), None);
    }

    #[test]
    fn a_restarted_witness_reports_the_recorded_flag() {
        let t0 = Instant::now();
        let rec = Record { degraded: Some(true), ..record("alpha", 7, TERM) };
        let mut w = Witness::restored(TERM, rec, t0);
        assert_eq!(flags(&w.request("beta", N, t0)), Some(true), "quiet: alpha's flag");
        assert_eq!(flags(&w.request("beta", N, t0 + TERM)), Some(true), "and in the grant");
    }
}
