//! The listener: an OS thread holding one connection to Redis/Valkey that receives invalidations
//! and keeps the lease (`lease.rs`) alive with heartbeats. No Python anywhere on this path.
//!
//! A session: connect (TCP or unix socket, with a timeout; over TCP, TLS when configured: the
//! handshake is done, and the server's certificate verified, before anything is sent, and a
//! TLS failure is an error, never a plaintext retry: `tls.rs`); `HELLO 3 [AUTH user pass]`; then
//! `CLIENT TRACKING ON BCAST [PREFIX p]` (no NOLOOP: writes by this process's other connections
//! must invalidate too) or, in pub/sub mode, `SUBSCRIBE channel`; once the server has confirmed
//! it, flush L1 (whatever changed while no session was on is unknown); then PING every LEASE/5.
//! Every PONG extends the lease from the PING's send time; pushes are applied as they are read,
//! so a PONG is only processed after every invalidation the server queued before it. A session
//! ends on a socket error, a protocol error, a server error, or a PING unanswered for
//! `stall_limit` (a dead peer that never resets the connection); the lease ends with it, and
//! the thread connects again after a capped exponential backoff with jitter.
//!
//! In pub/sub mode a message is one made key, or `*` for "flush everything".
//!
//! Behind Redis Sentinel (`Endpoint::Sentinel`), every session starts by asking the sentinels
//! for the master's address (`sentinel.rs`), and after `HELLO` checks with `ROLE` that the server
//! is a master; so after a failover the next session is on the new master, and L1, flushed at its
//! start, serves again only after that master's first PONG.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::inherited;
use super::lease::Lease;
use super::record::{self, Record};
use super::resp::{self, Value};
use super::sentinel::Sentinels;
use super::tls::{self, Tls};
use super::Sink;
use crate::clock;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    /// The master of a service, as the sentinels say at each session's start (TCP).
    Sentinel(Sentinels),
}

/// How invalidations come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `CLIENT TRACKING ON BCAST PREFIX <prefix>`: every change under the prefix, by anyone.
    Bcast,
    /// `SUBSCRIBE <channel>`: the writers publish each made key (or `*`).
    Pubsub(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub endpoint: Endpoint,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The key namespace tracked (BCAST); empty tracks every key.
    pub prefix: String,
    pub lease: Duration,
    pub mode: Mode,
    pub connect_timeout: Duration,
    /// TLS over TCP (`rediss://`); `None`: plaintext.
    pub tls: Option<Tls>,
}

impl Config {
    /// The heartbeat period: a fifth of the lease (at least 1 ms).
    pub fn heartbeat(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(1))
    }

    /// How long a PING may stay unanswered before the connection is taken for dead.
    pub fn stall_limit(&self) -> Duration {
        (self.lease * 2).max(self.connect_timeout)
    }
}

/// Counters kept across sessions and restarts (atomics only: safe to read in a forked child).
#[derive(Debug, Default)]
pub struct Counters {
    /// Keys invalidated by a push or message.
    pub invalidations: AtomicU64,
    /// Whole-L1 flushes: at every session start, and on a null push or `*` message.
    pub flushes: AtomicU64,
    /// Sessions established after the first.
    pub reconnects: AtomicU64,
    pub sessions: AtomicU64,
    pub connected: AtomicBool,
    pub last_pong_rtt_ns: AtomicU64,
    /// When invalidations were applied (`record.rs`).
    pub record: Record,
}

/// A socket, TCP or unix, or a TLS session over TCP.
enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// The TCP or unix socket underneath (for TLS, the TCP socket it runs over).
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            #[cfg(unix)]
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.sock.as_raw_fd(),
        }
    }
}

