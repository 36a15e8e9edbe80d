//! A real S3-compatible server for tests: moto in server mode, started on a free port from the program
//! `MOTO_SERVER` names (`scripts/test` installs it in `.venv-clients` and sets it). Without `MOTO_SERVER` the
//! tests that need it say loudly that they SKIPPED; under `CI=true` they fail instead.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use denoised::config::{S3Config, Secret};
use object_store::aws::{AmazonS3, AmazonS3Builder};

/// The key prefix the tests' buckets are used under.
pub const PREFIX: &str = "tenant/denoised";

/// A moto server of this test, stopped when dropped.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _log_dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto on a free port and waits until it answers; `None` (after a loud SKIPPED) when
    /// `MOTO_SERVER` is unset outside CI.
    pub async fn start() -> Option<Self> {
        let Some(program) = std::env::var_os("MOTO_SERVER").map(PathBuf::from) else {
            let message = "MOTO_SERVER is not set, so the S3 storage tests cannot start their S3 server. \
                           Run ./scripts/test (it installs moto in .venv-clients and sets MOTO_SERVER), or set \
                           MOTO_SERVER=/path/to/.venv-clients/bin/moto_server";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{message} (CI=true: failing, not skipping)");
            // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests.
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {message}\n");
            return None;
        };
        assert!(program.is_file(), "MOTO_SERVER={} is not a file", program.display());
        // A port picked by binding port 0 could be taken again before moto binds it: try a few.
        for _ in 0..3 {
            if let Some(moto) = Self::try_start(&program).await {
                return Some(moto);
            }
        }
        panic!("moto ({}) did not start; see the logs above", program.display());
    }

    async fn try_start(program: &std::path::Path) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("moto.log");
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log_dir.path().join("moto.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let mut moto = Self { child, endpoint: format!("http://127.0.0.1:{port}"), _log_dir: log_dir };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = moto.child.try_wait() {
                let errors = std::fs::read_to_string(moto._log_dir.path().join("moto.err")).unwrap_or_default();
                eprintln!("moto exited with {status} on port {port}:\n{errors}");
                return None;
            }
            if client.get(format!("{}/", moto.endpoint)).send().await.is_ok() {
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = moto.child.kill();
        eprintln!("moto did not answer on port {port} within 30 s");
        None
    }

    /// Creates a bucket (moto takes an unsigned `PUT /{bucket}`; `object_store` cannot create buckets).
    pub async fn create_bucket(&self, name: &str) {
        let response = reqwest::Client::new().put(format!("{}/{name}", self.endpoint)).send().await.unwrap();
        assert!(response.status().is_success(), "creating bucket {name}: {}", response.status());
    }

    /// The `[storage.s3]` settings for `bucket` on this server.
    pub fn settings(&self, bucket: &str) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            prefix: PREFIX.into(),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some(Secret::new("testing")),
            allow_http: true,
        }
    }

    /// The same settings as the `[storage.s3]` TOML table.
    pub fn settings_toml(&self, bucket: &str) -> String {
        format!(
            "[storage.s3]\nbucket = \"{bucket}\"\nprefix = \"{PREFIX}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"testing\"\nsecret_access_key = \"testing\"\nallow_http = true\n",
            self.endpoint
        )
    }

    /// A client of our own for `bucket`, to look at what the server stored.
    pub fn inspector(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(&self.endpoint)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_allow_http(true)
            .build()
            .unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
