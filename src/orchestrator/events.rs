//! The engine's change feed: every deployment and node state change becomes an [`Event`] with
//! an increasing id, kept in a bounded ring, so subscribers (the event stream, the dashboard)
//! follow changes live and resume after a dropped connection.
//!
//! Publishing costs O(1) and never waits for a subscriber: an event is pushed on the ring
//! (the oldest falls off past [`RING_SIZE`]) under a short lock, and subscribers are woken
//! through a `watch` channel. Each subscriber reads the ring at its own pace from its own
//! cursor; one that falls behind by more than the ring holds gets
//! [`Received::Missed`] and carries on from the oldest event still held. Memory is bounded by
//! the ring, whatever the number or speed of subscribers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::model::{Deployment, Node, NodeStatus};
use crate::sync::lock;

/// Events the ring holds: a subscriber may resume from any of the last this many.
pub(crate) const RING_SIZE: usize = 8192;

/// One change, as subscribers see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    /// Increasing; ids of a restarted engine are larger than any before it (they start at the
    /// engine's start time in microseconds), so an id from before a restart is never taken
    /// for a later event.
    pub(crate) id: u64,
    /// What changed.
    pub(crate) change: Change,
    /// The event as the API sends it, encoded by the first stream that sends it and shared by
    /// the others, so N readers cost one encoding.
    pub(crate) encoded: OnceLock<Bytes>,
}

/// What an [`Event`] says changed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// A deployment was accepted or changed state.
    Deployment(Deployment),
    /// A node changed state; `deployment` holds its deployment's state and counters after the
    /// change.
    Node {
        node: Box<Node>,
        previous: NodeStatus,
        deployment: Deployment,
    },
}

impl Event {
    /// The deployment this event is about.
    pub(crate) fn deployment_id(&self) -> &str {
        match &self.change {
            Change::Deployment(deployment) | Change::Node { deployment, .. } => &deployment.id,
        }
    }
}

/// What [`Subscription::next`] hands out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Received {
    /// The next event.
    Event(Arc<Event>),
    /// Events were lost to this subscriber (it asked to resume from an id the ring no longer
    /// holds, or fell behind by more than [`RING_SIZE`]): whatever it shows should be read
    /// again. Later events follow.
    Missed,
}

/// The ring and the wake-up channel, one per engine.
pub(crate) struct EventHub {
    ring: Mutex<Ring>,
    latest: watch::Sender<u64>,
}

struct Ring {
    events: VecDeque<Arc<Event>>,
    /// The id of the newest event published (the base when none was).
    last_id: u64,
}

impl EventHub {
    pub(crate) fn new() -> EventHub {
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        EventHub::starting_at(base)
    }

    fn starting_at(base: u64) -> EventHub {
        let (latest, _) = watch::channel(base);
        EventHub {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(RING_SIZE),
                last_id: base,
            }),
            latest,
        }
    }

    /// Record a change and wake subscribers; never waits for them.
    pub(crate) fn publish(&self, change: Change) {
        let id = {
            let mut ring = lock(&self.ring);
            ring.last_id += 1;
            let event = Arc::new(Event {
                id: ring.last_id,
                change,
                encoded: OnceLock::new(),
            });
            if ring.events.len() == RING_SIZE {
                ring.events.pop_front();
            }
            ring.events.push_back(event);
            ring.last_id
        };
        self.latest.send_replace(id);
    }

    /// The id of the newest event published so far.
    pub(crate) fn last_id(&self) -> u64 {
        lock(&self.ring).last_id
    }

    /// Follow events after `after` (`None`: from now on), of one deployment or all. The
    /// subscription ends when either of `stops` fires (the caller's, the engine's).
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        after: Option<u64>,
        deployment: Option<String>,
        stops: [CancellationToken; 2],
    ) -> Subscription {
        let wake = self.latest.subscribe();
        let cursor = after.unwrap_or_else(|| self.last_id());
        Subscription {
            hub: self.clone(),
            wake,
            cursor,
            deployment,
            stops,
        }
    }

    /// The next event after `cursor` for `deployment` (or any), moving the cursor past what
    /// it skipped; `None` when there is none yet.
    fn next_after(&self, cursor: &mut u64, deployment: Option<&str>) -> Option<Received> {
        let ring = lock(&self.ring);
        let oldest = ring.last_id + 1 - ring.events.len() as u64;
        // An id beyond the newest comes from before a restart with a clock set back; one
        // before the oldest held fell out of the ring: either way events were lost.
        if *cursor > ring.last_id || *cursor + 1 < oldest {
            *cursor = oldest - 1;
            return Some(Received::Missed);
        }
        while *cursor < ring.last_id {
            let event = &ring.events[(*cursor + 1 - oldest) as usize];
            *cursor += 1;
            if deployment.is_none_or(|id| event.deployment_id() == id) {
                return Some(Received::Event(event.clone()));
            }
        }
        None
    }
}

/// One subscriber's place in the feed ([`EventHub::subscribe`]).
pub(crate) struct Subscription {
    hub: Arc<EventHub>,
    wake: watch::Receiver<u64>,
    cursor: u64,
    deployment: Option<String>,
    stops: [CancellationToken; 2],
}

