//! The listener against a scripted fake server (a `TcpListener` in the test speaking RESP3), and
//! against a real `redis-server` when one is on PATH.
//!
//! The real-server tests fail when `redis-server` is missing, unless `RUSTCACHE_NO_REDIS=1`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::listener::{Config, Endpoint, Mode};
use super::resp::{self, Value};
use super::{Graveyard, Near, Sink};
use crate::clock::{self, NEVER};
use crate::entry::Pack;
use crate::store::{Limits, Put, Store, Weigh};

/// Records what the listener applied, in order.
#[derive(Default)]
struct Rec {
    events: Mutex<Vec<String>>,
    flushes: AtomicUsize,
}

impl Sink for Rec {
    fn invalidate(&self, key: &str) {
        self.events.lock().push(key.to_owned());
    }

    fn flush(&self) {
        self.flushes.fetch_add(1, SeqCst);
        self.events.lock().push("<flush>".to_owned());
    }
}

fn config(port: u16, lease_ms: u64, mode: Mode) -> Config {
    Config {
        endpoint: Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        username: Some("u".into()),
        password: Some("pw".into()),
        prefix: "p:".into(),
        lease: Duration::from_millis(lease_ms),
        mode,
        connect_timeout: Duration::from_millis(500),
        tls: None,
    }
}

/// The server side of one fake connection.
struct Peer {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    fn accept(l: &TcpListener) -> Peer {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Peer { s, buf: Vec::new() }
    }

