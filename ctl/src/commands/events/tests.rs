//! The change detection and the line formats of `blockctl events`.

use blockd::control::{ConnState, DiskState, ResyncProgress, Role};

use super::*;
use crate::commands::fake;

fn node(volumes: Vec<VolumeStatus>) -> NodeStatus {
    NodeStatus { node: "a".into(), version: "t".into(), volumes }
}

/// `(field, from, to)` of each change, for compact assertions.
fn brief(changes: &[Change]) -> Vec<(&'static str, String, String)> {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    changes.iter().map(|c| (c.field.name(), show(&c.from), show(&c.to))).collect()
}

fn t(field: &'static str, from: &str, to: &str) -> (&'static str, String, String) {
    (field, from.into(), to.into())
}

#[test]
fn first_poll_reports_the_state_as_initial() {
    let mut w = Watch::default();
    let v = fake::volume(DiskState::UpToDate, ConnState::Connected, Role::Secondary, None);
    let changes = w.observe("a", Ok(&node(vec![v])));
    assert!(changes.iter().all(|c| c.initial), "{changes:?}");
    assert_eq!(
        brief(&changes),
        vec![
            t("daemon", "none", "running"),
            t("role", "none", "Secondary"),
            t("disk", "none", "UpToDate"),
            t("conn", "none", "Connected"),
            t("peer_role", "none", "none"),
            t("peer_disk", "none", "UpToDate"),
            t("resync", "none", "idle"),
            t("clients", "none", "0"),
        ]
    );
    assert_eq!(changes[1].volume.as_deref(), Some("v"));
    assert_eq!(changes[0].volume, None);
}

#[test]
fn only_changes_are_reported_and_survive_a_lost_daemon() {
    let mut w = Watch::default();
    let mut v = fake::volume(DiskState::UpToDate, ConnState::Connected, Role::Secondary, None);
    w.observe("a", Ok(&node(vec![v.clone()])));
    assert!(w.observe("a", Ok(&node(vec![v.clone()]))).is_empty(), "nothing changed");

    v.peer_role = Some(Role::Primary);
    v.resync = Some(ResyncProgress { total: 1, done: 0, rate: 0 });
    v.clients = 2;
    let changes = w.observe("a", Ok(&node(vec![v.clone()])));
    assert_eq!(
        brief(&changes),
        vec![
            t("peer_role", "none", "Primary"),
            t("resync", "idle", "running"),
            t("clients", "0", "2")
        ]
    );
    assert!(changes.iter().all(|c| !c.initial));

    let lost = w.observe("a", Err("blockd is not running".into()));
    assert_eq!(brief(&lost), vec![t("daemon", "running", "unreachable")]);
    assert_eq!(lost[0].detail.as_deref(), Some("blockd is not running"));
    assert!(w.observe("a", Err("still".into())).is_empty(), "reported once");

    v.role = Role::Primary;
    v.conn = ConnState::StandAlone;
    v.conn_reason = Some("split brain".into());
    let back = w.observe("a", Ok(&node(vec![v])));
    assert_eq!(
        brief(&back),
        vec![
            t("daemon", "unreachable", "running"),
            t("role", "Secondary", "Primary"),
            t("conn", "Connected", "StandAlone")
        ]
    );
    assert_eq!(back[2].detail.as_deref(), Some("split brain"), "conn says why");
}

#[test]
fn unreachable_at_start_then_up_reports_initial_volumes() {
    let mut w = Watch::default();
    let first = w.observe("n", Err("gone".into()));
    assert_eq!((first[0].node.as_str(), first[0].initial), ("n", true));
    let v = fake::volume(DiskState::UpToDate, ConnState::Connected, Role::Primary, None);
    let up = w.observe("n", Ok(&node(vec![v])));
    assert!(!up[0].initial, "the daemon's own change is a real one");
    assert!(up[1..].iter().all(|c| c.initial), "the volumes are seen for the first time");
}

#[test]
fn until_parses_and_matches() {
    let u = parse_until("role=Primary").unwrap();
    assert_eq!(u, Until { field: Field::Role, value: "Primary".into() });
    assert!(parse_until("peer_role=none").is_ok());
    let err = parse_until("mood=happy").unwrap_err();
    assert!(err.contains("unknown field \"mood\"") && err.contains("peer_disk"), "{err}");
    assert!(parse_until("role").is_err() && parse_until("role=").is_err());
    let c = |to: Option<&str>| Change {
        node: "a".into(),
        volume: Some("v".into()),
        field: Field::PeerRole,
        from: None,
        to: to.map(String::from),
        initial: false,
        detail: None,
    };
    assert!(c(None).matches(&parse_until("peer_role=none").unwrap()));
    assert!(!c(Some("Primary")).matches(&parse_until("peer_role=none").unwrap()));
    assert!(!c(Some("Primary")).matches(&parse_until("role=Primary").unwrap()), "other field");
}

#[test]
fn lines_in_text_and_json() {
    let c = Change {
        node: "a".into(),
        volume: Some("db".into()),
        field: Field::PeerRole,
        from: Some("Primary".into()),
        to: None,
        initial: false,
        detail: None,
    };
    assert_eq!(c.text(), "a/db peer_role Primary -> none");
    let json = serde_json::to_string(&Line { timestamp: "T".into(), change: &c }).unwrap();
    assert_eq!(
        json,
        concat!(
            r#"{"timestamp":"T","node":"a","volume":"db","field":"peer_role","#,
            r#""from":"Primary","to":null}"#
        )
    );
    let d =
        Change { volume: None, field: Field::Daemon, initial: true, detail: Some("x".into()), ..c };
    assert_eq!(d.text(), "a daemon none (initial) (x)");
    let json = serde_json::to_string(&Line { timestamp: "T".into(), change: &d }).unwrap();
    assert!(json.ends_with(r#""to":null,"initial":true,"detail":"x"}"#), "{json}");
}
