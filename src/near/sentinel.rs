//! Redis Sentinel for the listener: which server is the master of a service, now.
//!
//! The listener asks at the start of every session (so after a failover it follows the new
//! master), trying the sentinels in turn, each bounded by the connect timeout for the connection
//! and for every reply: `[AUTH [user] pass]`, then `SENTINEL GET-MASTER-ADDR-BY-NAME <service>`
//! (RESP2: a sentinel needs no `HELLO`). A sentinel that is down, refuses the password or does
//! not know the service is skipped; when none answers, the session fails with every sentinel's
//! reason and the listener retries after its backoff. Once connected, `listener.rs` checks with
//! `ROLE` that the server is a master (sentinels may still name a demoted one for a moment).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
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

    /// One sentinel's answer.
    fn ask(&self, host: &str, port: u16, timeout: Duration) -> Result<(String, u16), String> {
        let mut s = connect(host, port, timeout).map_err(|e| format!("connect: {e}"))?;
        // A forked child closes its copy at once (as the listener's own connection's), so
        // that it never holds this connection open. Declared after `s`: dropped before it.
        let _inherited = inherited::register(s.as_raw_fd());
        let deadline = clock::now() + timeout.as_nanos() as u64;
        if let Some(pass) = &self.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.username {
                auth.push(user.as_bytes());
            }
            auth.push(pass.as_bytes());
            match call(&mut s, &auth, deadline)? {
                Value::Simple(ok) if ok.eq_ignore_ascii_case(b"OK") => {}
                Value::Error(e) => return Err(format!("AUTH: {}", String::from_utf8_lossy(&e))),
                other => return Err(format!("AUTH: unexpected reply {other:?}")),
            }
        }
        let cmd: [&[u8]; 3] = [
            b"SENTINEL",
            b"GET-MASTER-ADDR-BY-NAME",
            self.service.as_bytes(),
        ];
        match call(&mut s, &cmd, deadline)? {
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
}
