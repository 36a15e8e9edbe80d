//! The real `denoised` binary as a child process, for tests of crashes, signals and several processes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `denoised serve`.
pub struct Binary {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`, from its log.
    pub base: String,
    /// Every log line so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A test that fails half-way must not leave its server processes running.
impl Drop for Binary {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `denoised serve` on port 0 and reads the bound address from its log.
pub fn start(config: &Path) -> Binary {
    start_with(config, &[])
}

/// [`start`] with more arguments after `serve --config FILE` (e.g. `--role worker`).
pub fn start_with(config: &Path, args: &[&str]) -> Binary {
    let mut child = Command::new(env!("CARGO_BIN_EXE_denoised"))
        .args(["serve", "--config"])
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info,ort=warn")
        .env_remove("ORT_DYLIB_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting denoised");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(pos) = line.find("addr=") {
                let addr: String = line[pos + 5..].chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = tx.send(addr);
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server did not report its address");
    Binary { child, base: format!("http://{addr}"), log }
}

/// Sends SIGTERM and checks that the process exits with status 0 within 30 s.
pub fn terminate(mut server: Binary) {
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            return;
        }
        assert!(Instant::now() < deadline, "server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
