//! docs/k3s.md §4 run as far as this machine allows (issue 7): MariaDB configured with the
//! doc's own `mariadb.cnf` block (read out of the doc, so doc and test cannot drift; only
//! the VIP is replaced by the test network's), its datadir on the mirror, K3s's database and
//! user from the doc's `k3s.sql` block, kine's table and indexes created through the VIP as
//! user k3s, rows inserted as kine inserts them while the primary is killed, `blockctl
//! promote --force` on the other node; then the schema is unchanged, every acknowledged row
//! is there with its value, the binary log goes on under the same name, and new ids are
//! above the old ones.
//!
//! K3s itself does not run here (no binary, no internet): kine's statements stand in for it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use blockd_tests::{
    cluster::{
        lan::{IFACE, VIP, VIP_CIDR},
        mariadb::failover_toml,
        Alpha, Beta, Cluster, NodeId, Spec,
    },
    cmd::Background,
    Output,
};

const DATADIR: &str = "/var/lib/mysql";
const SIZE: &str = "160MiB";
/// The VIP the doc's examples use, replaced by the test network's.
const DOC_VIP: &str = "10.0.0.100";
/// Small redo log and buffer pool: this machine is small (not part of the doc's settings).
const SMALL: &str = "--innodb-log-file-size=16M --innodb-buffer-pool-size=32M";

/// kine's MySQL schema (k3s-io/kine, pkg/drivers/mysql): the table, then its indexes (the
/// database bench's kine-shaped load creates the same table from the same file).
const KINE_SCHEMA: &str = include_str!("../../bench/kine.sql");

const KINE_INDEXES: [&str; 6] = [
    "PRIMARY",
    "kine_name_index",
    "kine_name_id_index",
    "kine_id_deleted_index",
    "kine_prev_revision_index",
    "kine_name_prev_revision_uindex",
];

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/k3s.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced block right after the `<!-- blockd-test: NAME ... -->` marker in the doc.
fn doc_block(doc: &str, name: &str) -> String {
    let marker = format!("<!-- blockd-test: {name}");
    let at = doc.find(&marker).unwrap_or_else(|| panic!("docs/k3s.md has no {marker} marker"));
    let rest = &doc[at..];
    let open = rest.find("\n```").expect("a fenced block after the marker") + 4;
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("\n```").expect("closing fence")].to_string() + "\n"
}

/// The password the doc's SQL gives user k3s.
fn k3s_password(sql: &str) -> String {
    let at = sql.find("IDENTIFIED BY '").expect("CREATE USER ... IDENTIFIED BY") + 15;
    sql[at..at + sql[at..].find('\'').expect("closing quote")].to_string()
}

/// The cluster: volume db (ext4 on /var/lib/mysql), the VIP, MariaDB as a service started
/// with the doc's config file and checked where the doc says it listens (the VIP).
fn configure(spec: &mut Spec, cnf: &Path) {
    spec.volume = "db".to_string();
    spec.size = SIZE.to_string();
    spec.volume_toml = format!("filesystem = \"ext4\"\nmount = \"{DATADIR}\"\n");
    let start = format!(
        "mariadbd --defaults-file={cnf} --user=root --datadir={DATADIR} \
         --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
         --log-error=/run/mysqld/error.log {SMALL} >/dev/null 2>&1 &",
        cnf = cnf.display()
    );
    spec.extra_toml = failover_toml()
        + &format!(
            "[[service]]\nname = \"mariadb\"\nstart = \"{start}\"\n\
             stop = \"kill -TERM $(cat /run/mysqld/mysqld.pid)\"\n\
             pidfile = \"/run/mysqld/mysqld.pid\"\ncheck = \"tcp://{VIP}:3306\"\n\
             timeout = \"60s\"\n"
        );
    assert!(VIP_CIDR.starts_with(VIP) && !IFACE.is_empty());
}

/// SQL through the VIP from the client namespace as user k3s, database k3s (stdin, so
/// quotes need no escaping); any exit status.
fn sql(c: &Cluster, password: &str, statements: &str) -> Output {
    c.client(&format!(
        "mariadb --no-defaults -h {VIP} --protocol=TCP -u k3s -p'{password}' --connect-timeout=3 \
         --batch --skip-column-names k3s <<'EOF'\n{statements}\nEOF"
    ))
}

