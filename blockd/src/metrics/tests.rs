//! The renderer: escaping, state families, histograms, and the text format's own rules
//! (families grouped, HELP/TYPE before samples, one TYPE per family).

use std::{collections::HashMap, time::Duration};

use super::*;
use crate::control::{Counters, ResyncProgress};

fn volume(name: &str) -> VolumeStatus {
    let json = serde_json::json!({
        "name": name, "size": 1 << 20, "role": "Primary", "disk": "UpToDate", "clients": 2,
        "socket": "", "backing": "", "engine": "sync", "direct_io": false,
        "conn": "SyncSource", "peer": "beta", "peer_role": "Secondary",
        "peer_disk": "Inconsistent", "out_of_sync": 4096, "generation": "1",
        "resync": {"total": 100, "done": 40, "rate": 7},
        "counters": Counters { reads: 3, writes: 5, flushes: 1, ..Counters::default() },
    });
    serde_json::from_value(json).unwrap()
}

fn node(volumes: Vec<VolumeStatus>) -> NodeStatus {
    NodeStatus { node: "alpha".into(), version: "0.1.0".into(), volumes }
}

/// The value of the one sample named exactly `series` (name plus labels as rendered).
fn value(text: &str, series: &str) -> String {
    let hits: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix(series)?.strip_prefix(' ')).collect();
    assert_eq!(hits.len(), 1, "{series} must appear exactly once in:\n{text}");
    hits[0].to_string()
}

/// Issue 17: why a disk is Failed, as labels; no sample while the disk is fine.
#[test]
fn a_failed_disk_says_why() {
    let mut failed = volume("b");
    failed.disk = crate::control::DiskState::Failed;
    failed.disk_failure = Some(crate::control::DiskFailure {
        op: crate::control::DiskOp::Flush,
        errno: 5,
        offset: 0,
    });
    let text = render(&node(vec![volume("a"), failed]));
    let series = "blockd_volume_disk_failure_info{node=\"alpha\",volume=\"b\",op=\"Flush\",\
                  errno=\"5\",offset=\"0\"}";
    assert_eq!(value(&text, series), "1");
    assert!(!text.contains("blockd_volume_disk_failure_info{node=\"alpha\",volume=\"a\""));
}

