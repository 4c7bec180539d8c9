//! The resync decision of the handshake (design.md §5): from both nodes' [`Generations`], who holds
//! the newer data, or whether no direction is safe at all. Pure: `node.rs` `exchange` calls
//! [`plan`], the role machine takes its [`SyncDecision`].

use crate::meta::Generations;

/// What the handshake concludes from two nodes' generations, seen from "mine".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data generation: nothing to copy.
    InSync,
    /// My data is newer: I send, the peer receives.
    Source,
    /// The peer's data is newer: it sends, I receive (and am `Inconsistent` until done).
    Target,
    /// Both went on writing from a common ancestor: no direction is safe, refuse and report.
    SplitBrain,
    /// No common generation: refuse unless the operator asks for a full sync.
    Unrelated,
}

impl SyncDecision {
    /// The same decision seen from the peer: `Source` ↔ `Target`, the rest unchanged.
    pub fn mirror(self) -> SyncDecision {
        match self {
            SyncDecision::Source => SyncDecision::Target,
            SyncDecision::Target => SyncDecision::Source,
            SyncDecision::InSync => SyncDecision::InSync,
            SyncDecision::SplitBrain => SyncDecision::SplitBrain,
            SyncDecision::Unrelated => SyncDecision::Unrelated,
        }
    }
}

/// Decides the direction of a resync from my and the peer's generations.
///
/// The first row that matches wins. Rows 2–4 and 5–7 are each checked as a pair, mine and the
/// peer's side together, so that `decide(a, b) == decide(b, a).mirror()` holds for every input:
/// evaluating "I am ahead" before "the peer is ahead" one at a time would let both nodes claim
/// `Source` when both hold.
///
/// | row | condition                                                          | decision     |
/// |-----|--------------------------------------------------------------------|--------------|
/// | 0   | either `current` is 0 (no generation at all)                       | `Unrelated`  |
/// | 1   | `mine.current == peer.current`                                     | `InSync`     |
/// | 2   | `mine.bitmap == peer.current`, not row 3's condition               | `Source`     |
/// | 3   | `peer.bitmap == mine.current`, not row 2's condition               | `Target`     |
/// | 4   | rows 2 and 3 both (each went on from the other's id: a loop)       | `SplitBrain` |
/// | 5   | `mine.history` holds `peer.current`, not row 6's condition         | `Source`     |
/// | 6   | `peer.history` holds `mine.current`, not row 5's condition         | `Target`     |
/// | 7   | rows 5 and 6 both                                                  | `SplitBrain` |
/// | 8   | `mine.bitmap == peer.bitmap != 0` (both went on from one ancestor) | `SplitBrain` |
/// | 9   | anything else                                                      | `Unrelated`  |
///
/// Where each row comes from: row 1 is two nodes in sync (also two fresh volumes, both at
/// [`ZEROES`](crate::meta::ZEROES)); row 2 is a primary that wrote while its peer was away, or the
/// survivor promoted after the primary crashed (the returning old primary gets row 3); rows 5/6
/// are a resync whose end the source persisted but the target did not (the source's bitmap id
/// is already history); row 8 is two nodes both promoted while partitioned.
pub fn decide(mine: &Generations, peer: &Generations) -> SyncDecision {
    if mine.current == 0 || peer.current == 0 {
        return SyncDecision::Unrelated;
    }
    if mine.current == peer.current {
        return SyncDecision::InSync;
    }
    if let Some(d) = pair(mine.bitmap == peer.current, peer.bitmap == mine.current) {
        return d;
    }
    if let Some(d) = pair(mine.history_has(peer.current), peer.history_has(mine.current)) {
        return d;
    }
    if mine.bitmap != 0 && mine.bitmap == peer.bitmap {
        return SyncDecision::SplitBrain;
    }
    SyncDecision::Unrelated
}

