//! The event envelope: the payload a subscriber receives, stamped with
//! `type`, `ts` and `src` where the publisher left them out.
//!
//! Stamping only fills missing keys, so an event that is relayed (published
//! again on another bus, or forwarded by the daemon) keeps the `type`, `ts`
//! and `src` it was first given.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An event as subscribers see it: a JSON object.
pub type Event = Map<String, Value>;

/// Envelope key holding the topic the event was published on.
pub const TYPE: &str = "type";
/// Envelope key holding the publication time, float Unix seconds.
pub const TS: &str = "ts";
/// Envelope key holding the source: the topic's first segment.
pub const SRC: &str = "src";

/// Stamps `payload` for `topic` with the current time: sets `type` to the
/// topic, `ts` to now (float Unix seconds) and `src` to the topic's first
/// segment, each only if `payload` has no such key (whatever its value, even
/// `null`).
///
/// ```
/// use hermod_events::envelope;
/// use serde_json::{json, Map};
///
/// let mut payload = Map::new();
/// payload.insert("tool".into(), json!("grep"));
/// let ev = envelope("tui.tool.start", payload);
/// assert_eq!(ev["type"], "tui.tool.start");
/// assert_eq!(ev["src"], "tui");
/// assert!(ev["ts"].as_f64().unwrap() > 1.0e9);
///
/// // Relaying keeps the original stamps.
/// let relayed = envelope("relay.tui", ev.clone());
/// assert_eq!(relayed, ev);
/// ```
pub fn envelope(topic: &str, payload: Event) -> Event {
    envelope_at(topic, payload, now())
}

/// [`envelope`] with an explicit timestamp (float Unix seconds) used when
/// `ts` is missing.
pub fn envelope_at(topic: &str, mut payload: Event, ts: f64) -> Event {
    if !payload.contains_key(TYPE) {
        payload.insert(TYPE.to_owned(), Value::String(topic.to_owned()));
    }
    if !payload.contains_key(TS) {
        // A non-finite `ts` cannot be JSON; fall back to null.
        let ts = serde_json::Number::from_f64(ts).map_or(Value::Null, Value::Number);
        payload.insert(TS.to_owned(), ts);
    }
    if !payload.contains_key(SRC) {
        let src = topic.split('.').next().unwrap_or(topic);
        payload.insert(SRC.to_owned(), Value::String(src.to_owned()));
    }
    payload
}

/// The current time as float Unix seconds (0.0 if the clock is before 1970).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Event {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn stamps_missing_fields() {
        let ev = envelope_at("tui.tool.start", obj(json!({"tool": "grep"})), 1234.5);
        assert_eq!(
            Value::Object(ev),
            json!({"tool": "grep", "type": "tui.tool.start", "ts": 1234.5, "src": "tui"})
        );
    }

    #[test]
    fn single_segment_topic_is_its_own_src() {
        let ev = envelope_at("boot", Event::new(), 1.0);
        assert_eq!(ev["src"], "boot");
        assert_eq!(ev["type"], "boot");
    }

    #[test]
    fn keeps_each_field_the_publisher_set() {
        let ev = envelope_at("a.b", obj(json!({"type": "orig.t"})), 7.0);
        assert_eq!(
            Value::Object(ev),
            json!({"type": "orig.t", "ts": 7.0, "src": "a"})
        );

        let ev = envelope_at("a.b", obj(json!({"ts": 1.0})), 7.0);
        assert_eq!(
            Value::Object(ev),
            json!({"ts": 1.0, "type": "a.b", "src": "a"})
        );

        let ev = envelope_at("a.b", obj(json!({"src": "elsewhere"})), 7.0);
        assert_eq!(
            Value::Object(ev),
            json!({"src": "elsewhere", "type": "a.b", "ts": 7.0})
        );

        // Set means present, even as null.
        let ev = envelope_at("a.b", obj(json!({"ts": null, "src": null})), 7.0);
        assert_eq!(ev["ts"], Value::Null);
        assert_eq!(ev["src"], Value::Null);
    }

    #[test]
    fn relayed_envelope_keeps_original_values() {
        let first = envelope_at("tui.tool.start", obj(json!({"x": 1})), 100.0);
        let relayed = envelope_at("bridge.remote", first.clone(), 200.0);
        assert_eq!(relayed, first);
        assert_eq!(relayed["type"], "tui.tool.start");
        assert_eq!(relayed["ts"], 100.0);
        assert_eq!(relayed["src"], "tui");
    }

    #[test]
    fn now_is_recent() {
        let before = now();
        let ev = envelope("a", Event::new());
        let ts = ev["ts"].as_f64().unwrap();
        assert!(ts >= before && ts <= now());
        assert!(ts > 1.6e9);
    }

    #[test]
    fn non_finite_ts_becomes_null() {
        assert_eq!(envelope_at("a", Event::new(), f64::NAN)["ts"], Value::Null);
    }
}
