//! Real, separate processes of `examples/server.rs`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{mpsc, OnceLock},
    thread,
    time::Duration,
};

use super::TempDir;

/// Builds `examples/server.rs` (once per test process) and returns the binary's path.
pub fn server_example() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest_dir = env!("CARGO_MANIFEST_DIR");
            assert!(
                std::path::Path::new(manifest_dir)
                    .join("examples/server.rs")
                    .exists(),
                "examples/server.rs does not exist yet"
            );
            let mut build = Command::new(env!("CARGO"));
            build
                .args(["build", "--example", "server", "--features", "redis"])
                .current_dir(manifest_dir);
            // `cargo test` runs this binary with the variables it sets for the crate under test.
            // Build scripts track some of them (ring's `CARGO_MANIFEST_DIR`): passed on, they make
            // this build rebuild ring, rustls, fred and this crate (half a minute), and the next
            // `cargo test` rebuild them back.
            for (name, _) in std::env::vars_os() {
                if name.to_str().is_some_and(set_by_cargo_for_the_crate) {
                    build.env_remove(name);
                }
            }
            let status = build.status().expect("cannot run cargo");
            assert!(status.success(), "cargo build --example server failed");
            // This test binary is target/<profile>/deps/redis-HASH; examples sit next to deps.
            let exe = std::env::current_exe().expect("no current exe");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("test binary outside target/<profile>/deps");
            let server = profile_dir.join("examples").join("server");
            assert!(server.exists(), "{} was not built", server.display());
            server
        })
        .clone()
}

/// Whether `name` is one of the variables cargo sets for a crate's own build and tests (not a
/// setting of cargo's, such as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn set_by_cargo_for_the_crate(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .contains(&name)
}

/// A running process of the server example. Drop kills it.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: TempDir,
}

impl ServerProcess {
    /// Runs the server example with `args` (`--listen 127.0.0.1:0` is added) and waits for it to
    /// print `listening on ADDR`.
    pub fn start(args: &[&str]) -> Self {
        let dir = TempDir::new("tower-parking-server");
        let stderr = dir.path().join("stderr.log");
        let mut child = Command::new(server_example())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("cannot create the log file"))
            .spawn()
            .expect("cannot run the server example");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines_tx, lines) = mpsc::channel();
        // Keeps reading after the address is found, so the server never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens any more, lines are drained and dropped.
                let _ = lines_tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|addr| addr.trim_start_matches("http://").parse().ok())
                    {
                        break addr;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the server example did not print `listening on ADDR` within 30 s; stderr:\n{}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
            }
        };
        Self {
            child,
            addr,
            stderr,
            _dir: dir,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
