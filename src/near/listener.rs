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
//!
//! A master that fails over alive would keep the session (and the lease) until the sentinels
//! convert it, seconds later: so a second thread, the watcher (`watch`), holds a subscription to
//! one sentinel's `+switch-master` channel. When that sentinel names a new master for the
//! service, the watcher makes it the sentinel asked first, counts the switch
//! (`sentinel::note_switch`: the data path drops its connections to the old master when it sees
//! the count move), and, if the session is on another server, revokes the lease and shuts the
//! session's socket down: the next session asks again, reaches the new master, flushes L1 and
//! serves after its first PONG. A session also ends by itself when it sees a switch to a master
//! other than its own. When its sentinel drops, the watcher subscribes to the next one and asks
//! it for the master (a switch missed meanwhile is noticed that way); duplicates (every sentinel
//! publishes the switch, and a re-subscription asks again) change nothing once the master is
//! known. The watcher runs inside the listener's thread scope: it ends with the listener, and a
//! forked child has neither (its new listener starts a new watcher).

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
use super::sentinel::{note_switch, Heard, Sentinels};
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
    /// Master switches (`+switch-master`) the watcher acted on.
    pub switches: AtomicU64,
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

/// A master switch the watcher acted on: for the data path, which asks the same sentinel first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    /// `sentinel::switches()` once it was counted.
    pub epoch: u64,
    /// The new master.
    pub master: (String, u16),
    /// The sentinel that announced it.
    pub sentinel: (String, u16),
}

/// What one running listener thread (and its watcher) shares with its owner.
#[derive(Default)]
pub struct Shared {
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// A clone of the live connection, so that `stop` can shut it down at once.
    socket: Mutex<Option<Conn>>,
    /// The master the current session asked for (None between sessions).
    session_master: Mutex<Option<(String, u16)>>,
    /// The master the watcher's sentinel names (None until it answered).
    announced: Mutex<Option<(String, u16)>>,
    /// Moved on each time `announced` changes: a session compares its master then.
    announcements: AtomicU64,
    /// The last switch the watcher acted on.
    last_switch: Mutex<Option<Switch>>,
    /// The watcher's subscription (a clone, for `stop`), its sentinel, its last error, and
    /// its thread (to wake it from a backoff).
    watch_socket: Mutex<Option<Conn>>,
    watching: Mutex<Option<(String, u16)>>,
    watch_error: Mutex<Option<String>>,
    watcher: Mutex<Option<std::thread::Thread>>,
}

impl Shared {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// The last master switch the watcher acted on.
    pub fn last_switch(&self) -> Option<Switch> {
        self.last_switch.lock().clone()
    }

    /// The sentinel the watcher is subscribed to, and why its last subscription failed or
    /// ended.
    pub fn watch_state(&self) -> (Option<(String, u16)>, Option<String>) {
        (
            self.watching.lock().clone(),
            self.watch_error.lock().clone(),
        )
    }