/// The connection: its socket, whose descriptor a forked child closes at once (`inherited`).
struct Conn {
    // Declared first, so dropped first: deregistered before the socket closes its descriptor.
    inherited: inherited::Registered,
    stream: Stream,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            inherited: inherited::register(stream.fd()),
            stream,
        }
    }

    /// In a forked child: forget this copy without closing its descriptor, which the fork
    /// handler already closed (closing it again could close a descriptor the child reused).
    fn forget_in_child(self) {
        if self.inherited.is_registered() {
            std::mem::forget(self);
        }
    }

    /// Connects to `endpoint`, a TCP or unix one (a `Sentinel` one is resolved first).
    fn connect(cfg: &Config, endpoint: &Endpoint) -> io::Result<Conn> {
        match endpoint {
            Endpoint::Tcp { host, port } => {
                let mut last = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, cfg.connect_timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Conn::new(Stream::Tcp(s)));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
                }))
            }
            #[cfg(unix)]
            Endpoint::Unix(path) => UnixStream::connect(path).map(|s| Conn::new(Stream::Unix(s))),
            #[cfg(not(unix))]
            Endpoint::Unix(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "unix sockets need a unix system",
            )),
            Endpoint::Sentinel(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ask the sentinels for the master first",
            )),
        }
    }

    /// A second handle on the socket, for `shutdown` only (of a TLS connection, the TCP socket
    /// under it: shutting that down wakes a read blocked in the TLS session).
    fn try_clone(&self) -> io::Result<Conn> {
        match &self.stream {
            Stream::Tcp(s) => s.try_clone().map(|s| Conn::new(Stream::Tcp(s))),
            #[cfg(unix)]
            Stream::Unix(s) => s.try_clone().map(|s| Conn::new(Stream::Unix(s))),
            Stream::Tls(s) => s.sock.try_clone().map(|s| Conn::new(Stream::Tcp(s))),
        }
    }

    /// Runs the TLS handshake over this TCP connection (within the timeouts already set) and
    /// verifies the server's certificate: the connection becomes a TLS one, or an error.
    fn start_tls(self, t: &Tls, host: &str) -> Result<Conn, String> {
        let Conn { inherited, stream } = self;
        let Stream::Tcp(mut sock) = stream else {
            return Err("TLS needs a TCP connection (rediss://host:port)".into());
        };
        let config = tls::client_config(t).map_err(|e| format!("TLS: {e}"))?;
        let name = tls::server_name(host)?;
        let mut session =
            rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
        while session.is_handshaking() {
            session
                .complete_io(&mut sock)
                .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
        }
        Ok(Conn {
            inherited,
            stream: Stream::Tls(Box::new(rustls::StreamOwned::new(session, sock))),
        })
    }

    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(t),
            #[cfg(unix)]
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match &self.stream {
            Stream::Tcp(s) => s.set_write_timeout(t),
            #[cfg(unix)]
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock.set_write_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            #[cfg(unix)]
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => s.sock.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    /// Sends what TLS buffered (a TLS write may leave records unsent); sockets need nothing.
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// What one running listener thread shares with its owner.
#[derive(Default)]
pub struct Shared {
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// A clone of the live connection, so that `stop` can shut it down at once.
    socket: Mutex<Option<Conn>>,
}

impl Shared {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock() = Some(e);
    }

    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
}

/// A listener thread and what it shares.
pub struct Running {
    thread: Option<JoinHandle<()>>,
    pub shared: Arc<Shared>,
}

impl Running {
    /// Starts the thread. The lease is revoked at every session start and end.
    pub fn start(
        cfg: Config,
        sink: Arc<dyn Sink>,
        lease: Arc<Lease>,
        counters: Arc<Counters>,
    ) -> io::Result<Running> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rustcache-near".into())
            .spawn(move || run(&cfg, &*sink, &lease, &counters, &s))?;
        Ok(Running {
            thread: Some(thread),
            shared,
        })
    }

    /// Asks the thread to stop and wakes it (shutting its connection down), without waiting.
    pub fn signal_stop(&self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(conn) = self.shared.socket.lock().as_ref() {
            conn.shutdown();
        }
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Stops the thread and waits for it (at most about a connect timeout: a connect in
    /// progress is not interrupted).
    pub fn stop(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// In a forked child: the thread does not exist here. Forget it without touching its locks
    /// (one may have been held at the fork). The fork handler closed this process's copies of
    /// its sockets (`inherited`; never `shutdown`, which would cut the parent's connection).
    pub fn abandon(mut self) {
        if let Some(t) = self.thread.take() {
            std::mem::forget(t);
        }
        if let Some(mut slot) = self.shared.socket.try_lock() {
            if let Some(conn) = slot.take() {
                conn.forget_in_child();
            }
        }
        std::mem::forget(self.shared);
    }

    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(t) => t.is_finished(),
            None => true,
        }
    }
}

