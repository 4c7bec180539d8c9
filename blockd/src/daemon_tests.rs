use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::*;
use crate::control::{Client, ClientError, Role};

/// A single-node (or, with `extra`, two-node) file under `dir`, with no memory locking:
/// mlockall would lock the whole test process.
fn config(dir: &Path, extra: &str) -> (Config, LocalNode) {
    let text = format!(
        "[daemon]\nmlock = false\nio-flusher = false\n[storage]\nengine = \"sync\"\n\
         [node.alpha]\ndata-dir = \"{d}/data\"\nrun-dir = \"{d}/run\"\n{extra}\n\
         [[volume]]\nname = \"vol\"\nsize = \"1MiB\"\n",
        d = dir.display()
    );
    let path = dir.join("blockd.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let node = config.local_node(Some("alpha")).unwrap();
    (config, node)
}

struct Running {
    events: mpsc::Sender<Event>,
    task: JoinHandle<Result<(), DaemonError>>,
}

/// Starts the daemon and waits until its control socket answers.
async fn start(config: Config, node: LocalNode) -> Running {
    let control = node.control_socket();
    let (events, rx) = mpsc::channel(4);
    let task = tokio::spawn(run_with_events(config, node, rx));
    for _ in 0..500 {
        if status(&control).await.is_ok() || task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { events, task }
}

async fn status(path: &Path) -> Result<NodeStatus, ClientError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || Client::connect(&path, Duration::from_secs(5))?.status())
        .await
        .unwrap()
}

async fn set_role(path: &Path, role: Role) -> Result<(), ClientError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let request = control::Request::Role { role, force: false, volume: None };
        Client::connect(&path, Duration::from_secs(5))?.call(&request).map(|_| ())
    })
    .await
    .unwrap()
}

/// A single node has no peer to ask: it becomes Primary again without --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_is_promoted_again_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (config, node) = config(dir.path(), "");
    let running = start(config, node.clone()).await;
    let sock = node.control_socket();
    set_role(&sock, Role::Secondary).await.unwrap();
    assert_eq!(status(&sock).await.unwrap().volumes[0].role, Role::Secondary);
    set_role(&sock, Role::Primary).await.unwrap();
    assert_eq!(status(&sock).await.unwrap().volumes[0].role, Role::Primary);
    running.stop().await.unwrap();
}

impl Running {
    async fn stop(self) -> Result<(), DaemonError> {
        self.events.send(Event::Terminate("test")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.task).await.unwrap().unwrap()
    }
}

/// nbdinfo (a real client) reads the export's size from the unix socket.
async fn nbdinfo_size(socket: PathBuf, export: &str) -> String {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("nbdinfo").args(["--size", &uri]).output().expect("nbdinfo must be installed")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_volume_and_status_then_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (config, node) = config(dir.path(), "");
    let running = start(config, node.clone()).await;
    let s = status(&node.control_socket()).await.unwrap();
    assert_eq!((s.node.as_str(), s.volumes.len()), ("alpha", 1));
    let v = &s.volumes[0];
    assert_eq!((v.name.as_str(), v.size, v.role), ("vol", 1 << 20, Role::Primary));
    assert_eq!(v.socket, node.nbd_socket("vol").display().to_string());
    assert_eq!(nbdinfo_size(node.nbd_socket("vol"), "vol").await, "1048576");
    assert_eq!(nbdinfo_size(node.nbd_socket("vol"), "").await, "1048576", "default export");
    running.stop().await.unwrap();
    assert!(!node.nbd_socket("vol").exists(), "NBD socket removed");
    assert!(!node.control_socket().exists(), "control socket removed");
    let backing = std::fs::metadata(dir.path().join("data/vol.img")).unwrap();
    assert_eq!(backing.len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_daemon_is_refused_and_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (config, node) = config(dir.path(), "");
    let first = start(config.clone(), node.clone()).await;
    let (_tx, rx) = mpsc::channel(1);
    let err = run_with_events(config, node.clone(), rx).await.unwrap_err();
    assert!(matches!(err, DaemonError::ControlSocket(SocketError::InUse { .. })), "{err}");
    assert!(status(&node.control_socket()).await.is_ok(), "first one still answers");
    assert!(node.nbd_socket("vol").exists(), "its sockets are untouched");
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (config, node) = config(dir.path(), "");
    std::fs::create_dir_all(&node.settings.run_dir).unwrap();
    for path in [node.nbd_socket("vol"), node.control_socket()] {
        drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    }
    let running = start(config, node.clone()).await;
    assert!(status(&node.control_socket()).await.is_ok());
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_file_starts_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let extra = format!(
        "replication = \"127.0.0.1:0\"\n[node.beta]\nreplication = \"127.0.0.2:7789\"\n\
         [cluster]\nsecret-file = \"{}\"",
        secret.display()
    );
    let (config, node) = config(dir.path(), &extra);
    let running = start(config, node.clone()).await;
    let s = status(&node.control_socket()).await.unwrap();
    assert_eq!(s.volumes[0].role, Role::Secondary);
    assert_eq!(s.volumes[0].conn, crate::control::ConnState::Connecting);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_removes_what_it_bound() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!("nbd-tcp = \"{}\"", taken.local_addr().unwrap());
    let (config, node) = config(dir.path(), &extra);
    let (_tx, rx) = mpsc::channel(1);
    let err = run_with_events(config, node.clone(), rx).await.unwrap_err();
    assert!(matches!(err, DaemonError::Tcp { .. }), "{err}");
    assert!(!node.nbd_socket("vol").exists(), "the unix socket bound before is gone");
    assert!(!node.control_socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_serves_the_volumes() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was free a moment ago; the daemon binds it right after.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (config, node) = config(dir.path(), &format!("nbd-tcp = \"{addr}\""));
    let running = start(config, node).await;
    let uri = format!("nbd://{addr}/vol");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("nbdinfo").args(["--size", &uri]).output().expect("nbdinfo must be installed")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    running.stop().await.unwrap();
}