/// One symmetric pair of rows: "I am ahead of the peer" and "the peer is ahead of me".
fn pair(i_am_ahead: bool, peer_is_ahead: bool) -> Option<SyncDecision> {
    match (i_am_ahead, peer_is_ahead) {
        (true, false) => Some(SyncDecision::Source),
        (false, true) => Some(SyncDecision::Target),
        (true, true) => Some(SyncDecision::SplitBrain),
        (false, false) => None,
    }
}

/// What an operator asked a node to give up at its next handshake (`blockctl resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Resolve {
    #[default]
    None,
    /// After a split brain: this node's changes lose; it receives the union of both bitmaps.
    DiscardLocal,
    /// Unrelated data (or a split brain): this node receives the whole device.
    FullSync,
}

/// One node's side of a handshake, besides its generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side<'a> {
    pub name: &'a str,
    /// Its dirty bitmap marks something.
    pub dirty: bool,
    pub primary: bool,
    /// It was Primary when it last stopped (cleanly or not).
    pub primary_when_stopped: bool,
    pub resolve: Resolve,
}

/// The handshake's conclusion: the direction, and whether the whole device is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub decision: SyncDecision,
    pub full: bool,
}

/// The whole handshake decision: [`decide`] on generations, then what the bitmaps and the
/// operator add. First matching row wins; every row has its mirror, so both nodes agree:
///
/// | row | condition                                                   | plan                |
/// |-----|-------------------------------------------------------------|---------------------|
/// | a   | `SplitBrain`, only I resolve (discard-local or full-sync)   | `Target` (full if full-sync) |
/// | b   | `SplitBrain`, only the peer resolves                        | `Source` (full if it asked)  |
/// | c   | `Unrelated`, only I asked full-sync                         | `Target`, full      |
/// | d   | `Unrelated`, only the peer asked full-sync                  | `Source`, full      |
/// | e   | `InSync`, a bitmap marks something (a crash of the primary) | the Primary, else the one that was Primary when it stopped, else the lower name, is `Source` |
/// | f   | otherwise                                                   | `decide` as is      |
///
/// Row e is design.md §5's "equal → resync the union of bitmaps after a crash, from the
/// primary-at-crash": the crashed primary's activity-log extents are in its bitmap, and which
/// copy of those ranges wins does not matter as long as both end up equal; the primary's is
/// what its clients last read. Resolving when both nodes ask to lose is refused (rows a/b
/// need exactly one).
pub fn plan(mine: &Generations, me: Side<'_>, peer: &Generations, them: Side<'_>) -> Plan {
    let decision = decide(mine, peer);
    let keep = Plan { decision, full: false };
    let (i_give, they_give) = (me.resolve != Resolve::None, them.resolve != Resolve::None);
    match decision {
        SyncDecision::SplitBrain => match (i_give, they_give) {
            (true, false) => {
                Plan { decision: SyncDecision::Target, full: me.resolve == Resolve::FullSync }
            }
            (false, true) => {
                Plan { decision: SyncDecision::Source, full: them.resolve == Resolve::FullSync }
            }
            _ => keep,
        },
        SyncDecision::Unrelated => {
            match (me.resolve == Resolve::FullSync, them.resolve == Resolve::FullSync) {
                (true, false) => Plan { decision: SyncDecision::Target, full: true },
                (false, true) => Plan { decision: SyncDecision::Source, full: true },
                _ => keep,
            }
        }
        SyncDecision::InSync if me.dirty || them.dirty => {
            let i_send = match (me.primary, them.primary) {
                (true, false) => true,
                (false, true) => false,
                _ => match (me.primary_when_stopped, them.primary_when_stopped) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => me.name < them.name,
                },
            };
            let decision = if i_send { SyncDecision::Source } else { SyncDecision::Target };
            Plan { decision, full: false }
        }
        SyncDecision::InSync | SyncDecision::Source | SyncDecision::Target => keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ZEROES;
    use SyncDecision::*;

    fn g(current: u64, bitmap: u64, history: [u64; 2]) -> Generations {
        Generations { current, bitmap, history }
    }

    /// Checks `decide` both ways, so every row test also checks its mirror.
    fn check(mine: Generations, peer: Generations, want: SyncDecision) {
        assert_eq!(decide(&mine, &peer), want, "decide({mine:?}, {peer:?})");
        assert_eq!(decide(&peer, &mine), want.mirror(), "decide({peer:?}, {mine:?})");
    }

    #[test]
    fn row0_no_generation_is_unrelated() {
        check(g(0, 0, [0, 0]), g(0, 0, [0, 0]), Unrelated);
        check(g(0, 5, [6, 0]), g(5, 0, [0, 0]), Unrelated);
    }

    #[test]
    fn row1_equal_current_is_in_sync() {
        check(g(7, 0, [3, 2]), g(7, 0, [3, 2]), InSync);
        check(g(ZEROES, 0, [0, 0]), g(ZEROES, 0, [0, 0]), InSync);
        // A primary that crashed while connected and came back before anything else happened:
        // in sync by generations (`plan` row e then resyncs its activity-log extents).
        check(g(7, 0, [3, 0]), g(7, 0, [3, 0]), InSync);
    }

    #[test]
    fn row2_i_am_ahead_is_source() {
        check(g(8, 7, [3, 0]), g(7, 0, [3, 0]), Source);
        check(g(8, ZEROES, [0, 0]), g(ZEROES, 0, [0, 0]), Source);
    }

    #[test]
    fn row3_peer_ahead_is_target() {
        check(g(7, 0, [3, 0]), g(8, 7, [3, 0]), Target);
    }

    /// design.md §5 "after a crash of the primary": A was Primary at 7 and crashed, B was promoted
    /// alone (rotate: 9 over 7); A returns and must receive.
    #[test]
    fn row3_returning_crashed_primary_is_target() {
        let a = g(7, 0, [3, 0]);
        let mut b = a;
        b.rotate(9);
        check(a, b, Target);
    }

    #[test]
    fn row4_each_ahead_of_the_other_is_split_brain() {
        check(g(8, 7, [0, 0]), g(7, 8, [0, 0]), SplitBrain);
    }

    /// The source persisted the end of a resync (bitmap id 7 moved to history), the target
    /// crashed before persisting its own: the target is still at 7.
    #[test]
    fn row5_peer_in_my_history_is_source() {
        check(g(8, 0, [7, 3]), g(7, 0, [3, 0]), Source);
        check(g(8, 0, [5, 7]), g(7, 0, [3, 0]), Source);
    }

    #[test]
    fn row6_me_in_peer_history_is_target() {
        check(g(7, 0, [3, 0]), g(8, 0, [7, 3]), Target);
    }

    #[test]
    fn row7_each_in_the_others_history_is_split_brain() {
        check(g(8, 0, [7, 0]), g(7, 0, [8, 0]), SplitBrain);
    }

    /// Both nodes promoted while partitioned: both rotated away from 7.
    #[test]
    fn row8_same_bitmap_different_current_is_split_brain() {
        let mut a = g(7, 0, [3, 0]);
        let mut b = a;
        a.rotate(8);
        b.rotate(9);
        check(a, b, SplitBrain);
    }

    #[test]
    fn row9_nothing_in_common_is_unrelated() {
        check(g(8, 0, [0, 0]), g(9, 0, [0, 0]), Unrelated);
        // A volume whose backing existed before blockd (random id) and a fresh one.
        check(g(8, 0, [0, 0]), g(ZEROES, 0, [0, 0]), Unrelated);
        // Same history but no generation of one held by the other: still no safe direction.
        check(g(8, 5, [3, 0]), g(9, 6, [3, 0]), Unrelated);
    }

    /// `decide(a, b)` mirrors `decide(b, a)` for every pair of generations built from a small
    /// pool of ids (0, ZEROES and two others), which covers every equality pattern the table
    /// looks at: 256 × 256 pairs.
    #[test]
    fn decide_is_symmetric_exhaustively() {
        let pool = [0, ZEROES, 7, 9];
        let all: Vec<Generations> = (0..256usize)
            .map(|i| {
                let p = |k: usize| pool[(i >> (2 * k)) & 3];
                g(p(0), p(1), [p(2), p(3)])
            })
            .collect();
        for a in &all {
            for b in &all {
                assert_eq!(decide(a, b), decide(b, a).mirror(), "{a:?} vs {b:?}");
            }
        }
    }

    fn side(name: &str) -> Side<'_> {
        Side {
            name,
            dirty: false,
            primary: false,
            primary_when_stopped: false,
            resolve: Resolve::None,
        }
    }

    /// `plan` seen from both nodes: directions mirror, `full` agrees.
    fn check_plan(
        a: (Generations, Side<'_>),
        b: (Generations, Side<'_>),
        want: SyncDecision,
        full: bool,
    ) {
        let p = plan(&a.0, a.1, &b.0, b.1);
        assert_eq!(p, Plan { decision: want, full }, "{a:?} vs {b:?}");
        let q = plan(&b.0, b.1, &a.0, a.1);
        assert_eq!(q, Plan { decision: want.mirror(), full }, "{b:?} vs {a:?}");
    }

    #[test]
    fn plan_row_a_b_split_brain_resolved_by_the_loser() {
        let (a, b) = (g(8, 7, [0, 0]), g(9, 7, [0, 0]));
        let loser = Side { resolve: Resolve::DiscardLocal, ..side("beta") };
        check_plan((b, loser), (a, side("alpha")), Target, false);
        let full = Side { resolve: Resolve::FullSync, ..side("beta") };
        check_plan((b, full), (a, side("alpha")), Target, true);
        // Both asking to lose is no answer.
        check_plan(
            (b, loser),
            (a, Side { resolve: Resolve::DiscardLocal, ..side("alpha") }),
            SplitBrain,
            false,
        );
        // Without a resolve, still refused.
        check_plan((b, side("beta")), (a, side("alpha")), SplitBrain, false);
    }

    #[test]
    fn plan_row_c_d_unrelated_needs_full_sync_not_discard() {
        let (a, b) = (g(8, 0, [0, 0]), g(9, 0, [0, 0]));
        let full = Side { resolve: Resolve::FullSync, ..side("beta") };
        check_plan((b, full), (a, side("alpha")), Target, true);
        let discard = Side { resolve: Resolve::DiscardLocal, ..side("beta") };
        check_plan((b, discard), (a, side("alpha")), Unrelated, false);
    }

    #[test]
    fn plan_row_e_in_sync_with_bitmap_resyncs_from_the_primary_at_crash() {
        let x = g(7, 0, [3, 0]);
        let crashed = Side { dirty: true, primary_when_stopped: true, ..side("beta") };
        check_plan((x, crashed), (x, side("alpha")), Source, false);
        // A Primary now wins over the one that was Primary before.
        let now = Side { primary: true, ..side("alpha") };
        check_plan((x, crashed), (x, now), Target, false);
        // Neither: the lower name sends.
        let dirty = Side { dirty: true, ..side("beta") };
        check_plan((x, dirty), (x, side("alpha")), Target, false);
        // Clean bitmaps on both: nothing to do.
        check_plan((x, side("beta")), (x, side("alpha")), InSync, false);
    }

    #[test]
    fn plan_row_f_generations_decide_the_rest() {
        let dirty = Side { dirty: true, resolve: Resolve::DiscardLocal, ..side("beta") };
        check_plan((g(8, 7, [0, 0]), dirty), (g(7, 0, [0, 0]), side("alpha")), Source, false);
    }

    proptest::proptest! {
        /// Same property over arbitrary ids, with equalities forced in by drawing from few ids.
        #[test]
        fn decide_is_symmetric(
            ids in proptest::collection::vec(0u64..6, 8),
            big in proptest::num::u64::ANY,
        ) {
            let id = |v: u64| if v == 5 { big } else { v };
            let a = g(id(ids[0]), id(ids[1]), [id(ids[2]), id(ids[3])]);
            let b = g(id(ids[4]), id(ids[5]), [id(ids[6]), id(ids[7])]);
            proptest::prop_assert_eq!(decide(&a, &b), decide(&b, &a).mirror());
        }
    }
}