    /// Whether the sentinels announced a master other than `master` (the session's).
    fn announced_other(&self, master: &(String, u16)) -> Option<(String, u16)> {
        self.announced
            .lock()
            .as_ref()
            .filter(|a| *a != master)
            .cloned()
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock() = Some(e);
    }

    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Parks this thread for `delay` (a reconnect backoff), waking early when stopped (`stop`
    /// unparks the listener and the watcher).
    fn sleep(&self, delay: Duration) {
        let until = clock::now() + delay.as_nanos() as u64;
        while !self.stopped() {
            let now = clock::now();
            if now >= until {
                break;
            }
            std::thread::park_timeout(Duration::from_nanos(until - now));
        }
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

    /// Asks the thread (and its watcher) to stop and wakes them (shutting their connections
    /// down), without waiting.
    pub fn signal_stop(&self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(conn) = self.shared.socket.lock().as_ref() {
            conn.shutdown();
        }
        if let Some(conn) = self.shared.watch_socket.lock().as_ref() {
            conn.shutdown();
        }
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        if let Some(t) = self.shared.watcher.lock().as_ref() {
            t.unpark();
        }
    }

    /// Stops the thread and waits for it (at most about a connect timeout: a connect in
    /// progress is not interrupted; behind Sentinel, the watcher's, in the same scope, may take
    /// up to twice that: a subscription's connection, then its ask's).
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
        for socket in [&self.shared.socket, &self.shared.watch_socket] {
            if let Some(mut slot) = socket.try_lock() {
                if let Some(conn) = slot.take() {
                    conn.forget_in_child();
                }
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
    std::thread::scope(|scope| {
        if let Endpoint::Sentinel(s) = &cfg.endpoint {
            let started = std::thread::Builder::new()
                .name("rustcache-sentinel".into())
                .spawn_scoped(scope, || watch(cfg, s, lease, counters, shared));
            if let Err(e) = started {
                // The listener still follows the master at each reconnect, as without it.
                *shared.watch_error.lock() = Some(format!("cannot start the watcher: {e}"));
            }
        }
        listen(cfg, sink, lease, counters, shared);
    });
}

fn listen(cfg: &Config, sink: &dyn Sink, lease: &Lease, counters: &Counters, shared: &Shared) {
    let mut backoff = Backoff::new();
    while !shared.stopped() {
        let term = lease.revoke();
        let announcements = shared.announcements.load(SeqCst);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session(cfg, sink, lease, term, counters, shared, &mut backoff)
        }));
        lease.revoke();
        counters.connected.store(false, SeqCst);
        drop(shared.socket.lock().take());
        let master = shared.session_master.lock().take();
        match outcome {
            Ok(Ok(())) => {}
            // Ended by the watcher (its socket shut down under it): say why.
            Ok(Err(_))
                if shared.announcements.load(SeqCst) != announcements
                    && master
                        .as_ref()
                        .is_some_and(|m| shared.announced_other(m).is_some()) =>
            {
                let (host, port) = shared.announced.lock().clone().unwrap_or_default();
                shared.set_error(format!(
                    "the sentinels switched the master to {host}:{port} (+switch-master)"
                ));
            }
            Ok(Err(e)) => shared.set_error(e),
            Err(_) => shared.set_error("the listener panicked".into()),
        }
        if shared.stopped() {
            break;
        }
        shared.sleep(backoff.delay());
    }
    lease.revoke();
}

/// The watcher (behind Sentinel): a subscription to one sentinel's `+switch-master`, renewed on
/// the next sentinel when it drops (after the listener's backoff), until the listener stops.
fn watch(cfg: &Config, s: &Sentinels, lease: &Lease, counters: &Counters, shared: &Shared) {
    *shared.watcher.lock() = Some(std::thread::current());
    let mut backoff = Backoff::new();
    // The master the watcher last learned of, across subscriptions (None: none yet).
    let mut known: Option<(String, u16)> = None;
    while !shared.stopped() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            watch_session(cfg, s, lease, counters, shared, &mut known, &mut backoff)
        }));
        drop(shared.watch_socket.lock().take());
        *shared.watching.lock() = None;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => *shared.watch_error.lock() = Some(e),
            Err(_) => *shared.watch_error.lock() = Some("the watcher panicked".into()),
        }
        if shared.stopped() {
            break;
        }
        // The next subscription starts from the next sentinel.
        s.prefer(s.preferred() + 1);
        shared.sleep(backoff.delay());
    }
}

/// A connection's heartbeat: a PING every `cfg.heartbeat()`, and the send times of those not yet
/// answered (answers come in order), so that a connection whose oldest unanswered PING is older
/// than `cfg.stall_limit()` is taken for dead. Used by the listener and the Sentinel watcher.
struct Heartbeat {
    every: u64,
    stall: u64,
    next: u64,
    unanswered: VecDeque<u64>,
}

impl Heartbeat {
    /// A heartbeat whose first PING is due at `first` (clock nanoseconds).
    fn new(cfg: &Config, first: u64) -> Self {
        Heartbeat {
            every: cfg.heartbeat().as_nanos() as u64,
            stall: cfg.stall_limit().as_nanos() as u64,
            next: first,
            unanswered: VecDeque::new(),
        }
    }