impl Subscription {
    /// The next event, waiting for one; `None` once the subscription is stopped.
    pub(crate) async fn next(&mut self) -> Option<Received> {
        loop {
            if self.stops.iter().any(CancellationToken::is_cancelled) {
                return None;
            }
            // Marked seen before the ring is read: a publish after this read wakes the wait.
            self.wake.borrow_and_update();
            if let Some(received) = self
                .hub
                .next_after(&mut self.cursor, self.deployment.as_deref())
            {
                return Some(received);
            }
            tokio::select! {
                changed = self.wake.changed() => if changed.is_err() { return None },
                () = self.stops[0].cancelled() => return None,
                () = self.stops[1].cancelled() => return None,
            }
        }
    }

    /// The id of the last event this subscriber was handed or skipped.
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::DeploymentStatus;

    fn deployment(id: &str, status: DeploymentStatus) -> Deployment {
        let now = SystemTime::UNIX_EPOCH;
        Deployment {
            id: id.to_owned(),
            status,
            cloud_provider: "local".to_owned(),
            total_nodes: 1,
            retries: 0,
            nodes_completed: 0,
            nodes_failed: 0,
            nodes_terminated: 0,
            created_at: now,
            updated_at: now,
            completed_at: None,
            error_message: None,
            rerun_of: None,
            cleaned_at: None,
        }
    }

    fn stops() -> [CancellationToken; 2] {
        [CancellationToken::new(), CancellationToken::new()]
    }

    fn ids(received: &[Received]) -> Vec<Option<u64>> {
        received
            .iter()
            .map(|r| match r {
                Received::Event(e) => Some(e.id),
                Received::Missed => None,
            })
            .collect()
    }

    async fn take(subscription: &mut Subscription, n: usize) -> Vec<Received> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(subscription.next().await.expect("an event"));
        }
        out
    }

    #[tokio::test]
    async fn subscribers_see_new_events_in_order_and_filtered() {
        let hub = Arc::new(EventHub::starting_at(100));
        let mut all = hub.subscribe(None, None, stops());
        let mut only_b = hub.subscribe(None, Some("dep-b".into()), stops());
        hub.publish(Change::Deployment(deployment(
            "dep-a",
            DeploymentStatus::Pending,
        )));
        hub.publish(Change::Deployment(deployment(
            "dep-b",
            DeploymentStatus::Pending,
        )));
        hub.publish(Change::Deployment(deployment(
            "dep-a",
            DeploymentStatus::Running,
        )));
        assert_eq!(
            ids(&take(&mut all, 3).await),
            [Some(101), Some(102), Some(103)]
        );
        let b = take(&mut only_b, 1).await;
        assert_eq!(ids(&b), [Some(102)]);
        hub.publish(Change::Deployment(deployment(
            "dep-b",
            DeploymentStatus::Running,
        )));
        assert_eq!(ids(&take(&mut only_b, 1).await), [Some(104)]);
        assert_eq!(only_b.cursor(), 104, "skipped events move the cursor too");
    }

    #[tokio::test]
    async fn resume_from_an_id_in_the_ring_and_from_one_that_fell_out() {
        let hub = Arc::new(EventHub::starting_at(0));
        for _ in 0..RING_SIZE + 10 {
            hub.publish(Change::Deployment(deployment(
                "dep-a",
                DeploymentStatus::Running,
            )));
        }
        let last = hub.last_id();
        let mut resumed = hub.subscribe(Some(last - 2), None, stops());
        assert_eq!(
            ids(&take(&mut resumed, 2).await),
            [Some(last - 1), Some(last)]
        );

        let mut lost = hub.subscribe(Some(3), None, stops());
        let oldest = last - RING_SIZE as u64 + 1;
        assert_eq!(ids(&take(&mut lost, 2).await), [None, Some(oldest)]);

        let mut from_the_future = hub.subscribe(Some(last + 50), None, stops());
        assert_eq!(
            ids(&take(&mut from_the_future, 2).await),
            [None, Some(oldest)]
        );
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_and_memory_stays_bounded() {
        let hub = Arc::new(EventHub::starting_at(0));
        let mut slow = hub.subscribe(None, None, stops());
        for _ in 0..3 * RING_SIZE {
            hub.publish(Change::Deployment(deployment(
                "dep-a",
                DeploymentStatus::Running,
            )));
        }
        assert_eq!(lock(&hub.ring).events.len(), RING_SIZE);
        let first = take(&mut slow, 2).await;
        assert_eq!(ids(&first), [None, Some(2 * RING_SIZE as u64 + 1)]);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_wakes_on_publish_and_ends_on_stop() {
        let hub = Arc::new(EventHub::starting_at(0));
        let stop = CancellationToken::new();
        let mut subscription = hub.subscribe(None, None, [stop.clone(), CancellationToken::new()]);
        let (got_first, first) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let received = subscription.next().await.expect("an event");
            got_first.send(ids(&[received])).unwrap();
            subscription.next().await
        });
        hub.publish(Change::Deployment(deployment(
            "dep-a",
            DeploymentStatus::Pending,
        )));
        assert_eq!(first.await.unwrap(), [Some(1)]);
        stop.cancel();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
