//! MariaDB on the mirror: the failover config (volume "db" on /var/lib/mysql, the VIP, a
//! `[[service]]` started with a `start` command), the datadir prepared on the mirror before
//! the first promote, SQL through the VIP from the client namespace, and the logging client
//! (`db_client.py`) whose log is the oracle of "every acknowledged commit survives".

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    lan::{IFACE, VIP, VIP_CIDR},
    Alpha, Cluster, Spec,
};
use crate::cmd::{Background, Output};

/// Where the primary mounts the volume.
pub const DATADIR: &str = "/var/lib/mysql";
/// The volume's name.
pub const VOLUME: &str = "db";
/// The volume's size: room for a datadir with a 16 MiB redo log.
pub const SIZE: &str = "160MiB";
/// Options shared by the install, the bootstrap and the server (small redo log and buffer
/// pool: this machine is small; no name resolution: clients are addresses). The temporary
/// tablespace starts at 1 MiB instead of 12: InnoDB writes it in full at every start, i.e. at
/// every failover, through the mirror (docs/k3s.md recommends the same).
const SERVER_OPTS: &str = "--innodb-log-file-size=16M --innodb-buffer-pool-size=32M \
                           --innodb-temp-data-file-path=ibtmp1:1M:autoextend";

const DB_CLIENT: &str = include_str!("db_client.py");

/// The `mariadbd` start command: backgrounded (blockctl does not wait for it), output to
/// the node's own /run/mysqld (a tmpfs per node mount namespace).
pub fn start_command(extra: &str) -> String {
    format!(
        "mariadbd --no-defaults --user=root --datadir={DATADIR} --bind-address=0.0.0.0 \
         --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
         --log-error=/run/mysqld/error.log --skip-name-resolve {SERVER_OPTS} {extra} \
         >/dev/null 2>&1 &"
    )
}

/// The `[[service]]` table of MariaDB with `start` as its start command.
pub fn service_toml(start: &str, timeout: &str) -> String {
    format!(
        "[[service]]\nname = \"mariadb\"\nstart = \"{start}\"\n\
         stop = \"kill -TERM $(cat /run/mysqld/mysqld.pid)\"\n\
         pidfile = \"/run/mysqld/mysqld.pid\"\ncheck = \"tcp://127.0.0.1:3306\"\n\
         timeout = \"{timeout}\"\n\n"
    )
}

/// `[failover]` (fuse attach: no nbd module here) and `[vip]` on the nodes' interface.
pub fn failover_toml() -> String {
    format!(
        "[failover]\nattach = \"fuse\"\nstep-timeout = \"60s\"\ngarp-count = 5\n\
         garp-interval = \"200ms\"\ngarp-repeat = \"5s\"\n\n\
         [vip]\naddress = \"{VIP_CIDR}\"\ninterface = \"{IFACE}\"\n\n"
    )
}

/// The shared config of the MariaDB tests.
pub fn configure(spec: &mut Spec) {
    spec.volume = VOLUME.to_string();
    spec.size = SIZE.to_string();
    spec.volume_toml = format!("filesystem = \"ext4\"\nmount = \"{DATADIR}\"\n");
    spec.extra_toml = failover_toml() + &service_toml(&start_command(""), "60s");
}

/// A started, in-sync cluster (both Secondary) whose volume holds a MariaDB datadir with
/// database `app`, table `t (id BIGINT PRIMARY KEY)` and user `app`@'%' (password `app`).
pub fn cluster(test: &str) -> Cluster {
    cluster_with(test, |_| {})
}

/// [`cluster`], with `more` adjusting the config after [`configure`].
pub fn cluster_with(test: &str, more: impl FnOnce(&mut Spec)) -> Cluster {
    for tool in ["mariadbd", "mariadb", "mariadb-install-db", "nbdfuse", "mkfs.ext4"] {
        crate::require(tool);
    }
    let mut c = Cluster::with_lan(test, SIZE, |s| {
        configure(s);
        more(s);
    });
    c.start(Alpha);
    c.start(super::Beta);
    let body = format!(
        "mariadb-install-db --no-defaults --datadir={DATADIR} --user=root \
         --auth-root-authentication-method=normal --skip-test-db {SERVER_OPTS} >/dev/null 2>&1 \
         || {{ echo mariadb-install-db failed; exit 1; }}\n\
         printf \"%s\\n\" \"FLUSH PRIVILEGES;\" \"CREATE DATABASE app;\" \
         \"CREATE USER 'app'@'%' IDENTIFIED BY 'app';\" \"GRANT ALL ON app.* TO 'app'@'%';\" \
         \"CREATE TABLE app.t (id BIGINT PRIMARY KEY);\" \
         | mariadbd --no-defaults --bootstrap --user=root --datadir={DATADIR} {SERVER_OPTS} \
         >/run/mysqld/bootstrap.log 2>&1 || {{ cat /run/mysqld/bootstrap.log; exit 1; }}"
    );
    c.prepare_filesystem(Alpha, DATADIR, &body);
    c
}