    /// Whether a PING is due at `now`; if so it counts as sent now (the caller sends it).
    fn due(&mut self, now: u64) -> bool {
        if now < self.next {
            return false;
        }
        self.unanswered.push_back(now);
        self.next = now + self.every;
        true
    }

    /// Milliseconds the oldest unanswered PING has waited, if that is past the stall limit.
    fn stalled(&self, now: u64) -> Option<u64> {
        let &oldest = self.unanswered.front()?;
        (now.saturating_sub(oldest) > self.stall).then(|| (now - oldest) / 1_000_000)
    }

    /// A PONG came: the send time of the PING it answers (None if none was waiting).
    fn answered(&mut self) -> Option<u64> {
        self.unanswered.pop_front()
    }

    /// How long to wait for input before the next PING is due.
    fn until_next(&self, now: u64) -> Duration {
        Duration::from_nanos(self.next.saturating_sub(now))
    }
}

fn watch_session(
    cfg: &Config,
    s: &Sentinels,
    lease: &Lease,
    counters: &Counters,
    shared: &Shared,
    known: &mut Option<(String, u16)>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let (mut sub, master) = s.subscribe(cfg.connect_timeout, || shared.stopped())?;
    // For `stop`: a clone of the socket (registered, so a forked child closes it too).
    let clone = sub.try_clone().map_err(|e| e.to_string())?;
    *shared.watch_socket.lock() = Some(Conn::new(Stream::Tcp(clone)));
    if shared.stopped() {
        return Ok(());
    }
    *shared.watching.lock() = Some(s.addrs[sub.index].clone());
    *shared.watch_error.lock() = None;
    backoff.reset();
    // What the sentinel names now: a switch missed while no subscription was on shows here.
    observe(s, lease, counters, shared, known, master, sub.index);
    let mut beat = Heartbeat::new(cfg, clock::now() + cfg.heartbeat().as_nanos() as u64);
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let now = clock::now();
        if beat.due(now) {
            sub.ping()?;
        }
        if let Some(ms) = beat.stalled(now) {
            return Err(format!("the sentinel answered no PING for {ms} ms"));
        }
        match sub.next(beat.until_next(now), &s.service)? {
            Some(Heard::Switch(host, port)) => {
                observe(s, lease, counters, shared, known, (host, port), sub.index)
            }
            Some(Heard::Pong) => {
                beat.answered();
            }
            Some(Heard::Other) | None => {}
        }
    }
}