    /// The next command, as its words.
    fn command(&mut self) -> Vec<String> {
        loop {
            if let Some((v, n)) = resp::parse(&self.buf).unwrap() {
                self.buf.drain(..n);
                let Value::Array(items) = v else {
                    panic!("not a command: {v:?}")
                };
                return items
                    .iter()
                    .map(|i| String::from_utf8_lossy(i.as_bytes().unwrap()).into_owned())
                    .collect();
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "the listener closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// HELLO (checked to carry AUTH) and the tracking or subscribe command, answered.
    fn handshake(&mut self, mode: &Mode) {
        assert_eq!(self.command(), ["HELLO", "3", "AUTH", "u", "pw"]);
        self.send(b"%2\r\n+server\r\n+fake\r\n+proto\r\n:3\r\n");
        match mode {
            Mode::Bcast => {
                let cmd = self.command();
                assert_eq!(cmd, ["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "p:"]);
                self.send(b"+OK\r\n");
            }
            Mode::Pubsub(ch) => {
                assert_eq!(self.command(), ["SUBSCRIBE", ch.as_str()]);
                self.send(format!(">3\r\n+subscribe\r\n+{ch}\r\n:1\r\n").as_bytes());
            }
        }
    }

    fn expect_ping(&mut self) {
        assert_eq!(self.command(), ["PING"]);
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn push_invalidate(keys: &[&str]) -> Vec<u8> {
    let mut out = format!(">2\r\n$10\r\ninvalidate\r\n*{}\r\n", keys.len()).into_bytes();
    for k in keys {
        out.extend_from_slice(format!("${}\r\n{k}\r\n", k.len()).as_bytes());
    }
    out
}

#[test]
fn fake_server_flush_then_fresh_after_pong_stall_expires_the_lease_and_reconnect_flushes_again() {
    const LEASE: u64 = 300;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = Arc::new(Rec::default());
    let near = Arc::new(Near::new(config(port, LEASE, Mode::Bcast), rec.clone()));
    let (stalled_tx, stalled_rx) = mpsc::channel::<u64>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (n, r) = (near.clone(), rec.clone());
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l);
        p.handshake(&Mode::Bcast);
        p.expect_ping();
        // Tracking is on and confirmed: L1 was flushed, and is not served before the PONG.
        assert_eq!(r.flushes.load(SeqCst), 1);
        assert!(!n.fresh(), "fresh before the first PONG");
        // Invalidations that precede the PONG are applied before the lease opens.
        let mut out = push_invalidate(&["p:1:a", "p:1:b"]);
        out.extend_from_slice(b"+PONG\r\n");
        p.send(&out);
        // Answer heartbeats for a while, then stall: read PINGs, answer none.
        for _ in 0..3 {
            p.expect_ping();
            p.send(b"+PONG\r\n");
        }
        stalled_tx.send(clock::now()).unwrap();
        go_rx.recv().unwrap();
        // Disconnect: the listener must connect again, flush, and be fresh after a PONG.
        drop(p);
        let mut p = Peer::accept(&l);
        p.handshake(&Mode::Bcast);
        p.expect_ping();
        assert_eq!(r.flushes.load(SeqCst), 2, "no flush after the reconnect");
        assert!(!n.fresh(), "fresh after a reconnect before its first PONG");
        p.send(b"+PONG\r\n");
        loop {
            // Keep answering until the listener goes away.
            let mut chunk = [0u8; 64];
            match p.s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    let pings = chunk[..k].windows(4).filter(|w| w == b"PING").count();
                    p.send(&b"+PONG\r\n".repeat(pings));
                }
            }
        }
    });
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    {
        let events = rec.events.lock();
        assert_eq!(events[..], ["<flush>", "p:1:a", "p:1:b"]);
    }
    // The server stopped answering at `stalled`: every PONG processed came from a PING sent
    // before, so the lease is over LEASE later at the latest.
    let stalled = stalled_rx.recv().unwrap();
    let end = stalled + LEASE * 1_000_000;
    while clock::now() <= end + 1_000_000 {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(!near.fresh(), "the lease outlived a stall");
    go_tx.send(()).unwrap();
    assert!(
        near.wait_fresh(Duration::from_secs(10)),
        "not fresh again after reconnecting"
    );
    let s = near.stats();
    assert_eq!((s.reconnects, s.flushes, s.invalidations), (1, 2, 2));
    assert!(s.connected && s.lease_ok && s.last_pong_rtt_ms.is_some());
    assert!(s.last_error.is_some(), "the disconnect was recorded");
    near.close();
    assert!(!near.fresh());
    server.join().unwrap();
}

#[test]
fn fake_server_pubsub_messages_invalidate_a_key_or_flush_on_star() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = Arc::new(Rec::default());
    let mode = Mode::Pubsub("inval".into());
    let near = Near::new(config(port, 500, mode.clone()), rec.clone());
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l);
        p.handshake(&mode);
        p.expect_ping();
        p.send(b">3\r\n$7\r\nmessage\r\n$5\r\ninval\r\n$5\r\np:1:x\r\n");
        p.send(b">3\r\n$7\r\nmessage\r\n$5\r\ninval\r\n$1\r\n*\r\n+PONG\r\n");
        let mut rest = Vec::new();
        let _ = p.s.read_to_end(&mut rest);
    });
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    assert_eq!(rec.events.lock()[..], ["<flush>", "p:1:x", "<flush>"]);
    near.close();
    server.join().unwrap();
}

#[test]
fn fake_server_the_record_stamps_applied_invalidations_and_own_write_lag() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = Arc::new(Rec::default());
    let near = Near::new(config(port, 500, Mode::Bcast), rec.clone());
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l);
        p.handshake(&Mode::Bcast);
        p.expect_ping();
        p.send(b"+PONG\r\n");
        go_rx.recv().unwrap();
        p.send(&push_invalidate(&["p:1:mine", "p:1:other"]));
        let mut rest = Vec::new();
        let _ = p.s.read_to_end(&mut rest);
    });
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    let s = near.stats();
    assert_eq!(
        (s.last_invalidation_ns, s.last_lag_ns, s.lag_samples),
        (None, None, 0)
    );
    let before = super::record::monotonic_ns();
    near.note_writes(["p:1:mine"]);
    go_tx.send(()).unwrap();
    wait_until("the pushes", Duration::from_secs(5), || {
        near.applied_ns("p:1:other").is_some()
    });
    let after = super::record::monotonic_ns();
    let mine = near.applied_ns("p:1:mine").unwrap();
    let other = near.applied_ns("p:1:other").unwrap();
    assert!(before <= mine && mine <= other && other <= after);
    assert_eq!(near.applied_ns("p:1:never"), None);
    let s = near.stats();
    assert_eq!(s.last_invalidation_ns, Some(other));
    assert_eq!(s.lag_samples, 1, "only the noted key has a write start");
    let lag = s.last_lag_ns.unwrap();
    assert!(lag <= after - before && lag <= mine - before, "{lag}");
    near.close();
    server.join().unwrap();
}

