//! What one client may cost the server: failed node registrations per address
//! ([`FailureLimiter`]), and connections ([`ConnectionTable`]).
//!
//! A provision token has 256 random bits, so guessing one is hopeless; the failure limit keeps
//! a client that tries anyway (or a misconfigured fleet) from costing the daemon more than a
//! handful of hash lookups a minute per address.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::LastTokenHash;
use crate::error::{Error, Result};

/// Entries kept before expired ones are swept.
const SWEEP_ABOVE: usize = 10_000;

/// Counts failures per address in fixed windows; past the limit, requests are refused (429)
/// until the window ends.
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    window: Duration,
    max_failures: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub(crate) fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            window,
            max_failures,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Refuse `address` while it is over the limit.
    pub(crate) fn check(&self, address: IpAddr) -> Result<()> {
        let now = Instant::now();
        let failures = crate::sync::lock(&self.failures);
        match failures.get(&address) {
            Some((since, count))
                if now.duration_since(*since) < self.window && *count >= self.max_failures =>
            {
                let wait = self.window - now.duration_since(*since);
                Err(Error::rate_limited(format!(
                    "too many failed registrations from {address}; try again in {} s",
                    wait.as_secs().max(1)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Count one failure of `address`.
    pub(crate) fn record_failure(&self, address: IpAddr) {
        let now = Instant::now();
        let mut failures = crate::sync::lock(&self.failures);
        if failures.len() > SWEEP_ABOVE {
            let window = self.window;
            failures.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let entry = failures.entry(address).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The open connections of a server. A connection is unauthenticated until one of its
/// requests carries a valid API or node token. Unauthenticated connections make way for new
/// ones: past `per_address` of them from one address, or past `max` connections in all, the
/// oldest unauthenticated one is closed. Authenticated connections are never closed for
/// others; when all `max` are authenticated, new connections wait to be accepted.
#[derive(Debug)]
pub(crate) struct ConnectionTable {
    max: usize,
    per_address: usize,
    open: Mutex<Open>,
    closed: Notify,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    /// By id, oldest first.
    connections: BTreeMap<u64, Arc<Connection>>,
    /// Unauthenticated connections per address, and in all.
    unauthenticated: HashMap<IpAddr, usize>,
    unauthenticated_total: usize,
}

/// One open connection of a [`ConnectionTable`].
#[derive(Debug)]
pub(crate) struct Connection {
    id: u64,
    address: IpAddr,
    authenticated: AtomicBool,
    /// [`OPEN`], or why the table closes this connection ([`Closing`]); `close_waker` wakes
    /// [`Connection::closed`]. (A connection's task polls `closed` with every request: an
    /// atomic and a waker cost less there than a `CancellationToken`, whose every poll takes
    /// a lock, or a graceful-shutdown watcher.)
    close: AtomicU8,
    close_waker: AtomicWaker,
    /// The hash of the token its last request authenticated with.
    token: LastTokenHash,
}

/// [`Connection::close`] while the connection is open.
const OPEN: u8 = 0;

/// Why the table closes a connection ([`Connection::closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// For a newer connection: it is to be dropped at once.
    Displaced = 1,
    /// The server is stopping ([`ConnectionTable::drain`]): the request in flight, if any,
    /// is answered, then the connection closes.
    Draining = 2,
}

impl Connection {
    /// Completes when the table closes this connection, with the reason. One task (the
    /// connection's own) waits on it: a second waiter would take the first one's wake-up.
    pub(crate) fn closed(&self) -> impl Future<Output = Closing> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(closing) = self.closing() {
                return Poll::Ready(closing);
            }
            self.close_waker.register(cx.waker());
            // Closed between the check and the registration: its wake may have been missed.
            match self.closing() {
                Some(closing) => Poll::Ready(closing),
                None => Poll::Pending,
            }
        })
    }

    fn closing(&self) -> Option<Closing> {
        match self.close.load(Ordering::Acquire) {
            OPEN => None,
            1 => Some(Closing::Displaced),
            _ => Some(Closing::Draining),
        }
    }

    /// Close for `why`, unless already closed for a reason.
    fn mark_closed(&self, why: Closing) {
        let marked =
            self.close
                .compare_exchange(OPEN, why as u8, Ordering::AcqRel, Ordering::Acquire);
        if marked.is_ok() {
            self.close_waker.wake();
        }
    }

    #[cfg(test)]
    fn is_closed(&self) -> bool {
        self.closing().is_some()
    }

    /// SHA-256 of the bearer token in `authorization` (an `Authorization` header's value),
    /// parsed and hashed only when this connection's last request sent another value; `None`
    /// when it holds no bearer token.
    pub(crate) fn bearer_token_hash(&self, authorization: &[u8]) -> Option<[u8; 32]> {
        self.token.bearer_hash(authorization)
    }
}

impl ConnectionTable {
    pub(crate) fn new(max: usize, per_address: usize) -> ConnectionTable {
        ConnectionTable {
            max: max.max(1),
            per_address: per_address.max(1),
            open: Mutex::new(Open::default()),
            closed: Notify::new(),
        }
    }

    /// Wait until a new connection can be taken: fewer than `max` are open, or one of them
    /// can be closed for it.
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.closed.notified();
            {
                let open = crate::sync::lock(&self.open);
                if open.connections.len() < self.max || open.unauthenticated_total > 0 {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Take a new connection from `address`, closing the oldest unauthenticated ones it
    /// displaces.
    pub(crate) fn open(&self, address: IpAddr) -> Arc<Connection> {
        let mut open = crate::sync::lock(&self.open);
        open.next_id += 1;
        let connection = Arc::new(Connection {
            id: open.next_id,
            address,
            authenticated: AtomicBool::new(false),
            close: AtomicU8::new(OPEN),
            close_waker: AtomicWaker::new(),
            token: LastTokenHash::default(),
        });
        open.connections.insert(connection.id, connection.clone());
        *open.unauthenticated.entry(address).or_insert(0) += 1;
        open.unauthenticated_total += 1;
        if open.unauthenticated.get(&address).copied().unwrap_or(0) > self.per_address {
            open.close_oldest_unauthenticated(Some(address));
        }
        if open.connections.len() > self.max {
            open.close_oldest_unauthenticated(None);
        }
        connection
    }

    /// A request of `connection` carried a valid token: it is never closed for another.
    pub(crate) fn authenticated(&self, connection: &Connection) {
        // Once set, the flag stays: later requests of the connection take no lock.
        if connection.authenticated.load(Ordering::Relaxed) {
            return;
        }
        let mut open = crate::sync::lock(&self.open);
        if open.connections.contains_key(&connection.id)
            && !connection.authenticated.swap(true, Ordering::Relaxed)
        {
            open.forget_unauthenticated(connection.address);
        }
    }

    /// The server is stopping: tell every open connection to answer its request in flight, if
    /// any, and close ([`Closing::Draining`]).
    pub(crate) fn drain(&self) {
        let open = crate::sync::lock(&self.open);
        for connection in open.connections.values() {
            connection.mark_closed(Closing::Draining);
        }
    }

    /// `connection` ended (or was closed by the table).
    pub(crate) fn close(&self, connection: &Connection) {
        let mut open = crate::sync::lock(&self.open);
        if open.connections.remove(&connection.id).is_some() {
            if !connection.authenticated.load(Ordering::Relaxed) {
                open.forget_unauthenticated(connection.address);
            }
            self.closed.notify_one();
        }
    }
}

impl Open {
    /// Close the oldest unauthenticated connection (from `address`, if given).
    fn close_oldest_unauthenticated(&mut self, address: Option<IpAddr>) {
        let oldest = self
            .connections
            .values()
            .find(|c| {
                !c.authenticated.load(Ordering::Relaxed) && address.is_none_or(|a| c.address == a)
            })
            .cloned();
        if let Some(oldest) = oldest {
            self.connections.remove(&oldest.id);
            self.forget_unauthenticated(oldest.address);
            oldest.mark_closed(Closing::Displaced);
        }
    }

    fn forget_unauthenticated(&mut self, address: IpAddr) {
        if let Some(count) = self.unauthenticated.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                self.unauthenticated.remove(&address);
            }
        }
        self.unauthenticated_total -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refuses_past_the_limit_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..3 {
            limiter.check(a).unwrap();
            limiter.record_failure(a);
        }
        let refused = limiter.check(a).unwrap_err();
        assert!(refused.is_rate_limited(), "{refused}");
        limiter.check(b).expect("another address is not limited");
        tokio::time::advance(Duration::from_secs(61)).await;
        limiter.check(a).expect("a new window");
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn unauthenticated_connections_make_way_oldest_first() {
        let table = ConnectionTable::new(4, 2);
        let first = table.open(ip(1));
        let second = table.open(ip(1));
        let third = table.open(ip(1));
        assert!(first.is_closed(), "past 2 from one address");
        assert!(!second.is_closed() && !third.is_closed());
        table.close(&first);

        table.authenticated(&second);
        let others: Vec<_> = (2..4).map(|last| table.open(ip(last))).collect();
        assert!(others.iter().all(|c| !c.is_closed()));
        let newest = table.open(ip(9));
        assert!(
            third.is_closed(),
            "past 4 in all, the oldest unauthenticated"
        );
        assert!(!second.is_closed(), "an authenticated one stays");
        assert!(!newest.is_closed());
    }

    #[tokio::test]
    async fn a_connection_closed_for_a_newer_one_wakes_its_task() {
        let table = ConnectionTable::new(4, 1);
        let first = table.open(ip(1));
        let (started, running) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn({
            let first = first.clone();
            async move {
                let closed = first.closed();
                tokio::pin!(closed);
                // Polled once (and so waiting) before the table closes it.
                let first = std::future::poll_fn(|cx| Poll::Ready(closed.as_mut().poll(cx)));
                assert!(first.await.is_pending());
                let _ = started.send(());
                closed.await;
            }
        });
        running.await.unwrap();
        let second = table.open(ip(1));
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the closed connection's task is woken")
            .unwrap();
        assert!(first.is_closed() && !second.is_closed());
    }

    #[tokio::test]
    async fn draining_tells_every_open_connection_why() {
        let table = ConnectionTable::new(4, 1);
        let displaced = table.open(ip(1));
        let (newer, other) = (table.open(ip(1)), table.open(ip(2)));
        table.authenticated(&other);
        table.drain();
        assert_eq!(
            displaced.closed().await,
            Closing::Displaced,
            "closed before"
        );
        assert_eq!(newer.closed().await, Closing::Draining);
        assert_eq!(other.closed().await, Closing::Draining);
    }

    #[tokio::test]
    async fn new_connections_wait_while_every_one_is_authenticated() {
        let table = ConnectionTable::new(2, 2);
        let connections: Vec<_> = (1..3).map(|last| table.open(ip(last))).collect();
        tokio::time::timeout(Duration::from_millis(10), table.room())
            .await
            .expect("unauthenticated ones make room");
        for connection in &connections {
            table.authenticated(connection);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(10), table.room())
                .await
                .is_err(),
            "full of authenticated connections"
        );
        table.close(&connections[0]);
        tokio::time::timeout(Duration::from_millis(10), table.room())
            .await
            .expect("a closed one makes room");
    }
}
