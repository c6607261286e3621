//! The relay WebSocket's frame parser, `parse_relay_frame` (a pure
//! function; the WebSocket itself is not fuzzed).
//!
//! Properties: no panic; the answer equals the PROTOCOLS.md §4 rules
//! written out independently below (relay frames keep topic and envelope as
//! is; JSON-RPC `event`s become `tui.<type>` with `session_id` and the
//! payload flattened in; anything else is `None`); and publishing what it
//! returns, as the relay loop does, is accepted or refused as an invalid
//! topic, never a bus failure.
#![no_main]

use std::sync::OnceLock;

use hermod_core::model::{AgentName, Channel};
use hermod_core::Broker;
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

fuzz_target!(|text: &str| {
    let got = parse_relay_frame(text);
    assert_eq!(got, spec(text), "relay frame {text:?}");
    let Some((topic, payload)) = got else {
        return;
    };
    let valid = hermod_events::pattern::is_valid_topic(&topic);
    runtime().block_on(async {
        let broker = Broker::open_memory().await.unwrap();
        let from = AgentName::parse(hermod_core::model::RELAY_SENDER).unwrap();
        let channel = Channel::parse("gateway").unwrap();
        let relay = hermod_core::auth::Caller::trusted(hermod_core::model::Auth::Open);
        match broker.publish(&relay, channel, Some(from), &topic, payload, None).await {
            Ok(durable) => {
                assert!(valid, "invalid topic {topic:?} published");
                let stored = durable.await.expect("committed").expect("stored");
                assert_eq!(stored[0].topic.as_deref(), Some(topic.as_str()));
            }
            Err(e) => {
                assert!(!valid, "valid topic {topic:?} refused: {e}");
                assert_eq!(e.code(), "invalid_topic");
            }
        }
    });
});
