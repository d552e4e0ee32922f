//! Redis Sentinel for the listener: which server is the master of a service, now, and when that
//! changes.
//!
//! The listener asks at the start of every session (so after a failover it follows the new
//! master), trying the sentinels in turn, each bounded by the connect timeout for the connection
//! and for every reply: `[AUTH [user] pass]`, then `SENTINEL GET-MASTER-ADDR-BY-NAME <service>`
//! (RESP2: a sentinel needs no `HELLO`). A sentinel that is down, refuses the password or does
//! not know the service is skipped; when none answers, the session fails with every sentinel's
//! reason and the listener retries after its backoff. Once connected, `listener.rs` checks with
//! `ROLE` that the server is a master (sentinels may still name a demoted one for a moment).
//!
//! A master that fails over alive (`SENTINEL FAILOVER`, a partition) keeps its connections until
//! the sentinels convert it to a replica, seconds later. So the listener also holds a
//! subscription to one sentinel's `+switch-master` channel (`Subscription`): the sentinel
//! publishes `<service> <old-ip> <old-port> <new-ip> <new-port>` there the moment it switches
//! (every sentinel does, when it learns of it); `parse_switch` picks out this service's.
//! `SWITCHES` counts the switches this process's listeners acted on, for the data path to notice
//! with one atomic load.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Duration;

use super::inherited;
use super::resp::{self, Value};
use crate::clock;

/// The sentinels of one service, and how to log in to them (not to the master: `Config`'s
/// `username`/`password` are the master's).
pub struct Sentinels {
    pub addrs: Vec<(String, u16)>,
    pub service: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sentinel that answered last: asked first next time (as redis-py does).
    first: AtomicUsize,
}

impl Clone for Sentinels {
    fn clone(&self) -> Self {
        Sentinels {
            addrs: self.addrs.clone(),
            service: self.service.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            first: AtomicUsize::new(self.first.load(Relaxed)),
        }
    }
}

/// Without the password (a `Near`'s repr shows its endpoint).
impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinels")
            .field("addrs", &self.addrs)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Sentinels {
    fn eq(&self, other: &Self) -> bool {
        self.addrs == other.addrs
            && self.service == other.service
            && self.username == other.username
            && self.password == other.password
    }
}

impl Eq for Sentinels {}

impl Sentinels {
    pub fn new(
        addrs: Vec<(String, u16)>,
        service: String,
        username: Option<String>,
        password: Option<String>,
    ) -> Sentinels {
        Sentinels {
            addrs,
            service,
            username,
            password,
            first: AtomicUsize::new(0),
        }
    }

    /// The master's (host, port) as the first sentinel that knows it says, or why none did.
    /// `stopped` is checked between sentinels, so that `stop` is not held up by a dead one.
    pub fn master(
        &self,
        timeout: Duration,
        stopped: impl Fn() -> bool,
    ) -> Result<(String, u16), String> {
        let n = self.addrs.len();
        if n == 0 {
            return Err("no sentinel given".into());
        }
        let first = self.first.load(Relaxed) % n;
        let mut reasons = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            if stopped() {
                return Err("stopped".into());
            }
            let (host, port) = &self.addrs[i];
            match self.ask(host, *port, timeout) {
                Ok(addr) => {
                    self.first.store(i, Relaxed);
                    return Ok(addr);
                }
                Err(e) => reasons.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(format!(
            "no sentinel gave the master of {:?}: {}",
            self.service,
            reasons.join("; ")
        ))
    }

    /// Asks the sentinels first from the one at `index` on (the one that announced a switch:
    /// the others may not know of it yet).
    pub fn prefer(&self, index: usize) {
        self.first.store(index, Relaxed);
    }

    /// The sentinel asked first next time.
    pub fn preferred(&self) -> usize {
        self.first.load(Relaxed) % self.addrs.len().max(1)
    }

    /// Connected and logged in to one sentinel, with the deadline for its replies.
    fn login(&self, host: &str, port: u16, timeout: Duration) -> Result<(Link, u64), String> {
        let s = connect(host, port, timeout).map_err(|e| format!("connect: {e}"))?;
        // A forked child closes its copy at once (as the listener's own connection's), so
        // that it never holds this connection open.
        let mut link = Link {
            _inherited: inherited::register(s.as_raw_fd()),
            s,
        };
        let deadline = clock::now() + timeout.as_nanos() as u64;
        if let Some(pass) = &self.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.username {
                auth.push(user.as_bytes());
            }
            auth.push(pass.as_bytes());
            match call(&mut link.s, &auth, deadline)? {
                Value::Simple(ok) if ok.eq_ignore_ascii_case(b"OK") => {}
                Value::Error(e) => return Err(format!("AUTH: {}", String::from_utf8_lossy(&e))),
                other => return Err(format!("AUTH: unexpected reply {other:?}")),
            }
        }
        Ok((link, deadline))
    }

