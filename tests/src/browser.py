"""Headless Chromium driven over WebDriver (Debian's chromium-driver), for the console tests.

Runs where it is started (the test runs it in the client network namespace with nsenter):
starts chromedriver on a free loopback port, opens one session, then reads one JSON command
per line on stdin and answers one JSON line on stdout:

  {"op": "get", "url": U}                    load a page
  {"op": "js", "script": S}                  run S (a function body; "return" a value)
  {"op": "wait", "script": S, "timeout": T}  run S until it returns something truthy
  {"op": "click", "css": C}                  click the first element matching C
  {"op": "type", "css": C, "text": X}        clear C and type X into it
  {"op": "shot", "path": P}                  save a PNG screenshot of the window to P
  {"op": "quit"}                             end the session, stop chromedriver, exit

Answers: {"ok": true, "value": ...} or {"ok": false, "error": "..."}. Only the standard
library: WebDriver is JSON over HTTP.
"""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1500"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Driver:
    def __init__(self, user_data_dir):
        self.port = free_port()
        self.proc = subprocess.Popen(["chromedriver", "--port=%d" % self.port],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = "http://127.0.0.1:%d" % self.port
        for _ in range(100):
            try:
                self.call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": FLAGS + ["--user-data-dir=" + user_data_dir]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            raise RuntimeError(e.read().decode(errors="replace")[:2000])

    def s(self, method, path, body=None):
        return self.call(method, "/session/%s%s" % (self.session, path), body)

    def element(self, css):
        found = self.s("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def run(self, cmd):
        op = cmd["op"]
        if op == "get":
            return self.s("POST", "/url", {"url": cmd["url"]})
        if op == "js":
            return self.s("POST", "/execute/sync", {"script": cmd["script"], "args": []})
        if op == "wait":
            deadline = time.time() + cmd.get("timeout", 30)
            last = None
            while time.time() < deadline:
                last = self.s("POST", "/execute/sync", {"script": cmd["script"], "args": []})
                if last:
                    return last
                time.sleep(0.25)
            raise RuntimeError("timed out waiting; last value %r" % (last,))
        if op == "click":
            return self.s("POST", "/element/%s/click" % self.element(cmd["css"]), {})
        if op == "type":
            e = self.element(cmd["css"])
            self.s("POST", "/element/%s/clear" % e, {})
            return self.s("POST", "/element/%s/value" % e, {"text": cmd["text"]})
        if op == "shot":
            png = base64.b64decode(self.s("GET", "/screenshot"))
            with open(cmd["path"], "wb") as f:
                f.write(png)
            return len(png)
        raise RuntimeError("unknown op %r" % op)

    def quit(self):
        try:
            self.s("DELETE", "")
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main():
    driver = Driver(sys.argv[1])
    print(json.dumps({"ok": True, "value": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            answer = {"ok": True, "value": driver.run(cmd)}
        except Exception as e:  # every failure goes back to the test, which reports it
            answer = {"ok": False, "error": str(e)}
        print(json.dumps(answer), flush=True)
    driver.quit()
    print(json.dumps({"ok": True, "value": "bye"}), flush=True)


if __name__ == "__main__":
    main()