/// Capped exponential backoff with jitter: 20 ms doubling to 1 s, each delay drawn from its upper
/// half, so that many processes that lost Redis at once do not come back in step.
struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(20);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> Self {
        let seed = clock::now() ^ (std::process::id() as u64).rotate_left(32) ^ 0x9e37_79b9;
        Backoff {
            next: Self::MIN,
            seed: seed | 1,
        }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    fn delay(&mut self) -> Duration {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let half = d / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64 + 1))
    }
}

fn run(cfg: &Config, sink: &dyn Sink, lease: &Lease, counters: &Counters, shared: &Shared) {
    let mut backoff = Backoff::new();
    while !shared.stopped() {
        let term = lease.revoke();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session(cfg, sink, lease, term, counters, shared, &mut backoff)
        }));
        lease.revoke();
        counters.connected.store(false, SeqCst);
        drop(shared.socket.lock().take());
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.set_error(e),
            Err(_) => shared.set_error("the listener panicked".into()),
        }
        if shared.stopped() {
            break;
        }
        let until = clock::now() + backoff.delay().as_nanos() as u64;
        while !shared.stopped() {
            let now = clock::now();
            if now >= until {
                break;
            }
            std::thread::park_timeout(Duration::from_nanos(until - now));
        }
    }
    lease.revoke();
}

/// Frames read from a connection: a buffer and the RESP3 parser.
struct Reader {
    buf: Vec<u8>,
    start: usize,
}

/// A frame larger than this is refused (the connection is dropped): 256 MiB.
const MAX_FRAME: usize = 256 * 1024 * 1024;

impl Reader {
    fn new() -> Self {
        Reader {
            buf: Vec::with_capacity(16 * 1024),
            start: 0,
        }
    }