    /// One sentinel's answer.
    fn ask(&self, host: &str, port: u16, timeout: Duration) -> Result<(String, u16), String> {
        let (mut link, deadline) = self.login(host, port, timeout)?;
        let cmd: [&[u8]; 3] = [
            b"SENTINEL",
            b"GET-MASTER-ADDR-BY-NAME",
            self.service.as_bytes(),
        ];
        match call(&mut link.s, &cmd, deadline)? {
            Value::Array(items) if items.len() == 2 => {
                let host = items[0]
                    .as_bytes()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .filter(|h| !h.is_empty())
                    .ok_or("a master address without a host")?;
                let port = items[1]
                    .as_bytes()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p > 0)
                    .ok_or("a master address without a valid port")?;
                Ok((host.to_owned(), port))
            }
            Value::Null => Err(format!("it knows no service named {:?}", self.service)),
            Value::Error(e) => Err(String::from_utf8_lossy(&e).into_owned()),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// A subscription to `+switch-master` on the first sentinel, from the preferred one on,
    /// that takes it, and the master that sentinel names right after (asked on a connection of
    /// its own once the subscription is confirmed, so that no switch falls between the two).
    /// `stopped` is checked between sentinels.
    pub fn subscribe(
        &self,
        timeout: Duration,
        stopped: impl Fn() -> bool,
    ) -> Result<(Subscription, (String, u16)), String> {
        let n = self.addrs.len();
        if n == 0 {
            return Err("no sentinel given".into());
        }
        let first = self.preferred();
        let mut reasons = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            if stopped() {
                return Err("stopped".into());
            }
            let (host, port) = &self.addrs[i];
            match self.subscribe_to(i, timeout, &stopped) {
                Ok(done) => return Ok(done),
                Err(e) => reasons.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(format!(
            "no sentinel took a +switch-master subscription: {}",
            reasons.join("; ")
        ))
    }

    fn subscribe_to(
        &self,
        index: usize,
        timeout: Duration,
        stopped: &impl Fn() -> bool,
    ) -> Result<(Subscription, (String, u16)), String> {
        let (host, port) = &self.addrs[index];
        let (mut link, deadline) = self.login(host, *port, timeout)?;
        let mut sub = Subscription {
            index,
            buf: Vec::new(),
            link: {
                link.s
                    .write_all(&resp::encode(&[b"SUBSCRIBE", SWITCH_CHANNEL]))
                    .map_err(|e| format!("write: {e}"))?;
                link
            },
        };
        loop {
            let now = clock::now();
            if now >= deadline {
                return Err("no reply to SUBSCRIBE in time".into());
            }
            match sub.read(Duration::from_nanos(deadline - now))? {
                Some(Value::Array(items))
                    if items.first().and_then(Value::as_bytes) == Some(b"subscribe") =>
                {
                    break
                }
                Some(Value::Error(e)) => {
                    return Err(format!("SUBSCRIBE: {}", String::from_utf8_lossy(&e)))
                }
                Some(other) => return Err(format!("SUBSCRIBE: unexpected reply {other:?}")),
                None => {}
            }
        }
        if stopped() {
            return Err("stopped".into());
        }
        let master = self.ask(host, *port, timeout)?;
        Ok((sub, master))
    }
}

/// The pub/sub channel on which a sentinel announces that a service's master changed.
pub const SWITCH_CHANNEL: &[u8] = b"+switch-master";

/// Switches of a master that this process's listeners acted on (see `note_switch`).
static SWITCHES: AtomicU64 = AtomicU64::new(0);

/// How many master switches this process's listeners acted on: the data path compares it with
/// the value it last saw, and drops its connections to the old master when it moved on.
pub fn switches() -> u64 {
    SWITCHES.load(SeqCst)
}

/// Counts one more switch; returns the new count (its epoch).
pub fn note_switch() -> u64 {
    SWITCHES.fetch_add(1, SeqCst) + 1
}

/// The new master of a `+switch-master` payload (`<service> <old-ip> <old-port> <new-ip>
/// <new-port>`) if it is about `service`; None for another service or a malformed payload. The
/// service name is what precedes the last four fields (read from the right: it may hold spaces).
pub fn parse_switch(payload: &[u8], service: &str) -> Option<(String, u16)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.rsplitn(5, ' ');
    let new_port = fields.next()?.parse::<u16>().ok().filter(|p| *p > 0)?;
    let new_host = fields.next().filter(|h| !h.is_empty())?;
    let _old_port = fields.next()?.parse::<u16>().ok()?;
    let _old_host = fields.next()?;
    let name = fields.next()?;
    (name == service).then(|| (new_host.to_owned(), new_port))
}

/// A connection to a sentinel; a forked child closes its copy at once (`inherited`).
struct Link {
    // Declared first, so dropped first: deregistered before the socket closes its descriptor.
    _inherited: inherited::Registered,
    s: TcpStream,
}

/// What a subscribed sentinel sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// `+switch-master` for our service: its new master.
    Switch(String, u16),
    /// The answer to a `PING`.
    Pong,
    /// A message for another service (or one we cannot read): ignored.
    Other,
}

