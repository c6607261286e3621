//! The relay WebSocket's frame handling: `parse_relay_frame` (a pure
//! function) and the checks the relay makes before it fans a frame out
//! (the WebSocket itself is not fuzzed).
//!
//! Properties: no panic; the parse equals the PROTOCOLS.md §4 rules written
//! out independently below (relay frames keep topic and envelope as is;
//! JSON-RPC `event`s become `tui.<type>` with `session_id` and the payload
//! flattened in; anything else is `None`); and for what it returns:
//!
//! * published as the holder of the relay token publishes it (the daemon,
//!   as `relay`), it is stored with that topic and sender, or refused
//!   exactly as documented: a topic over 256 characters is
//!   `invalid_request`, an invalid topic `invalid_topic`;
//! * from an agent's token (`bridge`, `may_publish` `tui.**`), the check the
//!   relay makes before fan-out (`Broker::may_publish`) answers as
//!   documented (over-long topic `invalid_request`, invalid topic
//!   `invalid_topic`, outside `tui.**` `forbidden`), and publishing the
//!   frame succeeds exactly when that check passed, stored as `bridge`: a
//!   frame that reached the listeners is never one the bus refuses, nor
//!   the other way round.
#![no_main]

use std::sync::OnceLock;

use hermod_core::auth::Caller;
use hermod_core::model::{AgentName, Auth, Channel, MAX_FIELD_LEN, RELAY_SENDER};
use hermod_core::Broker;
use hermod_events::Pattern;
use hermod_server::http::relay::parse_relay_frame;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The expected result, from the protocol's description.
fn spec(text: &str) -> Option<(String, Map<String, Value>)> {
    let frame: Map<String, Value> = serde_json::from_str(text).ok()?;
    if let Some(Value::Bool(true)) = frame.get("_bus_relay") {
        return match (frame.get("topic"), frame.get("envelope")) {
            (Some(Value::String(t)), Some(Value::Object(e))) => Some((t.clone(), e.clone())),
            _ => None,
        };
    }
    let is_event = matches!(frame.get("jsonrpc"), Some(Value::String(v)) if v == "2.0")
        && matches!(frame.get("method"), Some(Value::String(m)) if m == "event");
    if !is_event {
        return None;
    }
    let Some(Value::Object(params)) = frame.get("params") else {
        return None;
    };
    let kind = match params.get("type") {
        Some(Value::String(k)) if !k.is_empty() => k,
        _ => return None,
    };
    let mut payload = match params.get("payload") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => return None,
    };
    if let Some(s) = params.get("session_id") {
        payload.insert("session_id".to_owned(), s.clone());
    }
    Some((format!("tui.{kind}"), payload))
}

/// What publishing `topic` answers as documented (README, "Protocol
/// extensions"): the cap first, then the topic rules.
fn topic_verdict(topic: &str) -> Result<(), &'static str> {
    if topic.chars().count() > MAX_FIELD_LEN {
        Err("invalid_request")
    } else if !hermod_events::pattern::is_valid_topic(topic) {
        Err("invalid_topic")
    } else {
        Ok(())
    }
}

fuzz_target!(|text: &str| {
    let got = parse_relay_frame(text);
    assert_eq!(got, spec(text), "relay frame {text:?}");
    let Some((topic, payload)) = got else {
        return;
    };
    let verdict = topic_verdict(&topic);
    runtime().block_on(async {
        let broker = Broker::open_memory().await.unwrap();
        let channel = Channel::parse("gateway").unwrap();

        // The relay token: the daemon publishes as `relay`.
        let relay = Caller::daemon(Auth::Open);
        let from = AgentName::parse(RELAY_SENDER).unwrap();
        let published = broker
            .publish(
                &relay,
                channel.clone(),
                Some(from),
                &topic,
                payload.clone(),
                None,
            )
            .await;
        match (published, verdict) {
            (Ok(durable), Ok(())) => {
                let stored = durable.await.expect("committed").expect("stored");
                assert_eq!(stored[0].topic.as_deref(), Some(topic.as_str()));
                assert_eq!(stored[0].from.as_str(), RELAY_SENDER);
            }
            (Err(e), Err(code)) => assert_eq!(e.code(), code, "relay: {topic:?}: {e}"),
            (Ok(_), Err(code)) => panic!("relay: {topic:?} published, expected {code}"),
            (Err(e), Ok(())) => panic!("relay: valid topic {topic:?} refused: {e}"),
        }

        // An agent's token: checked before fan-out, then published.
        let spec = serde_json::from_value(serde_json::json!({
            "name": "bridge",
            "may_publish": ["tui.**"],
        }))
        .unwrap();
        let (_, token) = broker.add_identity(spec).await.unwrap();
        let agent = broker.trust().authenticate(false, Some(&token)).unwrap();
        let expected = verdict.and_then(|()| {
            let allowed = Pattern::parse("tui.**").unwrap().matches(&topic);
            allowed.then_some(()).ok_or("forbidden")
        });
        let check = broker.may_publish(&agent, &channel, None, &topic);
        match (&check, expected) {
            (Ok(sender), Ok(())) => assert_eq!(sender.as_str(), "bridge"),
            (Err(e), Err(code)) => assert_eq!(e.code(), code, "agent check: {topic:?}: {e}"),
            (Ok(_), Err(code)) => panic!("agent check: {topic:?} passed, expected {code}"),
            (Err(e), Ok(())) => panic!("agent check: {topic:?} refused: {e}"),
        }
        let published = broker
            .publish(&agent, channel.clone(), None, &topic, payload, None)
            .await;
        match (published, check) {
            (Ok(durable), Ok(_)) => {
                let stored = durable.await.expect("committed").expect("stored");
                assert_eq!(stored[0].from.as_str(), "bridge");
                assert_eq!(stored[0].topic.as_deref(), Some(topic.as_str()));
            }
            (Err(e), Err(c)) => assert_eq!(e.code(), c.code(), "agent publish: {topic:?}"),
            (Ok(_), Err(c)) => {
                panic!("agent: {topic:?} refused before fan-out ({c}) but published")
            }
            (Err(e), Ok(_)) => panic!("agent: {topic:?} fanned out but not published: {e}"),
        }
    });
});