    /// The next frame: from what is buffered, else after one read (which may time out: `None`).
    fn frame(&mut self, conn: &mut Conn) -> Result<Option<Value>, String> {
        if let Some(v) = self.parse()? {
            return Ok(Some(v));
        }
        let mut chunk = [0u8; 16 * 1024];
        match conn.read(&mut chunk) {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(n) => {
                if self.start > 0 {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > MAX_FRAME {
                    return Err(format!("a frame over {MAX_FRAME} bytes"));
                }
                self.parse()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn parse(&mut self) -> Result<Option<Value>, String> {
        match resp::parse(&self.buf[self.start..]) {
            Ok(Some((v, n))) => {
                self.start += n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(v))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn send(conn: &mut Conn, args: &[&[u8]]) -> Result<(), String> {
    conn.write_all(&resp::encode(args))
        .and_then(|()| conn.flush())
        .map_err(|e| format!("write: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Applies a push (an invalidation or a pub/sub message); other pushes are ignored.
fn apply_push(items: &[Value], sink: &dyn Sink, counters: &Counters) {
    let kind = items.first().and_then(Value::as_bytes).unwrap_or(b"");
    if kind.eq_ignore_ascii_case(b"invalidate") {
        match items.get(1) {
            Some(Value::Array(keys)) | Some(Value::Set(keys)) => {
                for key in keys {
                    // A key that is not UTF-8 cannot be an L1 key.
                    if let Some(k) = key.as_bytes().and_then(|b| std::str::from_utf8(b).ok()) {
                        sink.invalidate(k);
                        counters
                            .record
                            .applied(k.as_bytes(), record::monotonic_ns());
                        counters.invalidations.fetch_add(1, SeqCst);
                    }
                }
            }
            // Null: FLUSHDB / FLUSHALL. Anything unexpected: flush too, to be safe.
            _ => {
                sink.flush();
                counters.flushes.fetch_add(1, SeqCst);
            }
        }
    } else if kind.eq_ignore_ascii_case(b"message") {
        match items.get(2).and_then(Value::as_bytes) {
            Some(b"*") | None => {
                sink.flush();
                counters.flushes.fetch_add(1, SeqCst);
            }
            Some(payload) => {
                if let Ok(k) = std::str::from_utf8(payload) {
                    sink.invalidate(k);
                    counters
                        .record
                        .applied(k.as_bytes(), record::monotonic_ns());
                    counters.invalidations.fetch_add(1, SeqCst);
                }
            }
        }
    }
}

/// Reads until `want` accepts a frame (pushes are applied meanwhile), or the timeout passes;
/// returns that frame.
#[allow(clippy::too_many_arguments)]
fn expect(
    conn: &mut Conn,
    rd: &mut Reader,
    timeout: Duration,
    what: &str,
    sink: &dyn Sink,
    counters: &Counters,
    shared: &Shared,
    want: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let deadline = clock::now() + timeout.as_nanos() as u64;
    loop {
        if shared.stopped() {
            return Err("stopped".into());
        }
        let now = clock::now();
        if now >= deadline {
            return Err(format!("no reply to {what} within {timeout:?}"));
        }
        conn.set_read_timeout(Duration::from_nanos(deadline - now))
            .map_err(|e| e.to_string())?;
        match rd.frame(conn)? {
            None => {}
            Some(v) if want(&v) => return Ok(v),
            Some(Value::Error(e)) => return Err(format!("{what}: {}", text(&e))),
            Some(Value::Push(items)) => apply_push(&items, sink, counters),
            Some(other) => return Err(format!("{what}: unexpected reply {other:?}")),
        }
    }
}

/// Refuses what `HELLO`'s `mode` says is no standalone server: a Cluster node (a key's slot may
/// be served elsewhere) or a sentinel (a `redis://` LOCATION naming a sentinel's port).
fn check_mode(hello: &Value) -> Result<(), String> {
    let Value::Map(fields) = hello else {
        return Ok(());
    };
    let mode = fields
        .iter()
        .find(|(k, _)| k.as_bytes() == Some(b"mode"))
        .and_then(|(_, v)| v.as_bytes())
        .unwrap_or(b"standalone");
    if mode.eq_ignore_ascii_case(b"cluster") {
        return Err(
            "the server is a Redis Cluster node: NearCache does not support Cluster".into(),
        );
    }
    if mode.eq_ignore_ascii_case(b"sentinel") {
        return Err(
            "the server is a Redis Sentinel: give LOCATION as sentinel://host:port/service".into(),
        );
    }
    Ok(())
}

fn session(
    cfg: &Config,
    sink: &dyn Sink,
    lease: &Lease,
    term: u64,
    counters: &Counters,
    shared: &Shared,
    backoff: &mut Backoff,
) -> Result<(), String> {
    // Behind Sentinel: the master as the sentinels say now (a failover moves it).
    let endpoint = match &cfg.endpoint {
        Endpoint::Sentinel(s) => {
            let (host, port) = s.master(cfg.connect_timeout, || shared.stopped())?;
            Endpoint::Tcp { host, port }
        }
        other => other.clone(),
    };
    let mut conn =
        Conn::connect(cfg, &endpoint).map_err(|e| format!("connect to {endpoint:?}: {e}"))?;
    conn.set_write_timeout(cfg.connect_timeout.max(cfg.lease))
        .map_err(|e| e.to_string())?;
    *shared.socket.lock() = conn.try_clone().ok();
    if shared.stopped() {
        return Ok(());
    }
    if let Some(t) = &cfg.tls {
        let Endpoint::Tcp { host, .. } = &endpoint else {
            return Err("TLS needs a TCP endpoint, not a unix socket".into());
        };
        // The handshake is bounded by the connect timeout (and `stop` shuts the socket down).
        conn.set_read_timeout(cfg.connect_timeout)
            .map_err(|e| e.to_string())?;
        conn = conn.start_tls(t, host)?;
        if shared.stopped() {
            return Ok(());
        }
    }
    let mut rd = Reader::new();
    let wait = cfg.connect_timeout.max(cfg.lease);

    let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(pass) = &cfg.password {
        let user = cfg.username.as_deref().unwrap_or("default");
        hello.extend([b"AUTH".as_slice(), user.as_bytes(), pass.as_bytes()]);
    }
    send(&mut conn, &hello)?;
    let hello = expect(
        &mut conn,
        &mut rd,
        wait,
        "HELLO 3",
        sink,
        counters,
        shared,
        |v| matches!(v, Value::Map(_)),
    )?;
    check_mode(&hello)?;
    if let Endpoint::Sentinel(s) = &cfg.endpoint {
        // The sentinels may name a master that has just been demoted (or not yet see the new
        // one): only a master is listened to, else this session ends and the next asks again.
        send(&mut conn, &[b"ROLE"])?;
        let role = expect(
            &mut conn,
            &mut rd,
            wait,
            "ROLE",
            sink,
            counters,
            shared,
            |v| matches!(v, Value::Array(_)),
        )?;
        let name = match &role {
            Value::Array(items) => items.first().and_then(Value::as_bytes).unwrap_or(b"?"),
            _ => b"?",
        };
        if !name.eq_ignore_ascii_case(b"master") {
            return Err(format!(
                "{endpoint:?}, named by the sentinels as the master of {:?}, is a {}",
                s.service,
                text(name)
            ));
        }
    }

    match &cfg.mode {
        Mode::Bcast => {
            let mut cmd: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
            if !cfg.prefix.is_empty() {
                cmd.extend([b"PREFIX".as_slice(), cfg.prefix.as_bytes()]);
            }
            send(&mut conn, &cmd)?;
            expect(
                &mut conn,
                &mut rd,
                wait,
                "CLIENT TRACKING",
                sink,
                counters,
                shared,
                |v| matches!(v, Value::Simple(s) if s.eq_ignore_ascii_case(b"OK")),
            )?;
        }
        Mode::Pubsub(channel) => {
            send(&mut conn, &[b"SUBSCRIBE", channel.as_bytes()])?;
            expect(
                &mut conn,
                &mut rd,
                wait,
                "SUBSCRIBE",
                sink,
                counters,
                shared,
                |v| {
                    matches!(v, Value::Push(items)
                    if items.first().and_then(Value::as_bytes)
                        .is_some_and(|k| k.eq_ignore_ascii_case(b"subscribe")))
                },
            )?;
        }
    }
    // The server now reports every change: forget whatever may have changed before.
    sink.flush();
    counters.flushes.fetch_add(1, SeqCst);
    if counters.sessions.fetch_add(1, SeqCst) > 0 {
        counters.reconnects.fetch_add(1, SeqCst);
    }
    counters.connected.store(true, SeqCst);

    let heartbeat = cfg.heartbeat().as_nanos() as u64;
    let stall = cfg.stall_limit().as_nanos() as u64;
    let mut pings: VecDeque<u64> = VecDeque::new();
    let mut next_ping = clock::now();
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let now = clock::now();
        if now >= next_ping {
            send(&mut conn, &[b"PING"])?;
            pings.push_back(now);
            next_ping = now + heartbeat;
        }
        if let Some(&oldest) = pings.front() {
            if now.saturating_sub(oldest) > stall {
                return Err(format!(
                    "no PONG for {} ms: the connection is taken for dead",
                    (now - oldest) / 1_000_000
                ));
            }
        }
        conn.set_read_timeout(Duration::from_nanos(next_ping.saturating_sub(now)))
            .map_err(|e| e.to_string())?;
        // Every buffered frame, in order, before the next heartbeat check.
        let mut next = rd.frame(&mut conn)?;
        while let Some(v) = next {
            match v {
                Value::Push(items) => apply_push(&items, sink, counters),
                Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => {
                    let Some(sent) = pings.pop_front() else {
                        return Err("a PONG nobody asked for".into());
                    };
                    lease.extend(term, sent, cfg.lease);
                    counters
                        .last_pong_rtt_ns
                        .store(clock::now().saturating_sub(sent), SeqCst);
                    backoff.reset();
                }
                Value::Error(e) => return Err(format!("server error: {}", text(&e))),
                other => return Err(format!("unexpected reply {other:?}")),
            }
            next = rd.parse()?;
        }
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    fn hello(mode: &[u8]) -> Value {
        Value::Map(vec![
            (
                Value::Bulk(b"server".to_vec()),
                Value::Bulk(b"redis".to_vec()),
            ),
            (Value::Bulk(b"mode".to_vec()), Value::Bulk(mode.to_vec())),
        ])
    }

    #[test]
    fn a_cluster_node_or_a_sentinel_is_refused_with_a_reason() {
        assert_eq!(check_mode(&hello(b"standalone")), Ok(()));
        assert_eq!(check_mode(&Value::Map(vec![])), Ok(()));
        assert!(check_mode(&hello(b"cluster"))
            .unwrap_err()
            .contains("does not support Cluster"));
        assert!(check_mode(&hello(b"sentinel"))
            .unwrap_err()
            .contains("sentinel://"));
    }
}
