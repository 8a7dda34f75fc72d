//! Heartbeats: the node tells the daemon it is alive, and learns whether to stop.

use tokio_util::sync::CancellationToken;

use super::node::Node;

impl Node<'_> {
    /// Heartbeats every `heartbeat_interval_ms` (`heartbeat_interval_s` from an older daemon) until `finished`; an answer with `shutdown: true`
    /// stops the script.
    ///
    /// A heartbeat still unanswered at the next tick is given up for a fresh one. While the
    /// daemon is away the client's pauses between tries grow to 10 s and more, longer than a short
    /// heartbeat timeout: a restarted daemon would then fail this live node before its next
    /// try. A fresh heartbeat each interval reaches it within about one interval instead.
    pub(super) async fn heartbeat_loop(&self, finished: &CancellationToken) {
        let period = self.registration.heartbeat_interval();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = finished.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let answer = tokio::select! {
                () = finished.cancelled() => return,
                answer = tokio::time::timeout(period, self.call(self.client.heartbeat())) => answer,
            };
            match answer {
                Ok(Ok(answer)) if answer.shutdown => {
                    if !self.stop.is_cancelled() {
                        tracing::info!(node_id = %self.node_id(), "the daemon asked this node to stop");
                        self.stop.cancel();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(node_id = %self.node_id(), error = %error.report(), "heartbeat failed");
                }
                Err(_) => {
                    tracing::warn!(node_id = %self.node_id(), "heartbeat unanswered for one interval; sending a new one");
                }
            }
        }
    }
}