/// One sentinel's `+switch-master` channel, subscribed.
pub struct Subscription {
    /// Which of `Sentinels::addrs` it is.
    pub index: usize,
    link: Link,
    buf: Vec<u8>,
}

impl Subscription {
    /// A second handle on the socket, for `shutdown` only (by `stop`, from another thread).
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        self.link.s.try_clone()
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.link.s.as_raw_fd()
    }

    /// Sends a `PING` (answered, while subscribed, as `["pong", ""]`).
    pub fn ping(&mut self) -> Result<(), String> {
        self.link
            .s
            .write_all(&resp::encode(&[b"PING"]))
            .map_err(|e| format!("write: {e}"))
    }

    /// What the sentinel sent next, waiting at most `wait` (None: nothing came).
    pub fn next(&mut self, wait: Duration, service: &str) -> Result<Option<Heard>, String> {
        let Some(v) = self.read(wait)? else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(format!("unexpected frame {v:?}"));
        };
        let kind = items.first().and_then(Value::as_bytes).unwrap_or(b"");
        if kind.eq_ignore_ascii_case(b"pong") {
            return Ok(Some(Heard::Pong));
        }
        if kind.eq_ignore_ascii_case(b"message")
            && items.get(1).and_then(Value::as_bytes) == Some(SWITCH_CHANNEL)
        {
            if let Some((host, port)) = items
                .get(2)
                .and_then(Value::as_bytes)
                .and_then(|p| parse_switch(p, service))
            {
                return Ok(Some(Heard::Switch(host, port)));
            }
        }
        Ok(Some(Heard::Other))
    }

    /// The next frame, from what is buffered or after one read of at most `wait`.
    fn read(&mut self, wait: Duration) -> Result<Option<Value>, String> {
        if let Some(v) = self.parse()? {
            return Ok(Some(v));
        }
        self.link
            .s
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        match self.link.s.read(&mut chunk) {
            Ok(0) => Err("the sentinel closed the connection".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > 1 << 20 {
                    return Err("a frame over 1 MiB".into());
                }
                self.parse()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn parse(&mut self) -> Result<Option<Value>, String> {
        match resp::parse(&self.buf).map_err(|e| e.to_string())? {
            Some((v, n)) => {
                self.buf.drain(..n);
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }
}

fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
    }))
}

