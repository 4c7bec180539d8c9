//! The Prometheus endpoint (issue 7, "What it must show"): scraped with a real HTTP client
//! (curl) while fio runs against the volume, its counters grow, its latency histograms are
//! well-formed, and the whole output parses as text exposition format 0.0.4, both by a strict
//! parser written here and by Prometheus' own `promtool check metrics`.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::clients::FioRun,
    cmd::{cmd, try_run},
    require, Node,
};

const VOL: &str = "vol";

/// A port that was free a moment ago (the daemon binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One sample: name, labels in order, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// What a scrape parsed into: the samples in order and each family's TYPE.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include all of `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let hits: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
            .collect();
        assert_eq!(hits.len(), 1, "want one {name}{labels:?}, got {hits:?}");
        hits[0].value
    }

    /// `(le, cumulative count)` of a histogram's buckets, in output order.
    fn buckets(&self, family: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
        let name = format!("{family}_bucket");
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
            .map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le").expect("bucket has le");
                (le.1.clone(), s.value)
            })
            .collect()
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first)
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// Label names and values, in order.
type Labels = Vec<(String, String)>;

/// Parses `{k="v",...}` at the start of `s`; returns the labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").ok_or(format!("no =\" in {rest:?}"))?;
        if !is_name(key, false) {
            return Err(format!("bad label name {key:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("raw newline in a label value".into()),
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A strict reader of text format 0.0.4: every line is a HELP, a TYPE or a sample; TYPE comes
/// before its family's samples, once; a family's samples are contiguous; values are floats.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut current: Option<String> = None;
    let mut closed: Vec<String> = Vec::new();
    if !text.ends_with('\n') {
        return Err("output must end with a line feed".into());
    }
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) =
                rest.split_once(' ').ok_or_else(|| err("TYPE lacks a type".into()))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(err(format!("unknown type {kind}")));
            }
            if types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(err(format!("second TYPE for {name}")));
            }
            if closed.contains(&name.to_string()) || samples.iter().any(|s: &Sample| s.name == name)
            {
                return Err(err(format!("TYPE for {name} after its samples")));
            }
            closed.extend(current.replace(name.to_string()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !is_name(name, true) {
                return Err(err(format!("bad name in HELP: {name:?}")));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(err("stray comment or blank line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].starts_with('{') {
            true => parse_labels(&line[name_end..]).map_err(&err)?,
            false => (Vec::new(), &line[name_end..]),
        };
        let mut fields =
            rest.strip_prefix(' ').ok_or_else(|| err("no space before value".into()))?.split(' ');
        let value = fields.next().unwrap_or_default();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err(format!("bad value {v:?}")))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        if current.as_deref() != Some(family) {
            return Err(err(format!(
                "sample outside its family (TYPE of {family} not just before)"
            )));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(Scrape { samples, types })
}

/// GET `path` with curl; returns (HTTP code, content type, body).
fn curl(port: u16, path: &str) -> (u16, String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = try_run(
        &mut cmd(
            "curl",
            &["-sS", "--max-time", "10", "-w", "\n%{http_code} %{content_type}", &url],
        ),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "curl failed:\n{out}");
    let (body, meta) = out.stdout.rsplit_once('\n').expect("curl's -w line");
    let (code, ctype) = meta.split_once(' ').unwrap_or((meta, ""));
    (code.parse().expect("HTTP code"), ctype.to_string(), body.to_string())
}

fn scrape(port: u16) -> (String, Scrape) {
    let (code, ctype, body) = curl(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let parsed = parse(&body).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{body}"));
    (body, parsed)
}

/// `promtool check metrics` (Prometheus' own parser and linter) reads the text on stdin.
fn promtool_check(text: &str) {
    require("promtool");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const DURATION: &str = "blockd_volume_request_duration_seconds";

/// Checks one histogram: buckets ascend in `le`, counts never decrease, `+Inf` is last and
/// equals `_count`. Returns `_count`.
#[track_caller]
fn check_histogram(s: &Scrape, kind: &str) -> f64 {
    let labels = [("volume", VOL), ("kind", kind)];
    let buckets = s.buckets(DURATION, &labels);
    assert!(buckets.len() >= 2, "{kind}: buckets {buckets:?}");
    let les: Vec<f64> = buckets
        .iter()
        .map(|(le, _)| if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le") })
        .collect();
    assert!(les.windows(2).all(|w| w[0] < w[1]), "{kind}: le not ascending: {les:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{kind}: not cumulative: {buckets:?}");
    let (last_le, inf) = buckets.last().expect("buckets").clone();
    assert_eq!(last_le, "+Inf");
    let count = s.get(&format!("{DURATION}_count"), &labels);
    assert_eq!(inf, count, "{kind}: +Inf bucket must equal _count");
    assert!(s.get(&format!("{DURATION}_sum"), &labels) >= 0.0);
    count
}

fn requests(s: &Scrape, kind: &str) -> f64 {
    s.get("blockd_volume_requests_total", &[("volume", VOL), ("kind", kind)])
}

/// fio (nbd engine, mixed random reads and writes with periodic flushes) runs for a few
/// seconds; two scrapes during the run show the counters growing; the scrape at rest has
/// histograms whose counts match the request counters exactly; every scrape parses.
#[test]
fn scraped_during_fio_counters_grow_and_histograms_parse() {
    require("curl");
    require("fio");
    let port = free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let node = Node::started("metrics-fio", &[(VOL, "64MiB")], &metrics);
    let (_, idle) = scrape(port);
    assert_eq!(requests(&idle, "write"), 0.0);
    assert_eq!(idle.get("blockd_volume_role", &[("volume", VOL), ("role", "Primary")]), 1.0);
    assert_eq!(
        idle.get("blockd_volume_size_bytes", &[("volume", VOL), ("node", "alpha")]),
        64.0 * 1048576.0
    );

    let args = [
        "--rw=randrw",
        "--rwmixread=40",
        "--bs=4k",
        "--iodepth=8",
        "--size=32m",
        "--time_based",
        "--runtime=6",
        "--fsync=32",
    ];
    let started = Instant::now();
    let fio = FioRun::spawn(node.dir().path(), &node.uri(VOL), "metrics", &args);
    let mut first = None;
    for _ in 0..200 {
        let (_, s) = scrape(port);
        if requests(&s, "write") > 0.0 {
            first = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = first.expect("fio's writes never showed in the metrics");
    std::thread::sleep(Duration::from_millis(1500));
    let (_, second) = scrape(port);
    // fio runs 6 s (plus its start-up): both scrapes fell inside the run.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "scrapes too slow: {:?}",
        started.elapsed()
    );
    for kind in ["write", "read"] {
        assert!(requests(&second, kind) > requests(&first, kind), "{kind} did not grow during fio");
    }
    let written = |s: &Scrape| s.get("blockd_volume_written_bytes_total", &[("volume", VOL)]);
    assert!(written(&second) > written(&first), "written bytes did not grow");
    assert!(check_histogram(&second, "write") > check_histogram(&first, "write"));
    let (written_by_fio, read_by_fio) = fio.finish(Duration::from_secs(60));

    let (text, rest) = scrape(port);
    promtool_check(&text);
    assert_eq!(written(&rest), written_by_fio as f64, "written bytes = what fio wrote");
    let read = rest.get("blockd_volume_read_bytes_total", &[("volume", VOL)]);
    assert!(read >= read_by_fio as f64, "read bytes {read} < fio's {read_by_fio}");
    for kind in ["read", "write", "flush", "write_zeroes", "trim"] {
        let count = check_histogram(&rest, kind);
        assert_eq!(
            count,
            requests(&rest, kind),
            "{kind}: histogram count = request counter at rest"
        );
    }
    assert!(check_histogram(&rest, "write") > 0.0 && check_histogram(&rest, "flush") > 0.0);
    assert_eq!(rest.types.get(DURATION).map(String::as_str), Some("histogram"));
    assert_eq!(rest.types.get("blockd_volume_requests_total").map(String::as_str), Some("counter"));
    let families: BTreeMap<&str, &str> =
        rest.types.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert!(families.keys().all(|f| f.starts_with("blockd_")), "{families:?}");
}

/// The one route: anything else is 404, other methods 405, and a non-HTTP client gets 400
/// and a closed connection; the daemon keeps serving metrics after all of them.
#[test]
fn other_paths_and_garbage_are_refused() {
    require("curl");
    let port = free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let _node = Node::started("metrics-routes", &[(VOL, "4MiB")], &metrics);
    assert_eq!(curl(port, "/").0, 404);
    assert_eq!(curl(port, "/metrics/x").0, 404);
    let post = try_run(
        cmd("curl", &["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .arg(format!("http://127.0.0.1:{port}/metrics")),
        Duration::from_secs(20),
    );
    assert_eq!(post.stdout.trim(), "405", "{post}");
    let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    raw.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).expect("the server closes the connection");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let (code, _, body) = curl(port, "/metrics");
    assert_eq!(code, 200);
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
}

/// `listen = "off"`: nothing listens, and the daemon serves its volume as usual.
#[test]
fn off_means_no_listener() {
    let port = free_port();
    let node = Node::started("metrics-off", &[(VOL, "4MiB")], "[metrics]\nlisten = \"off\"\n");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "something listens on {port}");
    assert!(node.log_text().contains("ready:"), "{}", node.log_text());
    assert!(!node.log_text().contains("metrics at"), "{}", node.log_text());
}

/// The strict parser must reject what Prometheus rejects, or the checks above prove nothing.
#[test]
fn parser_rejects_malformed_text() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    assert!(parse(ok).is_ok());
    for bad in [
        "a 1",                                             // no final line feed
        "# TYPE a gauge\na{k=\"v} 1\n",                    // unterminated value
        "# TYPE a gauge\na{k=\"\\x\"} 1\n",                // bad escape
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n", // family split
        "# TYPE a gauge\na one\n",                         // bad value
        "b 1\n",                                           // sample without TYPE
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",           // second TYPE
        "# TYPE 1a gauge\n1a 1\n",                         // bad name
        "# TYPE a gauge\n\na 1\n",                         // blank line
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