fn sql_ok(c: &Cluster, password: &str, statements: &str) -> String {
    let out = sql(c, password, statements);
    assert!(out.status.success(), "SQL through the VIP failed:\n{out}");
    out.stdout
}

fn wait_sql(c: &Cluster, password: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = sql(c, password, "SELECT 1");
        if out.status.success() && out.stdout.trim() == "1" {
            return;
        }
        assert!(Instant::now() < deadline, "no SELECT 1 as k3s through the VIP:\n{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `SHOW CREATE TABLE kine` without the AUTO_INCREMENT counter, which moves with every row.
fn kine_ddl(c: &Cluster, password: &str) -> String {
    let ddl = sql_ok(c, password, "SHOW CREATE TABLE kine");
    ddl.split_whitespace()
        .filter(|w| !w.starts_with("AUTO_INCREMENT="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Inserts kine rows in a loop as kine does, one statement per connection, and logs
/// "ok ID N" only after MariaDB answered the commit (autocommit) with the row's id.
struct Writer {
    bg: Background,
    log: PathBuf,
    stop: PathBuf,
}

impl Writer {
    fn start(c: &Cluster, password: &str) -> Writer {
        let dir = c.dir();
        let (log, stop, script) =
            (dir.join("kine-writer.log"), dir.join("kine-writer.stop"), dir.join("kine-writer.sh"));
        let body = format!(
            "n=0\nwhile [ ! -e {stop} ]; do\n  n=$((n+1))\n  \
             id=$(mariadb --no-defaults -h {VIP} --protocol=TCP -u k3s -p'{password}' \
             --connect-timeout=2 --batch --skip-column-names k3s -e \
             \"INSERT INTO kine(name, created, deleted, create_revision, prev_revision, lease, \
             value, old_value) VALUES ('/registry/blockd-test/$n', 1, 0, 0, 0, 0, 'value-$n', \
             NULL); SELECT LAST_INSERT_ID();\" 2>/dev/null) && echo \"ok $id $n\" >> {log}\n\
             done\n",
            stop = stop.display(),
            log = log.display()
        );
        fs::write(&script, body).expect("writer script");
        let mut cmd = c.lan().client_command("sh");
        cmd.arg(&script);
        let bg = Background::spawn(&mut cmd, &dir.join("kine-writer.out"));
        Writer { bg, log, stop }
    }

    /// Acknowledged (id → n).
    fn acked(&self) -> BTreeMap<u64, u64> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("ok")).then_some(())?;
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }

    fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked().len() < n {
            assert!(
                Instant::now() < deadline,
                "writer acknowledged {} rows, wanted {n}: {}",
                self.acked().len(),
                self.bg.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) -> BTreeMap<u64, u64> {
        fs::write(&self.stop, b"").expect("stop file");
        assert!(self.bg.wait(Duration::from_secs(30)).is_some(), "writer did not stop");
        self.acked()
    }
}

/// The binary logs listed in the index on the mirror, as `n` sees its datadir. Each name is
/// `mariadb-bin.NNNNNN`, never derived from the host name.
fn binlogs(c: &Cluster, n: NodeId) -> Vec<String> {
    let out = c.run_on(n, &format!("cat {DATADIR}/mariadb-bin.index"));
    assert!(out.status.success(), "no mariadb-bin.index in the datadir:\n{out}");
    let logs: Vec<String> = out
        .stdout
        .lines()
        .map(|l| l.trim().rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert!(logs.iter().all(|l| l.starts_with("mariadb-bin.0")), "{logs:?}");
    logs
}

fn is_connected(v: &serde_json::Value) -> bool {
    ["Connected", "SyncSource", "SyncTarget"].iter().any(|s| v["conn"] == *s)
}

#[test]
fn mariadb_as_documented_survives_failover_with_kine_schema_and_rows() {
    for tool in ["mariadbd", "mariadb", "mariadb-install-db", "nbdfuse", "mkfs.ext4"] {
        blockd_tests::require(tool);
    }
    let doc = doc();
    let cnf_text = doc_block(&doc, "mariadb.cnf");
    let k3s_sql = doc_block(&doc, "k3s.sql");
    let password = k3s_password(&k3s_sql);
    assert!(cnf_text.contains(&format!("bind-address = {DOC_VIP}")), "{cnf_text}");
    let cnf_text = cnf_text.replace(DOC_VIP, VIP);

    // The doc's config file, where both nodes' mariadbd read it (dropped after the cluster).
    let cnf_dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let cnf = cnf_dir.path().join("60-k3s.cnf");
    fs::write(&cnf, &cnf_text).expect("write cnf");
    let mut c = Cluster::with_lan("k3s", SIZE, |s| configure(s, &cnf));
    c.start(Alpha);
    c.start(Beta);
    let body = format!(
        "mariadb-install-db --defaults-file={cnf} --datadir={DATADIR} --user=root \
         --auth-root-authentication-method=normal --skip-test-db {SMALL} >/run/mysqld/install.log 2>&1 \
         || {{ cat /run/mysqld/install.log; exit 1; }}\n\
         {{ echo 'FLUSH PRIVILEGES;'; cat <<'EOF'\n{k3s_sql}EOF\n}} \
         | mariadbd --defaults-file={cnf} --bootstrap --user=root --datadir={DATADIR} {SMALL} \
         >/run/mysqld/bootstrap.log 2>&1 || {{ cat /run/mysqld/bootstrap.log; exit 1; }}",
        cnf = cnf.display()
    );
    c.prepare_filesystem(Alpha, DATADIR, &body);
    c.promote(Alpha, &[]);
    wait_sql(&c, &password, Duration::from_secs(60));

    // The doc's settings are in force.
    let settings = sql_ok(
        &c,
        &password,
        "SELECT @@bind_address, @@innodb_snapshot_isolation, @@log_bin, @@log_bin_basename, \
         @@sync_binlog, @@innodb_flush_log_at_trx_commit",
    );
    let want = format!("{VIP}\t0\t1\t{DATADIR}/mariadb-bin\t1\t1");
    assert_eq!(settings.trim(), want, "bind, snapshot isolation, binlog name, durability");
    let local = c.run_on(Alpha, "mariadb --no-defaults -h 127.0.0.1 --protocol=TCP -u k3s --connect-timeout=2 -e 'SELECT 1'");
    assert!(!local.status.success(), "MariaDB must listen on the VIP only:\n{local}");

    sql_ok(&c, &password, KINE_SCHEMA);
    let ddl = kine_ddl(&c, &password);
    let logs_before = binlogs(&c, Alpha);
    assert!(!logs_before.is_empty(), "binary logging is on");
    let writer = Writer::start(&c, &password);
    writer.wait_acked(100, Duration::from_secs(120));
    c.kill_node(Alpha);
    c.wait_for(Beta, "peer gone", Duration::from_secs(30), |v| !is_connected(v));
    c.promote(Beta, &["--force"]);
    wait_sql(&c, &password, Duration::from_secs(60));
    let before = writer.acked().len();
    writer.wait_acked(before + 20, Duration::from_secs(60));
    let acked = writer.stop();

    assert_eq!(kine_ddl(&c, &password), ddl, "kine's table and indexes after failover");
    let indexes = sql_ok(&c, &password, "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = 'k3s' AND TABLE_NAME = 'kine'");
    for i in KINE_INDEXES {
        assert!(indexes.lines().any(|l| l == i), "index {i} missing after failover: {indexes}");
    }
    let rows: BTreeMap<u64, (String, String)> =
        sql_ok(&c, &password, "SELECT id, name, value FROM kine")
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].parse().expect("id"), (f[1].to_string(), f[2].to_string()))
            })
            .collect();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|(id, n)| {
            rows.get(id) != Some(&(format!("/registry/blockd-test/{n}"), format!("value-{n}")))
        })
        .map(|(id, _)| *id)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows missing or wrong: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );

    let logs_after = binlogs(&c, Beta);
    assert!(
        logs_after.len() > logs_before.len() && logs_after.starts_with(&logs_before),
        "beta's binary logs {logs_after:?} must continue alpha's {logs_before:?}"
    );
    let next: u64 = sql_ok(&c, &password, "INSERT INTO kine(name, created, deleted, create_revision, prev_revision, lease, value, old_value) VALUES ('/registry/blockd-test/after', 1, 0, 0, 0, 0, 'after', NULL); SELECT LAST_INSERT_ID();")
        .trim()
        .parse()
        .expect("id");
    let max = acked.keys().max().copied().unwrap_or(0);
    assert!(next > max, "auto-increment went back: new id {next}, highest acknowledged {max}");
    eprintln!(
        "k3s: {} rows acknowledged ({} before the kill), all present on beta",
        acked.len(),
        before
    );
}
