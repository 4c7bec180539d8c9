//! Headless Chromium for the console tests: `browser.py` (WebDriver over HTTP to Debian's
//! chromedriver, standard library only) run in a network namespace, one JSON command per
//! line. [`Browser`] is a guard: dropping it ends the session, and kills the whole process
//! group it started (python, chromedriver, chromium) by its id if that did not finish.
//!
//! Chromium gets the flags of a locked-down test browser (no sandbox: we are root in a
//! namespace; no GPU, QUIC, first-run, background networking, component updates or sync) and
//! a fresh `--user-data-dir` inside the test's directory, so nothing is downloaded and no
//! state leaks between runs.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::{json, Value};

const DRIVER: &str = include_str!("browser.py");

/// How long one command may take (a `wait` brings its own timeout on top).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
}

impl Browser {
    /// Starts the browser in network namespace `netns` (a name under /run/netns), with its
    /// profile and the driver script under `dir`.
    pub fn start(netns: &str, dir: &Path) -> Browser {
        for tool in ["chromium", "chromedriver", "nsenter"] {
            crate::require(tool);
        }
        std::fs::create_dir_all(dir).expect("browser dir");
        let script = dir.join("browser.py");
        std::fs::write(&script, DRIVER).expect("write browser.py");
        let profile = dir.join("profile");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{netns}"))
            .arg("/usr/bin/python3")
            .arg(&script)
            .arg(&profile)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = c.spawn().expect("start browser.py");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let answers = spawn_reader(stdout);
        let mut b = Browser { child, stdin, answers };
        let ready = b.answer(COMMAND_TIMEOUT);
        assert_eq!(ready, json!("ready"), "chromedriver session did not start");
        b
    }

    /// Sends one command; panics with the driver's error unless it succeeded.
    pub fn call(&mut self, cmd: Value) -> Value {
        let extra = cmd.get("timeout").and_then(Value::as_u64).unwrap_or(0);
        let line = format!("{cmd}\n");
        let stdin = self.stdin.as_mut().expect("browser stdin");
        stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()).expect("to browser.py");
        self.answer(COMMAND_TIMEOUT + Duration::from_secs(extra))
    }

    fn answer(&mut self, timeout: Duration) -> Value {
        let line = self.answers.recv_timeout(timeout).expect("browser.py answered nothing");
        let v: Value = serde_json::from_str(&line).expect("browser.py answers JSON");
        assert_eq!(v["ok"], true, "browser: {}", v["error"]);
        v["value"].clone()
    }

    pub fn get(&mut self, url: &str) {
        self.call(json!({"op": "get", "url": url}));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub fn js(&mut self, script: &str) -> Value {
        self.call(json!({"op": "js", "script": script}))
    }

    /// Runs `script` until it returns something truthy, at most `timeout`; returns it.
    pub fn wait(&mut self, script: &str, timeout: Duration) -> Value {
        self.call(json!({"op": "wait", "script": script, "timeout": timeout.as_secs()}))
    }

    /// `wait`, but returns the error text instead of panicking (for a better message).
    pub fn try_wait(&mut self, script: &str, timeout: Duration) -> Result<Value, String> {
        let cmd = json!({"op": "wait", "script": script, "timeout": timeout.as_secs()});
        let stdin = self.stdin.as_mut().expect("browser stdin");
        stdin.write_all(format!("{cmd}\n").as_bytes()).expect("to browser.py");
        let line = self
            .answers
            .recv_timeout(COMMAND_TIMEOUT + timeout)
            .map_err(|e| format!("browser.py: {e}"))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if v["ok"] == true {
            Ok(v["value"].clone())
        } else {
            Err(v["error"].to_string())
        }
    }

    pub fn click(&mut self, css: &str) {
        self.call(json!({"op": "click", "css": css}));
    }

    pub fn type_into(&mut self, css: &str, text: &str) {
        self.call(json!({"op": "type", "css": css, "text": text}));
    }

    /// Saves a screenshot of the window as `path` (PNG).
    pub fn screenshot(&mut self, path: &Path) -> PathBuf {
        let n = self.call(json!({"op": "shot", "path": path}));
        assert!(n.as_u64().unwrap_or(0) > 1000, "screenshot {} is empty", path.display());
        eprintln!("screenshot: {}", path.display());
        path.to_path_buf()
    }
}

fn spawn_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"{\"op\":\"quit\"}\n");
        }
        let _ = self.answers.recv_timeout(Duration::from_secs(15));
        let pgid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with plain integers; -pgid is the process group this guard created
        // (process_group(0) above), so only its python, chromedriver and chromium get it.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