/// The watcher's sentinel (`by`, an index in `s.addrs`) names `master`: once it differs from the
/// master known before, or from the one the session is on, act on the switch. Repeats (every
/// sentinel publishes it; a new subscription asks again) change nothing.
///
/// Order matters: the switch is counted (`note_switch`, which the data path follows) before
/// anything can make a session end and the next one flush L1, so that a fill begun after that
/// flush never reads the old master; a session that stores its master after `session_master`
/// was read here checks it against the announcement (`switched_away`), counting it too.
fn observe(
    s: &Sentinels,
    lease: &Lease,
    counters: &Counters,
    shared: &Shared,
    known: &mut Option<(String, u16)>,
    master: (String, u16),
    by: usize,
) {
    let moved = known.as_ref().is_some_and(|k| *k != master);
    *known = Some(master.clone());
    // Sessions ask this sentinel first: the others may not have switched yet.
    s.prefer(by);
    let session = shared.session_master.lock().clone();
    let elsewhere = session.as_ref().is_some_and(|m| *m != master);
    let switch = moved || elsewhere;
    if switch {
        let epoch = note_switch();
        *shared.last_switch.lock() = Some(Switch {
            epoch,
            master: master.clone(),
            sentinel: s.addrs[by].clone(),
        });
    }
    let before = shared.announced.lock().replace(master.clone());
    if before.as_ref() != Some(&master) {
        shared.announcements.fetch_add(1, SeqCst);
    }
    if elsewhere {
        // L1 stops serving now; the session's next read fails and the next session asks again.
        lease.revoke();
        if let Some(conn) = shared.socket.lock().as_ref() {
            conn.shutdown();
        }
    }
    if switch {
        // Last: once `stats()` shows it, the lease is revoked and the data path follows.
        counters.switches.fetch_add(1, SeqCst);
    }
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
    let mut announcements = shared.announcements.load(SeqCst);
    let endpoint = match &cfg.endpoint {
        Endpoint::Sentinel(s) => {
            let (host, port) = s.master(cfg.connect_timeout, || shared.stopped())?;
            *shared.session_master.lock() = Some((host.clone(), port));
            Endpoint::Tcp { host, port }
        }
        other => other.clone(),
    };
    // Whether the watcher heard of a master other than this session's (a sentinel asked above
    // may not have switched yet): then this session must end, before it flushes or serves.
    let switched_away = |announcements: &mut u64| -> Result<(), String> {
        let Endpoint::Tcp { host, port } = &endpoint else {
            return Ok(());
        };
        if !matches!(cfg.endpoint, Endpoint::Sentinel(_)) {
            return Ok(());
        }
        *announcements = shared.announcements.load(SeqCst);
        match shared.announced_other(&(host.clone(), *port)) {
            Some((h, p)) => {
                // The data path follows too, before the next session flushes L1 (`observe`).
                note_switch();
                Err(format!(
                    "the sentinels switched the master to {h}:{p} (+switch-master), not \
                     {host}:{port}"
                ))
            }
            None => Ok(()),
        }
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
    switched_away(&mut announcements)?;
    // The server now reports every change: forget whatever may have changed before.
    sink.flush();
    counters.flushes.fetch_add(1, SeqCst);
    if counters.sessions.fetch_add(1, SeqCst) > 0 {
        counters.reconnects.fetch_add(1, SeqCst);
    }
    counters.connected.store(true, SeqCst);

    let mut beat = Heartbeat::new(cfg, clock::now());
    loop {
        if shared.stopped() {
            return Ok(());
        }
        if shared.announcements.load(SeqCst) != announcements {
            switched_away(&mut announcements)?;
        }
        let now = clock::now();
        if beat.due(now) {
            send(&mut conn, &[b"PING"])?;
        }
        if let Some(ms) = beat.stalled(now) {
            return Err(format!(
                "no PONG for {ms} ms: the connection is taken for dead"
            ));
        }
        conn.set_read_timeout(beat.until_next(now))
            .map_err(|e| e.to_string())?;
        // Every buffered frame, in order, before the next heartbeat check.
        let mut next = rd.frame(&mut conn)?;
        while let Some(v) = next {
            match v {
                Value::Push(items) => apply_push(&items, sink, counters),
                Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => {
                    let Some(sent) = beat.answered() else {
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
mod heartbeat_tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_heartbeat_pings_on_time_and_takes_the_oldest_unanswered_ping_past_the_limit_for_dead() {
        // Lease 100 ms: a PING every 20 ms, dead after 500 ms (the connect timeout) unanswered.
        let cfg = Config {
            endpoint: Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 1,
            },
            username: None,
            password: None,
            prefix: String::new(),
            lease: Duration::from_millis(100),
            mode: Mode::Bcast,
            connect_timeout: Duration::from_millis(500),
            tls: None,
        };
        let mut beat = Heartbeat::new(&cfg, 10 * MS);
        assert!(!beat.due(9 * MS));
        assert_eq!(beat.until_next(9 * MS), Duration::from_millis(1));
        assert!(beat.due(10 * MS));
        assert!(
            !beat.due(29 * MS),
            "the next PING is due 20 ms after the last"
        );
        assert!(beat.due(31 * MS));
        assert_eq!(beat.until_next(31 * MS), Duration::from_millis(20));
        // Answers come in order: the first PONG answers the PING sent at 10 ms.
        assert_eq!(beat.answered(), Some(10 * MS));
        assert_eq!(beat.stalled(531 * MS), None, "500 ms is not past the limit");
        assert_eq!(beat.stalled(532 * MS), Some(501));
        assert_eq!(beat.answered(), Some(31 * MS));
        assert_eq!(beat.stalled(10_000 * MS), None, "nothing unanswered");
        assert_eq!(beat.answered(), None, "a PONG nobody asked for");
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