/// Runs `sql` as user app through the VIP from the client namespace (any exit status).
pub fn sql(c: &Cluster, sql: &str) -> Output {
    let script = format!(
        "mariadb --no-defaults -h {VIP} --protocol=TCP -u app -papp --connect-timeout=3 \
         --batch --skip-column-names app -e \"{sql}\""
    );
    c.client(&script)
}

/// Polls `SELECT 1` through the VIP until it answers "1"; returns when it did, or Err with
/// the last output after `timeout`.
pub fn wait_select_1(c: &Cluster, timeout: Duration) -> Result<Instant, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = sql(c, "SELECT 1");
        if out.status.success() && out.stdout.trim() == "1" {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(format!("no SELECT 1 through the VIP after {timeout:?}:\n{out}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ids in table t, through the VIP.
pub fn ids(c: &Cluster) -> BTreeSet<u64> {
    let out = sql(c, "SELECT id FROM t ORDER BY id");
    out.assert_success();
    out.stdout.lines().map(|l| l.trim().parse().expect("numeric id")).collect()
}

/// Every acknowledged id is in the table, and the table has no gap (a failed id is retried
/// until it commits, so 1..=max must all be there).
pub fn assert_no_lost_commit(c: &Cluster, log: &ClientLog) -> BTreeSet<u64> {
    let ids = ids(c);
    let lost: Vec<u64> = log.acked.iter().filter(|id| !ids.contains(id)).copied().collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged ids missing, first {:?}",
        lost.len(),
        log.acked.len(),
        &lost[..lost.len().min(10)]
    );
    let max = ids.iter().max().copied().unwrap_or(0);
    let gaps: Vec<u64> = (1..=max).filter(|i| !ids.contains(i)).take(10).collect();
    assert!(gaps.is_empty(), "ids missing below the highest ({max}): {gaps:?}");
    ids
}

/// One failed statement or connection of the client.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: u64,
    /// The CLI connected (the session lost a statement), rather than failing to connect.
    pub statement: bool,
    /// Commits the session had acknowledged before this failure.
    pub ok_on_conn: u64,
    pub detail: String,
}

/// The client's log, parsed.
#[derive(Debug, Default)]
pub struct ClientLog {
    pub acked: Vec<u64>,
    pub failures: Vec<Failure>,
    pub ended: bool,
}

/// `db_client.py` running in the client namespace against the VIP.
pub struct DbClient {
    bg: Background,
    log: PathBuf,
    stop: PathBuf,
}

impl DbClient {
    pub fn start(c: &Cluster) -> DbClient {
        let dir = c.dir();
        let script = dir.join("db_client.py");
        fs::write(&script, DB_CLIENT).expect("write db_client.py");
        let (log, stop) = (dir.join("db_client.log"), dir.join("db_client.stop"));
        let _ = fs::remove_file(&stop);
        let mut cmd = c.lan().client_command(super::clients::PYTHON);
        cmd.arg(&script).arg(VIP).arg(&log).arg(&stop);
        let bg = Background::spawn(&mut cmd, &dir.join("db_client.out"));
        DbClient { bg, log, stop }
    }

    pub fn read(&self) -> ClientLog {
        parse_log(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits until `n` more commits than `from` were acknowledged; Err with the log tail.
    pub fn wait_acked(&self, from: usize, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.read();
            if log.acked.len() >= from + n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let text = fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                return Err(format!(
                    "client acknowledged {} commits, wanted {} within {timeout:?}; last lines \
                     (newest first): {tail:#?}\nclient output: {}",
                    log.acked.len(),
                    from + n,
                    self.bg.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the client to stop after its current statement and returns its final log.
    pub fn stop(mut self) -> ClientLog {
        fs::write(&self.stop, b"").expect("write stop file");
        let status = self.bg.wait(Duration::from_secs(30));
        let log = self.read();
        assert!(status.is_some(), "client did not stop within 30 s: {}", self.bg.log_text());
        log
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

fn parse_log(text: &str) -> ClientLog {
    let mut log = ClientLog::default();
    for line in text.lines() {
        let mut f = line.splitn(6, ' ');
        match (f.next(), f.next().and_then(|s| s.parse::<u64>().ok())) {
            (Some("ok"), Some(id)) => log.acked.push(id),
            (Some("fail"), Some(id)) => {
                let statement = f.next() == Some("statement");
                let ok_on_conn = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let detail = f.collect::<Vec<_>>().join(" ");
                log.failures.push(Failure { id, statement, ok_on_conn, detail });
            }
            (Some("end"), Some(_)) => log.ended = true,
            _ => {} // a torn last line of a killed client
        }
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_log_parses() {
        let log = parse_log(
            "ok 1\nok 2\nfail 3 statement 2 eof ERROR 2013 (HY000) at line 3: Lost\n\
             fail 3 connect 0 eof ERROR 2003\nok 3\nend 4\n",
        );
        assert_eq!(log.acked, vec![1, 2, 3]);
        assert_eq!(log.failures.len(), 2);
        assert!(log.failures[0].statement && log.failures[0].ok_on_conn == 2);
        assert!(!log.failures[1].statement);
        assert!(log.ended);
    }
}