#[test]
fn fake_server_a_refused_hello_is_reported_and_retried() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rec = Arc::new(Rec::default());
    let near = Near::new(config(port, 500, Mode::Bcast), rec.clone());
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l);
        p.command();
        p.send(b"-NOPROTO unsupported protocol version\r\n");
        // The listener comes back after its backoff.
        let mut p = Peer::accept(&l);
        p.handshake(&Mode::Bcast);
        p.expect_ping();
        p.send(b"+PONG\r\n");
        let mut rest = Vec::new();
        let _ = p.s.read_to_end(&mut rest);
    });
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    let err = near.stats().last_error.unwrap();
    assert!(err.contains("NOPROTO"), "{err}");
    assert_eq!(
        rec.flushes.load(SeqCst),
        1,
        "no flush before tracking was confirmed"
    );
    near.close();
    server.join().unwrap();
}

#[test]
fn a_garbled_stream_drops_the_connection_and_the_lease() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let near = Near::new(config(port, 2_000, Mode::Bcast), Arc::new(Rec::default()));
    let (tx, rx) = mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut p = Peer::accept(&l);
        p.handshake(&Mode::Bcast);
        p.expect_ping();
        p.send(b"+PONG\r\n");
        rx.recv().unwrap();
        p.send(b"?garbage\r\n");
        // The listener hangs up on garbage: read_to_end ends.
        let mut rest = Vec::new();
        let _ = p.s.read_to_end(&mut rest);
        // Keep listening without answering: the next attempt waits for its HELLO reply (2 s),
        // so the protocol error stays the last error meanwhile.
        l
    });
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    tx.send(()).unwrap();
    wait_until("the lease to end", Duration::from_secs(5), || !near.fresh());
    wait_until("the error", Duration::from_secs(5), || {
        near.stats().last_error.is_some()
    });
    let err = near.stats().last_error.unwrap();
    assert!(err.contains("protocol error"), "{err}");
    let l = server.join().unwrap();
    near.close();
    drop(l);
}

/// A fake master: every connection gets its commands answered (HELLO, ROLE as a master,
/// CLIENT TRACKING, PING), until the listener hangs up. Counts the connections made.
struct FakeMaster {
    port: u16,
    sessions: Arc<AtomicUsize>,
}