/// The split-brain gauge follows status's typed field, whatever `conn_reason` says.
#[test]
fn split_brain_is_one_only_while_standalone_for_a_split_brain() {
    let standalone = |name: &str, split_brain: bool, reason: &str| VolumeStatus {
        conn: crate::control::ConnState::StandAlone,
        split_brain,
        conn_reason: Some(reason.into()),
        ..volume(name)
    };
    let volumes = vec![
        volume("a"),
        standalone("b", true, "authentication failed"),
        standalone("c", false, "split brain: in a reason only"),
    ];
    let text = super::health::render(&node(volumes), None);
    let gauge = |v: &str| format!("blockd_volume_split_brain{{node=\"alpha\",volume=\"{v}\"}}");
    assert_eq!(value(&text, &gauge("a")), "0");
    assert_eq!(value(&text, &gauge("b")), "1");
    assert_eq!(value(&text, &gauge("c")), "0");
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
    assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
    assert_eq!(escape_label("plain-name_1.x"), "plain-name_1.x");
    assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
    let text = render(&NodeStatus {
        node: "we\"ird\\node\n".into(),
        version: "v".into(),
        volumes: vec![],
    });
    assert!(text.contains(r#"blockd_build_info{node="we\"ird\\node\n",version="v"} 1"#), "{text}");
}

#[test]
fn seconds_are_exact_decimals() {
    assert_eq!(seconds(0), "0");
    assert_eq!(seconds(16_000), "0.000016");
    assert_eq!(seconds(8_388_608_000_000), "8388.608");
    assert_eq!(seconds(1_500_000_000), "1.5");
    assert_eq!(seconds(2_000_000_000), "2");
}

#[test]
fn states_are_one_hot_and_peer_states_follow_the_peer() {
    let mut gone = volume("b");
    (gone.peer_role, gone.peer_disk, gone.resync) = (None, None, None);
    let text = render(&node(vec![volume("a"), gone]));
    let l = |vol: &str, extra: &str| format!("{{node=\"alpha\",volume=\"{vol}\",{extra}}}");
    assert_eq!(value(&text, &format!("blockd_volume_role{}", l("a", "role=\"Primary\""))), "1");
    assert_eq!(value(&text, &format!("blockd_volume_role{}", l("a", "role=\"Secondary\""))), "0");
    let conn =
        |s: &str| format!("blockd_volume_connection_state{}", l("a", &format!("state=\"{s}\"")));
    assert_eq!(value(&text, &conn("SyncSource")), "1");
    for other in ["StandAlone", "Connecting", "Connected", "SyncTarget"] {
        assert_eq!(value(&text, &conn(other)), "0", "{other}");
    }
    let peer = |v: &str, s: &str| {
        format!("blockd_volume_peer_disk_state{}", l(v, &format!("state=\"{s}\"")))
    };
    assert_eq!(value(&text, &peer("a", "Inconsistent")), "1");
    assert_eq!(value(&text, &peer("b", "Inconsistent")), "0", "no peer: all 0");
    let gauge = |n: &str, v: &str| format!("{n}{{node=\"alpha\",volume=\"{v}\"}}");
    assert_eq!(value(&text, &gauge("blockd_volume_resync_done_bytes", "a")), "40");
    assert_eq!(value(&text, &gauge("blockd_volume_resync_rate_bytes_per_second", "a")), "7");
    assert_eq!(value(&text, &gauge("blockd_volume_resync_active", "b")), "0");
    assert_eq!(value(&text, &gauge("blockd_volume_out_of_sync_bytes", "a")), "4096");
    assert_eq!(value(&text, &gauge("blockd_volume_clients", "a")), "2");
    let req = |k: &str| format!("blockd_volume_requests_total{}", l("a", &format!("kind=\"{k}\"")));
    assert_eq!((value(&text, &req("read")), value(&text, &req("write"))), ("3".into(), "5".into()));
    assert_eq!(value(&text, &req("flush")), "1");
}

#[test]
fn histograms_are_cumulative_with_inf_equal_to_count() {
    let lat = Latencies::default();
    for us in [10, 30, 30, 20_000_000] {
        lat.write.record(Duration::from_micros(us));
    }
    let mut v = volume("a");
    v.latency = lat.snapshot();
    let text = render(&node(vec![v]));
    let b = |kind: &str, le: &str| {
        format!(
            "blockd_volume_request_duration_seconds_bucket{{node=\"alpha\",volume=\"a\",\
             kind=\"{kind}\",le=\"{le}\"}}"
        )
    };
    assert_eq!(value(&text, &b("write", "0.000016")), "1");
    assert_eq!(value(&text, &b("write", "0.000032")), "3");
    assert_eq!(value(&text, &b("write", "8.388608")), "3");
    assert_eq!(value(&text, &b("write", "+Inf")), "4");
    assert_eq!(value(&text, &b("read", "+Inf")), "0", "every kind is rendered, even empty");
    let s = "{node=\"alpha\",volume=\"a\",kind=\"write\"}";
    assert_eq!(value(&text, &format!("blockd_volume_request_duration_seconds_count{s}")), "4");
    assert_eq!(value(&text, &format!("blockd_volume_request_duration_seconds_sum{s}")), "20.00007");
}

/// Format 0.0.4 rules a scraper enforces: each family's samples are contiguous and follow
/// its one HELP and TYPE; counters end in `_total`; every sample line is `name{...} value`.
#[test]
fn families_are_grouped_typed_and_well_formed() {
    let mut b = volume("b");
    b.resync = Some(ResyncProgress { total: 1, done: 1, rate: 0 });
    let text = render(&node(vec![volume("a"), b]));
    assert!(text.ends_with('\n'));
    let mut types: HashMap<String, String> = HashMap::new();
    let mut current = String::new();
    let mut finished: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(types.insert(name.into(), kind.into()).is_none(), "two TYPEs for {name}");
            assert!(!finished.contains(&name.to_string()), "{name} split in two");
            finished.push(std::mem::replace(&mut current, name.into()));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            }
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, val) = line.rsplit_once(' ').unwrap();
        assert!(val.parse::<f64>().is_ok(), "value of {line}");
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert_eq!(family, current, "sample {line} outside its family");
        assert!(series.ends_with('}') && series.contains("node=\"alpha\""), "{line}");
    }
    assert!(types.len() > 20, "{types:?}");
}
