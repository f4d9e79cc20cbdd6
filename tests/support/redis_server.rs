//! A private `redis-server` for one test: its own loopback port and temporary directory, never the
//! machine's own Redis.

use std::{
    fmt,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use super::TempDir;

const MISSING: &str =
    "redis-server not found: install it (apt-get install redis-server) or run scripts/test, which installs it";

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The keyspace notifications the Redis backend needs, on by default in every test server.
pub const NOTIFY_FLAGS: &str = "Kg$x";

/// A `redis-server` process owned by a test. Drop kills it and removes its directory.
pub struct RedisServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    probe: Mutex<Option<Connection>>,
    dir: TempDir,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("args", &self.args)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl RedisServer {
    /// Starts a server with the keyspace notifications the backend needs.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra arguments after the defaults (later ones win), e.g.
    /// `["--notify-keyspace-events", ""]` or `["--rename-command", "CONFIG", ""]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let args: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
        // A port picked by the OS can be taken by someone else before redis binds it: retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                args: args.clone(),
                child: None,
                probe: Mutex::new(None),
                dir: TempDir::new("tower-parking-redis"),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's loopback port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server cleanly (`SHUTDOWN NOSAVE`), falling back to a kill.
    pub fn stop(&mut self) {
        self.forget_probe();
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut connection) = Connection::open(self.port) {
            // The server closes the connection instead of answering.
            let _ = connection.send(&[b"SHUTDOWN", b"NOSAVE"]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server (SIGKILL) and waits for it to be gone: a crash, not a shutdown.
    pub fn kill(&mut self) {
        self.forget_probe();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (stopping it first if it runs), empty.
    pub fn restart(&mut self) {
        self.stop();
        // The old socket may linger for a moment; redis binds with SO_REUSEADDR, so this is
        // rare, but a bind failure is retried rather than failing the test.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(error) if Instant::now() < deadline && error.contains("in use") => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(error) => panic!("could not restart redis-server: {error}"),
            }
        }
    }

    /// Runs one command on a connection this handle keeps, and returns the reply (`Resp::Error`
    /// for a Redis error). Panics if the server cannot be reached.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|arg| arg.as_bytes()).collect();
        self.cmd_bytes(&args)
    }

    /// Like [`cmd`](Self::cmd), with binary arguments.
    pub fn cmd_bytes(&self, args: &[&[u8]]) -> Resp {
        let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if probe.is_none() {
                match Connection::open(self.port) {
                    Ok(connection) => *probe = Some(connection),
                    Err(error) => {
                        panic!("cannot reach redis-server on port {}: {error}", self.port)
                    }
                }
            }
            let connection = probe.as_mut().expect("just connected");
            match connection.command(args) {
                Ok(reply) => return reply,
                // A stale connection (the server restarted): reconnect once.
                Err(_) if attempt == 0 => *probe = None,
                Err(error) => panic!("redis command failed: {error}"),
            }
        }
        unreachable!()
    }

    /// Runs one command on a connection of its own, for commands that block the connection they
    /// are sent on (`DEBUG SLEEP`), from a thread of the test's.
    pub fn cmd_on_port(port: u16, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|arg| arg.as_bytes()).collect();
        Connection::open(port)
            .and_then(|mut connection| connection.command(&args))
            .unwrap_or_else(|error| panic!("redis command failed: {error}"))
    }

    /// How many scripts the server has run (`EVALSHA` calls): each acquire, and each look a
    /// parked request takes at its key, is one.
    pub fn scripts_run(&self) -> u64 {
        let info = self.cmd(&["INFO", "commandstats"]).text();
        info.lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The value of one `CONFIG GET` parameter.
    pub fn config_get(&self, name: &str) -> String {
        match self.cmd(&["CONFIG", "GET", name]) {
            Resp::Array(Some(items)) if items.len() == 2 => items[1].text(),
            other => panic!("CONFIG GET {name}: unexpected reply {other:?}"),
        }
    }

    /// `connected_clients` from `INFO clients` (this handle's own connection included).
    pub fn connected_clients(&self) -> usize {
        let info = self.cmd(&["INFO", "clients"]).text();
        info.lines()
            .find_map(|line| line.strip_prefix("connected_clients:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("no connected_clients in INFO: {info}"))
    }

    fn forget_probe(&self) {
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let log = dir.join("redis.log");
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let port = self.port.to_string();
        let mut command =
            Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()));
        command
            .args(["--port", &port, "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--notify-keyspace-events", NOTIFY_FLAGS])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) if error.kind() == io::ErrorKind::NotFound => panic!("{MISSING}"),
            Err(error) => panic!("cannot run redis-server: {error}"),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!(
                    "redis-server on port {} exited with {status} during startup:\n{log}{stderr}",
                    self.port
                ));
            }
            if let Ok(mut connection) = Connection::open(self.port) {
                if let Ok(Resp::Simple(pong)) = connection.command(&[b"PING"]) {
                    if pong == "PONG" {
                        self.child = Some(child);
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot find a free loopback port")
}

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3 abc`, or nil.
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`, or nil.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text (bulk strings lossily decoded); panics on arrays and errors.
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(text) => text.clone(),
            Resp::Integer(n) => n.to_string(),
            Resp::Bulk(Some(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Resp::Bulk(None) => String::new(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The reply as an integer; panics otherwise.
    pub fn integer(&self) -> i64 {
        match self {
            Resp::Integer(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The bytes of a bulk reply (`None` for nil); panics otherwise.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Resp::Bulk(bytes) => bytes.as_deref(),
            other => panic!("expected a bulk reply, got {other:?}"),
        }
    }
}

/// A blocking RESP connection, for the test's own look at the server (no client library, so it
/// works while the backend under test is broken).
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(port: u16) -> io::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out)
    }

    fn command(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        self.send(args)?;
        self.read()
    }

    fn read(&mut self) -> io::Result<Resp> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1.min(line.len()));
        let number = || {
            rest.parse::<i64>().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"))
            })
        };
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Integer(number()?),
            "$" => match number()? {
                -1 => Resp::Bulk(None),
                len => {
                    let mut bytes = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(len as usize);
                    Resp::Bulk(Some(bytes))
                }
            },
            "*" => match number()? {
                -1 => Resp::Array(None),
                len => Resp::Array(Some(
                    (0..len).map(|_| self.read()).collect::<io::Result<_>>()?,
                )),
            },
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply {line:?}"),
                ))
            }
        })
    }
}