impl FakeMaster {
    fn start() -> FakeMaster {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let sessions = Arc::new(AtomicUsize::new(0));
        let count = sessions.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                count.fetch_add(1, SeqCst);
                thread::spawn(move || {
                    let mut p = Peer { s, buf: Vec::new() };
                    loop {
                        let Some(cmd) = try_command(&mut p) else {
                            return;
                        };
                        let reply: &[u8] = match cmd[0].as_str() {
                            "HELLO" => b"%1\r\n+server\r\n+fake\r\n",
                            "ROLE" => b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n",
                            "CLIENT" => b"+OK\r\n",
                            "PING" => b"+PONG\r\n",
                            other => panic!("a fake master got {other}"),
                        };
                        if p.s.write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeMaster { port, sessions }
    }
}

/// The next command, or None once the peer hung up.
fn try_command(p: &mut Peer) -> Option<Vec<String>> {
    loop {
        if let Some((Value::Array(items), n)) = resp::parse(&p.buf).unwrap() {
            p.buf.drain(..n);
            return Some(
                items
                    .iter()
                    .map(|i| String::from_utf8_lossy(i.as_bytes().unwrap()).into_owned())
                    .collect(),
            );
        }
        let mut chunk = [0u8; 4096];
        match p.s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A fake sentinel of service `svc`: names `master` to whoever asks, takes `+switch-master`
/// subscriptions (answering their PINGs), and publishes to them on demand.
struct FakeSentinel {
    port: u16,
    master: Arc<AtomicUsize>,
    subscribers: Arc<Mutex<Vec<TcpStream>>>,
    subscriptions: Arc<AtomicUsize>,
}

impl FakeSentinel {
    fn start(master: u16) -> FakeSentinel {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = FakeSentinel {
            port,
            master: Arc::new(AtomicUsize::new(master as usize)),
            subscribers: Arc::default(),
            subscriptions: Arc::default(),
        };
        let (m, subs, count) = (
            me.master.clone(),
            me.subscribers.clone(),
            me.subscriptions.clone(),
        );
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let (m, subs, count) = (m.clone(), subs.clone(), count.clone());
                thread::spawn(move || {
                    let mut p = Peer { s, buf: Vec::new() };
                    let mut subscribed = false;
                    while let Some(cmd) = try_command(&mut p) {
                        let reply = match (cmd[0].as_str(), cmd.get(1).map(String::as_str)) {
                            ("SENTINEL", Some("GET-MASTER-ADDR-BY-NAME")) => {
                                assert_eq!(cmd[2], "svc");
                                let port = m.load(SeqCst).to_string();
                                format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{port}\r\n", port.len())
                            }
                            ("SUBSCRIBE", Some("+switch-master")) => {
                                subscribed = true;
                                subs.lock().push(p.s.try_clone().unwrap());
                                count.fetch_add(1, SeqCst);
                                "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n".into()
                            }
                            ("PING", _) if subscribed => "*2\r\n$4\r\npong\r\n$0\r\n\r\n".into(),
                            (other, _) => panic!("a fake sentinel got {other}"),
                        };
                        // Under the lock: a publication is never cut in two by a reply.
                        let _order = subs.lock();
                        if p.s.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        me
    }

    fn publish(&self, payload: &str) {
        let msg = format!(
            "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{payload}\r\n",
            payload.len()
        );
        for s in self.subscribers.lock().iter_mut() {
            let _ = s.write_all(msg.as_bytes());
        }
    }

    /// Hangs up on every subscriber (as a sentinel that restarts).
    fn drop_subscribers(&self) {
        for s in self.subscribers.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn sentinel_config(sentinels: &[u16], lease_ms: u64) -> Config {
    Config {
        endpoint: Endpoint::Sentinel(super::sentinel::Sentinels::new(
            sentinels.iter().map(|p| ("127.0.0.1".into(), *p)).collect(),
            "svc".into(),
            None,
            None,
        )),
        username: None,
        password: None,
        prefix: "p:".into(),
        lease: Duration::from_millis(lease_ms),
        mode: Mode::Bcast,
        connect_timeout: Duration::from_millis(500),
        tls: None,
    }
}

#[test]
fn a_switch_master_event_moves_the_listener_to_the_new_master_at_once() {
    // A long lease and no connection ever dropped by the old master: only the event moves it.
    let (a, b, c) = (
        FakeMaster::start(),
        FakeMaster::start(),
        FakeMaster::start(),
    );
    let sentinel = FakeSentinel::start(a.port);
    let rec = Arc::new(Rec::default());
    let near = Near::new(sentinel_config(&[sentinel.port], 60_000), rec.clone());
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(10)));
    wait_until(
        "the watcher's subscription",
        Duration::from_secs(10),
        || near.stats().watching == Some(("127.0.0.1".into(), sentinel.port)),
    );
    assert_eq!(a.sessions.load(SeqCst), 1);
    let before = super::sentinel::switches();
    let flushes = rec.flushes.load(SeqCst);

    // Another service's switch (to `c`), then ours (to `b`), as a sentinel publishes them.
    sentinel.master.store(b.port as usize, SeqCst);
    sentinel.publish(&format!("other 127.0.0.1 {} 127.0.0.1 {}", a.port, c.port));
    sentinel.publish(&format!("svc 127.0.0.1 {} 127.0.0.1 {}", a.port, b.port));
    wait_until(
        "the listener on the new master",
        Duration::from_secs(10),
        || b.sessions.load(SeqCst) == 1 && near.fresh(),
    );
    assert_eq!(
        c.sessions.load(SeqCst),
        0,
        "another service's switch was followed"
    );
    assert!(
        rec.flushes.load(SeqCst) > flushes,
        "L1 not flushed on the new master"
    );
    let s = near.stats();
    assert_eq!(s.master_switches, 1, "{s:?}");
    assert!(super::sentinel::switches() > before);
    let sw = near.last_switch().unwrap();
    assert_eq!(sw.master, ("127.0.0.1".into(), b.port));
    assert_eq!(sw.sentinel, ("127.0.0.1".into(), sentinel.port));
    assert!(s.last_error.unwrap().contains("+switch-master"));

    // The same switch again (as every other sentinel publishes it), then a switch back: one
    // more switch, not two.
    sentinel.publish(&format!("svc 127.0.0.1 {} 127.0.0.1 {}", a.port, b.port));
    sentinel.master.store(a.port as usize, SeqCst);
    sentinel.publish(&format!("svc 127.0.0.1 {} 127.0.0.1 {}", b.port, a.port));
    wait_until(
        "the listener back on the first master",
        Duration::from_secs(10),
        || a.sessions.load(SeqCst) == 2 && near.fresh(),
    );
    assert_eq!(near.stats().master_switches, 2);
    assert_eq!(b.sessions.load(SeqCst), 1);

    // The sentinel hangs up, and switches while nobody listens: the watcher subscribes again,
    // asks, and follows.
    sentinel.drop_subscribers();
    sentinel.master.store(b.port as usize, SeqCst);
    wait_until(
        "the listener on the new master",
        Duration::from_secs(10),
        || b.sessions.load(SeqCst) == 2 && near.fresh(),
    );
    assert!(sentinel.subscriptions.load(SeqCst) >= 2);
    assert_eq!(near.stats().master_switches, 3);
    assert_eq!(a.sessions.load(SeqCst), 2);
    near.close();
    assert!(near.stats().watching.is_none());
}

#[test]
fn the_watcher_moves_on_to_the_next_sentinel_when_its_own_dies() {
    let (a, b) = (FakeMaster::start(), FakeMaster::start());
    let s1 = FakeSentinel::start(a.port);
    // A second sentinel that has not switched yet when the first announces the switch.
    let s2 = FakeSentinel::start(a.port);
    let near = Near::new(
        sentinel_config(&[s1.port, s2.port], 60_000),
        Arc::new(Rec::default()),
    );
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(10)));
    wait_until(
        "the watcher's subscription",
        Duration::from_secs(10),
        || near.stats().watching.is_some(),
    );
    let watched = near.stats().watching.unwrap().1;
    let (announcer, lagging) = if watched == s1.port {
        (&s1, &s2)
    } else {
        (&s2, &s1)
    };
    announcer.master.store(b.port as usize, SeqCst);
    announcer.publish(&format!("svc 127.0.0.1 {} 127.0.0.1 {}", a.port, b.port));
    // The session asks the announcer first (the lagging one still names `a`).
    wait_until(
        "the listener on the new master",
        Duration::from_secs(10),
        || b.sessions.load(SeqCst) == 1 && near.fresh(),
    );
    assert_eq!(a.sessions.load(SeqCst), 1);
    // The announcer goes away: the watcher subscribes to the other one, which by then has
    // switched too (no new switch), and the session stays where it is.
    lagging.master.store(b.port as usize, SeqCst);
    announcer.drop_subscribers();
    wait_until(
        "a subscription to the other sentinel",
        Duration::from_secs(10),
        || lagging.subscriptions.load(SeqCst) == 1,
    );
    wait_until(
        "the watcher's subscription",
        Duration::from_secs(10),
        || near.stats().watching.is_some(),
    );
    assert_eq!(near.stats().master_switches, 1);
    assert_eq!(b.sessions.load(SeqCst), 1);
    assert!(near.fresh());
    near.close();
}

#[test]
fn the_graveyard_hands_every_buried_item_to_take_across_threads() {
    let g = Arc::new(Graveyard::<u64>::default());
    assert!(g.is_empty());
    g.bury(Vec::new());
    assert!(g.is_empty(), "an empty batch is not buried");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let g = g.clone();
            thread::spawn(move || {
                for i in 0..1_000u64 {
                    g.bury(vec![t * 1_000 + i]);
                }
            })
        })
        .collect();
    let mut got = Vec::new();
    while got.len() < 4_000 {
        got.extend(g.take());
        thread::yield_now();
    }
    for t in threads {
        t.join().unwrap();
    }
    got.extend(g.take());
    got.sort_unstable();
    assert_eq!(got, (0..4_000).collect::<Vec<_>>());
    assert!(g.is_empty());
    // What is still buried when the graveyard goes is dropped with it.
    let rc = Arc::new(());
    let h = Graveyard::default();
    h.bury(vec![rc.clone()]);
    drop(h);
    assert_eq!(Arc::strong_count(&rc), 1);
}

// ---- a real redis-server ----

/// A value weighing `.0` bytes.
struct Val(usize);

impl Weigh for Val {
    fn weight(&self) -> usize {
        self.0
    }
}

impl Pack for Val {
    fn from_tag(_: u8) -> &'static Self {
        unreachable!("Val is never tagged")
    }
}

fn lim() -> Limits {
    Limits {
        max_entries: 1_000,
        cull_frequency: 3,
        max_bytes: None,
    }
}

/// A redis-server of our own on a free loopback port, killed (by PID) when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts one; `None` only when `redis-server` is missing and `RUSTCACHE_NO_REDIS=1`.
    fn start() -> Option<Redis> {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        });
        let Some(bin): Option<PathBuf> = found else {
            if std::env::var("RUSTCACHE_NO_REDIS").as_deref() == Ok("1") {
                eprintln!("redis-server not on PATH and RUSTCACHE_NO_REDIS=1: not tested");
                return None;
            }
            panic!(
                "redis-server is not on PATH: install it (apt-get install redis-server) \
                 or set RUSTCACHE_NO_REDIS=1 to skip the real-server tests"
            );
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis { child, port };
        wait_until("redis-server to start", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(r)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Runs one command on a new plain (RESP2) connection and returns the raw reply.
    fn cmd(&self, args: &[&str]) -> Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let words: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        s.write_all(&resp::encode(&words)).unwrap();
        let mut buf = Vec::new();
        loop {
            if let Some((v, _)) = resp::parse(&buf).unwrap() {
                return v;
            }
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn real_config(port: u16, lease_ms: u64, mode: Mode) -> Config {
    Config {
        username: None,
        password: None,
        ..config(port, lease_ms, mode)
    }
}

#[test]
fn real_redis_bcast_invalidates_flushes_and_the_lease_follows_sigstop() {
    let Some(redis) = Redis::start() else { return };
    const LEASE: u64 = 400;
    let store = Arc::new(Store::<Val>::new(4));
    let near = Near::new(real_config(redis.port, LEASE, Mode::Bcast), store.clone());
    near.ensure_started().unwrap();
    assert!(
        near.wait_fresh(Duration::from_secs(5)),
        "{:?}",
        near.stats()
    );

    // A SET by another connection drops the key from L1; a key outside the prefix stays.
    store.set("p:1:a", Val(1), NEVER, Vec::new(), &lim(), 1);
    store.set("q:1:a", Val(1), NEVER, Vec::new(), &lim(), 1);
    assert_eq!(
        redis.cmd(&["SET", "p:1:a", "2"]),
        Value::Simple(b"OK".to_vec())
    );
    wait_until("the invalidation", Duration::from_secs(5), || {
        !store.contains("p:1:a", 1)
    });
    redis.cmd(&["SET", "q:1:a", "2"]);
    assert!(store.contains("q:1:a", 1));

    // The fill race: GET returned, then the invalidation, then the put stores nothing.
    let token = store.fill_begin("p:1:b", &lim(), 1);
    let seen = near.stats().invalidations;
    redis.cmd(&["SET", "p:1:b", "new"]);
    wait_until("the invalidation", Duration::from_secs(5), || {
        near.stats().invalidations > seen
    });
    let put = store.fill_put("p:1:b", token, Val(1), NEVER, Vec::new(), false, &lim(), 1);
    assert_eq!(put, Put::Stale);
    assert!(!store.contains("p:1:b", 1));

    // FLUSHDB: a null invalidation flushes all of L1.
    let flushes = near.stats().flushes;
    redis.cmd(&["FLUSHDB"]);
    wait_until("the flush", Duration::from_secs(5), || store.is_empty());
    // The listener counts a flush just after applying it: wait for the count too.
    wait_until("the flush count", Duration::from_secs(5), || {
        near.stats().flushes > flushes
    });
    assert_eq!(near.stats().flushes, flushes + 1);

    // SIGSTOP: once kill returns, no PING sent later is answered: dark within LEASE (20 ms
    // allowed for the stop to land after kill returns).
    assert!(near.wait_fresh(Duration::from_secs(5)));
    redis.signal("-STOP");
    let stopped = clock::now();
    while clock::now() <= stopped + LEASE * 1_000_000 + 20_000_000 {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !near.fresh(),
        "L1 served after the server stopped for a lease"
    );
    redis.signal("-CONT");
    assert!(
        near.wait_fresh(Duration::from_secs(10)),
        "{:?}",
        near.stats()
    );
    near.close();
    assert!(!near.fresh());
}

#[test]
fn real_redis_pubsub_mode_invalidates_published_keys_and_flushes_on_star() {
    let Some(redis) = Redis::start() else { return };
    let store = Arc::new(Store::<Val>::new(1));
    let mode = Mode::Pubsub("rustcache:inval".into());
    let near = Near::new(real_config(redis.port, 500, mode), store.clone());
    near.ensure_started().unwrap();
    assert!(
        near.wait_fresh(Duration::from_secs(5)),
        "{:?}",
        near.stats()
    );
    store.set("p:1:a", Val(1), NEVER, Vec::new(), &lim(), 1);
    store.set("p:1:b", Val(1), NEVER, Vec::new(), &lim(), 1);
    redis.cmd(&["PUBLISH", "rustcache:inval", "p:1:a"]);
    wait_until("the message", Duration::from_secs(5), || {
        !store.contains("p:1:a", 1)
    });
    assert!(store.contains("p:1:b", 1));
    redis.cmd(&["PUBLISH", "rustcache:inval", "*"]);
    wait_until("the flush", Duration::from_secs(5), || store.is_empty());
    // Heartbeats keep the lease going in subscribed mode too.
    thread::sleep(Duration::from_millis(700));
    assert!(near.fresh(), "{:?}", near.stats());
    near.close();
}

#[test]
fn real_redis_killed_and_restarted_reconnects_and_flushes() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let store = Arc::new(Store::<Val>::new(1));
    let near = Near::new(real_config(redis.port, 300, Mode::Bcast), store.clone());
    near.ensure_started().unwrap();
    assert!(near.wait_fresh(Duration::from_secs(5)));
    store.set("p:1:a", Val(1), NEVER, Vec::new(), &lim(), 1);
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    wait_until("the lease to end", Duration::from_secs(5), || !near.fresh());
    let port = redis.port;
    let bin = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .unwrap();
    let bin = String::from_utf8(bin.stdout).unwrap();
    redis.child = Command::new(bin.trim())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        near.wait_fresh(Duration::from_secs(10)),
        "{:?}",
        near.stats()
    );
    assert!(store.is_empty(), "L1 was not flushed after the reconnect");
    assert!(near.stats().reconnects >= 1);
    near.close();
}
