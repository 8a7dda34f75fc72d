//! `GET /api/v1/events` read as a stream of [`wire::Event`]s (SPEC §4.1).

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT};
use hyper::Method;

use super::{encode_component, status_failure, Call, Client};
use crate::api::wire;
use crate::error::{Error, Result};

/// Longest silence from the daemon before a stream counts as dead: four keep-alives missed.
const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Largest event the client accepts (a node event is well under 4 KiB).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Client {
    /// `GET /events`: follow the daemon's deployment and node changes, of one deployment or
    /// all, from now on or after the event `last_event_id` (sent as `Last-Event-ID`). Does not
    /// retry: when the stream fails, open a new one with [`EventStream::last_event_id`].
    pub async fn events(
        &self,
        deployment: Option<&str>,
        last_event_id: Option<u64>,
    ) -> Result<EventStream> {
        let path = match deployment {
            Some(id) => format!("/events?deployment={}", encode_component(id)),
            None => "/events".to_owned(),
        };
        let call = Call::new(Method::GET, path);
        let mut request = self.build(&call)?;
        let headers = request.headers_mut();
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        if let Some(id) = last_event_id {
            headers.insert("last-event-id", HeaderValue::from(id));
        }
        let response = match tokio::time::timeout(self.timeout, self.http.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(self.connection_failure(&e).error),
            Err(_) => return Err(self.timed_out(&call, self.timeout).error),
        };
        let status = response.status();
        if !status.is_success() {
            let body = tokio::time::timeout(self.timeout, self.read_answer(response.into_body()))
                .await
                .map_err(|_| self.timed_out(&call, self.timeout).error)?
                .map_err(|failure| failure.error)?;
            return Err(status_failure(status, &body).error);
        }
        Ok(EventStream {
            client: self.clone(),
            body: response.into_body(),
            buffer: BytesMut::new(),
            last_event_id,
        })
    }
}

/// An open event stream ([`Client::events`]).
#[derive(Debug)]
pub struct EventStream {
    client: Client,
    body: Incoming,
    buffer: BytesMut,
    last_event_id: Option<u64>,
}

impl EventStream {
    /// The next event; `None` when the daemon ended the stream (it is stopping). Fails when
    /// the connection breaks, or stays silent for a minute. Cancel-safe: dropped before it
    /// returns (in a `select!`), it loses nothing; what was read stays for the next call.
    pub async fn next(&mut self) -> Result<Option<wire::Event>> {
        loop {
            while let Some(end) = find_blank_line(&self.buffer) {
                let block = self.buffer.split_to(end.0);
                self.buffer.advance(end.1);
                if let Some(event) = self.parse(&block)? {
                    return Ok(Some(event));
                }
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(Error::transport(format!(
                    "the daemon at {} sent an event larger than {} KiB",
                    self.client.base_url(),
                    MAX_EVENT_BYTES / 1024
                )));
            }
            let frame = match tokio::time::timeout(STALLED_AFTER, self.body.frame()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(self.client.connection_failure(&e).error),
                Err(_) => {
                    return Err(Error::transport(format!(
                        "the event stream of the daemon at {} was silent for {}",
                        self.client.base_url(),
                        humantime::format_duration(STALLED_AFTER)
                    )))
                }
            };
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// The id of the last event read (or the one the stream was opened after): pass it to
    /// [`Client::events`] to resume.
    pub fn last_event_id(&self) -> Option<u64> {
        self.last_event_id
    }

    /// One event block; `None` for a block of comments and settings only.
    fn parse(&mut self, block: &[u8]) -> Result<Option<wire::Event>> {
        let text = String::from_utf8_lossy(block);
        let (mut kind, mut data, mut id) = (None, String::new(), None);
        for line in text.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => kind = Some(value.to_owned()),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                "id" => id = value.parse::<u64>().ok(),
                _ => {}
            }
        }
        if id.is_some() {
            self.last_event_id = id;
        }
        let malformed = |e: serde_json::Error| {
            Error::transport(format!(
                "the daemon at {} sent a malformed event: {e}",
                self.client.base_url()
            ))
        };
        let event = match kind.as_deref() {
            Some("deployment") => {
                wire::Event::Deployment(Box::new(serde_json::from_str(&data).map_err(malformed)?))
            }
            Some("node") => wire::Event::Node(serde_json::from_str(&data).map_err(malformed)?),
            Some("reload") => wire::Event::Reload(serde_json::from_str(&data).map_err(malformed)?),
            // Unknown kinds (from a newer daemon) and comment blocks are skipped.
            _ => return Ok(None),
        };
        Ok(Some(event))
    }
}

/// Where the first event block ends: (its length, the length of the blank line after it).
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::find_blank_line;

    #[test]
    fn event_blocks_end_at_a_blank_line() {
        assert_eq!(find_blank_line(b"id: 1\ndata: {}\n\nid: 2"), Some((14, 2)));
        assert_eq!(find_blank_line(b"id: 1\r\n\r\n"), Some((5, 4)));
        assert_eq!(find_blank_line(b"id: 1\ndata: {}\n"), None);
    }
}
