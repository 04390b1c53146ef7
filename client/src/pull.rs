//! Notify, then pull: the bodies of messages pushed with
//! `"delivery": "notify"`, fetched with PULL after the random delay each
//! NOTIFY allows, and the order the application sees messages in.
//!
//! A NOTIFY holds its seq's place: pushes of the same app that come after
//! it wait until its body is there (or the server says it is gone), so the
//! application sees every app's messages in seq order, as without notify.
//! Nothing here outlives a connection: after a reconnect the server sends
//! every unacked NOTIFY again.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_proto::client::{Notification, Push};
use herald_proto::limits::PULLS_IN_FLIGHT_MAX;
use herald_proto::{MessageId, PullStatus};

use crate::{Event, jitter};

/// The first wait before pulling again after `unavailable` or `busy`;
/// it doubles with each try, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One app's messages from the first NOTIFY whose body is not there yet.
enum Held {
    Ready(Push),
    /// The server said the body is gone (expired): told in its place.
    Gone {
        seq: u64,
        message_id: MessageId,
    },
    Waiting {
        seq: u64,
        message_id: MessageId,
        /// When to send the PULL (again); `None` while one is unanswered.
        pull_at: Option<Instant>,
        tries: u32,
    },
}

#[derive(Default)]
pub(crate) struct Puller {
    held: HashMap<String, VecDeque<Held>>,
    in_flight: usize,
}

impl Puller {
    /// A NOTIFY: the application hears of it at once; its body is pulled
    /// after a random delay of up to `pull_spread`.
    pub(crate) fn notify(&mut self, notification: Notification, now: Instant) -> Event {
        let Notification {
            app,
            message_id,
            seq,
            size,
            pull_spread,
            hint,
        } = notification;
        self.held
            .entry(app.clone())
            .or_default()
            .push_back(Held::Waiting {
                seq,
                message_id,
                pull_at: Some(now + jitter(pull_spread)),
                tries: 0,
            });
        Event::Notified {
            app,
            seq,
            message_id,
            size,
            hint,
        }
    }

    /// A PUSH: handed on at once unless an earlier NOTIFY of its app still
    /// waits for its body.
    pub(crate) fn push(&mut self, push: Push) -> Option<Event> {
        match self.held.get_mut(&push.app) {
            Some(held) if !held.is_empty() => {
                held.push_back(Held::Ready(push));
                None
            }
            _ => Some(Event::Push(push)),
        }
    }

    /// A PULL_REPLY; returns what it lets through, in order.
    pub(crate) fn pulled(
        &mut self,
        app: &str,
        seq: u64,
        status: PullStatus,
        message_id: MessageId,
        payload: Bytes,
        now: Instant,
    ) -> Vec<Event> {
        let Some(held) = self.held.get_mut(app) else {
            return Vec::new();
        };
        let Some(index) = held
            .iter()
            .position(|h| matches!(h, Held::Waiting { seq: s, pull_at: None, .. } if *s == seq))
        else {
            return Vec::new();
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        match status {
            PullStatus::OK => {
                held[index] = Held::Ready(Push {
                    app: app.to_owned(),
                    message_id,
                    seq,
                    payload,
                });
            }
            PullStatus::GONE => {
                if let Held::Waiting { message_id, .. } = held[index] {
                    held[index] = Held::Gone { seq, message_id };
                }
            }
            PullStatus::NOT_BOUND => {
                // The binding ended; nothing of this app can come.
                self.held.remove(app);
                return Vec::new();
            }
            _ => {
                // unavailable, busy, or a status this version does not know:
                // try again later.
                if let Held::Waiting { pull_at, tries, .. } = &mut held[index] {
                    *tries += 1;
                    let backoff = RETRY_FIRST
                        .saturating_mul(1 << (*tries - 1).min(16))
                        .min(RETRY_MAX);
                    *pull_at = Some(now + backoff / 2 + jitter(backoff / 2));
                }
            }
        }
        let mut released = Vec::new();
        while held
            .front()
            .is_some_and(|entry| !matches!(entry, Held::Waiting { .. }))
        {
            released.push(match held.pop_front() {
                Some(Held::Ready(push)) => Event::Push(push),
                Some(Held::Gone { seq, message_id }) => Event::NotifyGone {
                    app: app.to_owned(),
                    seq,
                    message_id,
                },
                _ => unreachable!("the front was not waiting"),
            });
        }
        released
    }

    /// The PULLs to send now, as many as may be unanswered at once.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut pulls = Vec::new();
        for (app, held) in &mut self.held {
            for entry in held.iter_mut() {
                if self.in_flight >= PULLS_IN_FLIGHT_MAX {
                    return pulls;
                }
                if let Held::Waiting { seq, pull_at, .. } = entry
                    && pull_at.is_some_and(|at| at <= now)
                {
                    *pull_at = None;
                    self.in_flight += 1;
                    pulls.push((app.clone(), *seq));
                }
            }
        }
        pulls
    }