/// Sends one command and reads its reply, all before `deadline` (clock ns).
fn call(s: &mut TcpStream, args: &[&[u8]], deadline: u64) -> Result<Value, String> {
    s.write_all(&resp::encode(args))
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    loop {
        if let Some((v, _)) = resp::parse(&buf).map_err(|e| e.to_string())? {
            return Ok(v);
        }
        let now = clock::now();
        if now >= deadline {
            return Err("no reply in time".into());
        }
        s.set_read_timeout(Some(
            Duration::from_nanos(deadline - now).max(Duration::from_millis(1)),
        ))
        .map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Err("the sentinel closed the connection".into()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 1 << 20 {
                    return Err("a reply over 1 MiB".into());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no reply in time".into())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A fake sentinel answering each connection's commands with `replies`, in order.
    fn fake(replies: Vec<&'static [u8]>) -> (u16, thread::JoinHandle<Vec<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            for r in replies {
                loop {
                    if let Some((Value::Array(items), n)) = resp::parse(&buf).unwrap() {
                        buf.drain(..n);
                        seen.push(
                            items
                                .iter()
                                .map(|i| String::from_utf8_lossy(i.as_bytes().unwrap()).into())
                                .collect(),
                        );
                        break;
                    }
                    let mut chunk = [0u8; 1024];
                    let n = s.read(&mut chunk).unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
                s.write_all(r).unwrap();
            }
            seen
        });
        (port, h)
    }

    fn dead_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn skips_a_dead_sentinel_and_authenticates_to_the_next() {
        let (port, h) = fake(vec![b"+OK\r\n", b"*2\r\n$9\r\n127.0.0.2\r\n$4\r\n6380\r\n"]);
        let s = Sentinels::new(
            vec![
                ("127.0.0.1".into(), dead_port()),
                ("127.0.0.1".into(), port),
            ],
            "svc".into(),
            Some("su".into()),
            Some("spw".into()),
        );
        assert_eq!(s.master(T, || false).unwrap(), ("127.0.0.2".into(), 6380));
        let seen = h.join().unwrap();
        assert_eq!(seen[0], ["AUTH", "su", "spw"]);
        assert_eq!(seen[1], ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "svc"]);
        // The one that answered is asked first next time.
        assert_eq!(s.first.load(Relaxed), 1);
    }

    #[test]
    fn an_unknown_service_and_refused_auth_are_reported_per_sentinel() {
        let (p1, h1) = fake(vec![b"*-1\r\n"]);
        let (p2, h2) = fake(vec![b"-WRONGPASS invalid password\r\n"]);
        let s = Sentinels::new(
            vec![("127.0.0.1".into(), p1), ("127.0.0.1".into(), p2)],
            "nope".into(),
            None,
            Some("bad".into()),
        );
        // The first fake gets AUTH first: answer it with the null, which is no OK.
        let e = s.master(T, || false).unwrap_err();
        h1.join().unwrap();
        h2.join().unwrap();
        assert!(e.contains("\"nope\""), "{e}");
        assert!(e.contains("AUTH: unexpected reply Null"), "{e}");
        assert!(e.contains("AUTH: WRONGPASS"), "{e}");

        let (p3, h3) = fake(vec![b"*-1\r\n"]);
        let s = Sentinels::new(vec![("127.0.0.1".into(), p3)], "nope".into(), None, None);
        let e = s.master(T, || false).unwrap_err();
        h3.join().unwrap();
        assert!(e.contains("knows no service named \"nope\""), "{e}");
    }

    #[test]
    fn a_silent_sentinel_times_out_and_a_bad_address_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap(); // accepts, never answers
        let port = l.local_addr().unwrap().port();
        let s = Sentinels::new(vec![("127.0.0.1".into(), port)], "svc".into(), None, None);
        let e = s.master(Duration::from_millis(100), || false).unwrap_err();
        assert!(e.contains("no reply in time"), "{e}");

        let (p, h) = fake(vec![b"*2\r\n$9\r\n127.0.0.1\r\n$1\r\n0\r\n"]);
        let s = Sentinels::new(vec![("127.0.0.1".into(), p)], "svc".into(), None, None);
        let e = s.master(T, || false).unwrap_err();
        h.join().unwrap();
        assert!(e.contains("valid port"), "{e}");
        assert_eq!(
            Sentinels::new(vec![], "svc".into(), None, None)
                .master(T, || false)
                .unwrap_err(),
            "no sentinel given"
        );
        drop(l);
    }

    #[test]
    fn a_switch_is_parsed_for_our_service_only() {
        let p = |b: &[u8], svc: &str| parse_switch(b, svc);
        assert_eq!(
            p(b"svc 127.0.0.1 6379 127.0.0.2 6380", "svc"),
            Some(("127.0.0.2".into(), 6380))
        );
        // Another service, or one whose name merely ends or starts like ours: ignored.
        assert_eq!(p(b"other 127.0.0.1 6379 127.0.0.2 6380", "svc"), None);
        assert_eq!(p(b"mysvc 127.0.0.1 6379 127.0.0.2 6380", "svc"), None);
        assert_eq!(p(b"svc 127.0.0.1 6379 127.0.0.2 6380", "sv"), None);
        // A name with spaces is what precedes the last four fields; IPv6 hosts as they come.
        assert_eq!(
            p(b"my master ::1 6379 ::2 6380", "my master"),
            Some(("::2".into(), 6380))
        );
        assert_eq!(p(b"my master ::1 6379 ::2 6380", "master"), None);
        // Malformed: too few fields, bad ports, an empty host, not UTF-8.
        for bad in [
            &b""[..],
            b"svc",
            b"svc 127.0.0.1 6379 127.0.0.2",
            b"127.0.0.1 6379 127.0.0.2 6380",
            b"svc 127.0.0.1 6379 127.0.0.2 0",
            b"svc 127.0.0.1 6379 127.0.0.2 65536",
            b"svc 127.0.0.1 x 127.0.0.2 6380",
            b"svc 127.0.0.1 6379  6380",
            b"svc 127.0.0.1 6379 127.0.0.2 6380 ",
            b"\xff 127.0.0.1 6379 127.0.0.2 6380",
        ] {
            assert_eq!(p(bad, "svc"), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(p(b"\xff 1 1 h 1", "\u{fffd}"), None);
    }

    #[test]
    fn a_subscription_hears_our_switches_pongs_and_ignores_the_rest() {
        // AUTH, SUBSCRIBE (confirmed, then messages), and the ask on a second connection.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = thread::spawn(move || {
            let (mut sub, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = sub.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("AUTH"));
            sub.write_all(b"+OK\r\n").unwrap();
            let n = sub.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("+switch-master"));
            sub.write_all(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n")
                .unwrap();
            let (mut ask, _) = l.accept().unwrap();
            let n = ask.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("AUTH"));
            ask.write_all(b"+OK\r\n").unwrap();
            let n = ask.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("GET-MASTER-ADDR-BY-NAME"));
            ask.write_all(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n7001\r\n")
                .unwrap();
            let msg = |payload: &str| {
                format!(
                    "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{payload}\r\n",
                    payload.len()
                )
            };
            let mut out = msg("other 127.0.0.1 7001 127.0.0.1 7003");
            out += &msg("svc 127.0.0.1 7001 127.0.0.1 7002");
            out += "*2\r\n$4\r\npong\r\n$0\r\n\r\n";
            out += "*3\r\n$7\r\nmessage\r\n$5\r\nother\r\n$1\r\nx\r\n";
            sub.write_all(out.as_bytes()).unwrap();
            let n = sub.read(&mut buf).unwrap(); // the PING
            assert_eq!(&buf[..n], b"*1\r\n$4\r\nPING\r\n");
            drop(sub);
        });
        let s = Sentinels::new(
            vec![
                ("127.0.0.1".into(), dead_port()),
                ("127.0.0.1".into(), port),
            ],
            "svc".into(),
            None,
            Some("pw".into()),
        );
        let (mut sub, master) = s.subscribe(T, || false).unwrap();
        assert_eq!((sub.index, master), (1, ("127.0.0.1".into(), 7001)));
        let mut heard = Vec::new();
        for _ in 0..4 {
            heard.push(sub.next(T, "svc").unwrap().unwrap());
        }
        assert_eq!(
            heard,
            [
                Heard::Other,
                Heard::Switch("127.0.0.1".into(), 7002),
                Heard::Pong,
                Heard::Other
            ]
        );
        assert_eq!(sub.next(Duration::from_millis(20), "svc").unwrap(), None);
        sub.ping().unwrap();
        h.join().unwrap();
        let e = sub.next(T, "svc").unwrap_err();
        assert!(e.contains("closed"), "{e}");
        // No sentinel at all takes it: every reason is given.
        let s = Sentinels::new(
            vec![("127.0.0.1".into(), dead_port())],
            "svc".into(),
            None,
            None,
        );
        let e = s.subscribe(T, || false).err().unwrap();
        assert!(e.contains("+switch-master") && e.contains("connect"), "{e}");
    }
}
