//! hermod-events: an in-process topic pub/sub bus (the `hermes_events` API),
//! usable without any daemon.
//!
//! This crate owns the [`Bus`] (subscribe, publish, unsubscribe), the
//! [`pattern`] syntax and matcher, and the [`envelope`](mod@envelope) stamping rules. The
//! daemon reuses the last two for its own topic routing and relaying.
//!
//! # Topics and patterns
//!
//! Topics are `.`-separated, non-empty segments: `tui.tool.start`. A
//! subscription pattern may use `*` for exactly one segment and `**` for zero
//! or more, anywhere:
//!
//! | pattern  | matches                              | does not match           |
//! |----------|--------------------------------------|--------------------------|
//! | `tui.*`  | `tui.tool`                           | `tui`, `tui.tool.start`  |
//! | `tui.**` | `tui`, `tui.tool`, `tui.tool.start`  | `tuix`, `x.tui`          |
//! | `a.**.z` | `a.z`, `a.b.z`, `a.b.c.z`            | `a.b`                    |
//! | `**`     | every topic                          |                          |
//!
//! # The envelope
//!
//! Payloads are JSON objects ([`Event`]). Subscribers receive the payload
//! with three keys filled in **only if the publisher left them out**, so an
//! event relayed from elsewhere keeps its original values:
//!
//! * `type`: the topic;
//! * `ts`: the publication time, float Unix seconds;
//! * `src`: the topic's first segment.
//!
//! # Delivery
//!
//! * Synchronous subscribers ([`Bus::subscribe`]) get `&Event` and run on the
//!   publishing thread, in subscription order, before [`Bus::publish`]
//!   returns.
//! * Asynchronous subscribers ([`Bus::subscribe_async`]) get an
//!   `Arc<Event>` in a task spawned on the running tokio runtime; with no
//!   runtime running they are skipped, with a `tracing` warning.
//! * A subscriber that panics is caught and logged with `tracing::error!`;
//!   the other subscribers and the publisher carry on.
//! * No lock is held while callbacks run: a callback may subscribe,
//!   unsubscribe (even itself) or publish on the same bus.
//!
//! # Examples
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use hermod_events::Bus;
//! use serde_json::json;
//!
//! let bus = Bus::new();
//! let seen = Arc::new(Mutex::new(Vec::new()));
//!
//! let log = Arc::clone(&seen);
//! let handle = bus
//!     .subscribe("tui.**", move |ev| {
//!         log.lock().unwrap().push(ev["type"].as_str().unwrap().to_owned());
//!     })
//!     .unwrap();
//!
//! // Publish returns how many subscribers the event reached.
//! assert_eq!(bus.publish_value("tui.tool.start", json!({"tool": "grep"})).unwrap(), 1);
//! assert_eq!(bus.publish_value("other.thing", json!({})).unwrap(), 0);
//! // Synchronous subscribers have already run.
//! assert_eq!(*seen.lock().unwrap(), ["tui.tool.start"]);
//!
//! assert!(bus.unsubscribe(handle));
//! assert!(!bus.unsubscribe(handle));
//! assert_eq!(bus.publish("tui", Default::default()), Ok(0));
//! assert_eq!(bus.publish("", Default::default()), Err(hermod_events::Error::EmptyTopic));
//! ```
//!
//! The stamped envelope, and a relayed event keeping its original stamps:
//!
//! ```
//! use hermod_events::{Bus, Event};
//! use serde_json::{json, Value};
//! use std::sync::{Arc, Mutex};
//!
//! let bus = Bus::new();
//! let last = Arc::new(Mutex::new(Event::new()));
//! let slot = Arc::clone(&last);
//! bus.subscribe("**", move |ev| *slot.lock().unwrap() = ev.clone()).unwrap();
//!
//! bus.publish_value("agent.reply", json!({"text": "hi"})).unwrap();
//! let ev = last.lock().unwrap().clone();
//! assert_eq!(ev["text"], "hi");
//! assert_eq!(ev["type"], "agent.reply");
//! assert_eq!(ev["src"], "agent");
//! assert!(ev["ts"].is_f64());
//!
//! // Re-publishing the envelope elsewhere keeps type, ts and src.
//! bus.publish("relay.in", ev.clone()).unwrap();
//! assert_eq!(*last.lock().unwrap(), ev);
//! ```
//!
//! Asynchronous subscribers run on the tokio runtime:
//!
//! ```
//! use hermod_events::Bus;
//! use serde_json::json;
//! use tokio::sync::mpsc;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = Bus::new();
//! let (tx, mut rx) = mpsc::unbounded_channel();
//! bus.subscribe_async("jobs.*", move |ev| {
//!     let tx = tx.clone();
//!     async move {
//!         tx.send(ev["id"].clone()).unwrap();
//!     }
//! })
//! .unwrap();
//!
//! assert_eq!(bus.publish_value("jobs.done", json!({"id": 7})).unwrap(), 1);
//! assert_eq!(rx.recv().await.unwrap(), 7);
//! # }
//! ```
//!
//! Patterns on their own:
//!
//! ```
//! use hermod_events::pattern::Pattern;
//!
//! let p = Pattern::parse("tui.*").unwrap();
//! assert!(p.matches("tui.tool"));
//! assert!(!p.matches("tui.tool.start"));
//! assert!(!p.matches("tui"));
//! assert!(Pattern::parse("a..b").is_err());
//! ```

mod bus;
pub mod envelope;
mod error;
pub mod pattern;

pub use bus::{Bus, Handle};
pub use envelope::{envelope, Event};
pub use error::Error;
pub use pattern::Pattern;