    /// When `due` next has a PULL to send.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        if self.in_flight >= PULLS_IN_FLIGHT_MAX {
            return None;
        }
        self.held
            .values()
            .flatten()
            .filter_map(|entry| match entry {
                Held::Waiting { pull_at, .. } => *pull_at,
                Held::Ready(_) | Held::Gone { .. } => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(seq: u64, spread_ms: u64) -> Notification {
        Notification {
            app: "chat".to_owned(),
            message_id: MessageId([seq as u8; 16]),
            seq,
            size: 5,
            pull_spread: Duration::from_millis(spread_ms),
            hint: "hi".to_owned(),
        }
    }

    fn push(seq: u64) -> Push {
        Push {
            app: "chat".to_owned(),
            message_id: MessageId([seq as u8; 16]),
            seq,
            payload: Bytes::from(format!("m{seq}")),
        }
    }

    fn seqs(events: &[Event]) -> Vec<(u64, &'static str)> {
        events
            .iter()
            .map(|event| match event {
                Event::Push(push) => (push.seq, "push"),
                Event::NotifyGone { seq, .. } => (*seq, "gone"),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn pulls_wait_for_their_delay_and_later_pushes_wait_for_the_body() {
        let now = Instant::now();
        let mut puller = Puller::default();
        assert!(matches!(puller.push(push(1)), Some(Event::Push(_))));
        let told = puller.notify(notification(2, 1_000), now);
        assert!(matches!(
            told,
            Event::Notified {
                seq: 2,
                size: 5,
                ..
            }
        ));
        assert!(puller.push(push(3)).is_none(), "held behind seq 2");
        let due_by = puller.next_due().unwrap();
        assert!(due_by <= now + Duration::from_millis(1_000));
        assert!(puller.due(now - Duration::from_secs(1)).is_empty());
        assert_eq!(puller.due(due_by), [("chat".to_owned(), 2)]);
        assert_eq!(puller.next_due(), None, "one PULL at a time per message");
        let released = puller.pulled(
            "chat",
            2,
            PullStatus::OK,
            MessageId([2; 16]),
            Bytes::from_static(b"body"),
            now,
        );
        assert_eq!(seqs(&released), [(2, "push"), (3, "push")]);
        let Event::Push(body) = &released[0] else {
            unreachable!()
        };
        assert_eq!(&body.payload[..], b"body");
        assert!(matches!(puller.push(push(4)), Some(Event::Push(_))));
    }

    #[test]
    fn a_gone_body_is_said_in_its_place_and_a_busy_one_is_pulled_again_later() {
        let now = Instant::now();
        let mut puller = Puller::default();
        puller.notify(notification(1, 0), now);
        puller.notify(notification(2, 0), now);
        puller.push(push(3));
        assert_eq!(puller.due(now).len(), 2);
        let none = MessageId([0; 16]);
        let released = puller.pulled("chat", 2, PullStatus::GONE, none, Bytes::new(), now);
        assert!(released.is_empty(), "seq 1 comes first");
        let released = puller.pulled("chat", 1, PullStatus::BUSY, none, Bytes::new(), now);
        assert!(released.is_empty());
        let again = puller.next_due().unwrap();
        assert!(again >= now + RETRY_FIRST / 2 && again <= now + RETRY_FIRST);
        assert_eq!(puller.due(again), [("chat".to_owned(), 1)]);
        let released = puller.pulled(
            "chat",
            1,
            PullStatus::OK,
            MessageId([1; 16]),
            Bytes::from_static(b"one"),
            again,
        );
        assert_eq!(seqs(&released), [(1, "push"), (2, "gone"), (3, "push")]);
    }

    #[test]
    fn no_more_pulls_are_unanswered_than_the_server_takes() {
        let now = Instant::now();
        let mut puller = Puller::default();
        for seq in 1..=10 {
            puller.notify(notification(seq, 0), now);
        }
        assert_eq!(puller.due(now).len(), PULLS_IN_FLIGHT_MAX);
        assert!(puller.due(now).is_empty());
        puller.pulled(
            "chat",
            1,
            PullStatus::OK,
            MessageId([1; 16]),
            Bytes::new(),
            now,
        );
        assert_eq!(puller.due(now), [("chat".to_owned(), 5)]);
    }
}
