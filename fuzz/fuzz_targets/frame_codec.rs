//! The hermes-bus frame codec and frame parser.
//!
//! Input: the first byte picks a chunk size (1..=256), the rest is a byte
//! stream fed to `hermod_core::wire::codec()` in chunks of that size, as a
//! socket would deliver it. Properties:
//!
//! * the decoded frames are exactly those of a reference splitter (4-byte
//!   big-endian length, then that many bytes), however the stream is chunked;
//! * a length prefix over `MAX_FRAME` is an error, and the buffer never
//!   grows towards the declared size (nothing is allocated for it);
//! * every payload (and the raw stream itself, so JSON gets fuzzed without
//!   valid framing) goes through `parse_client_frame`: no panic, the same
//!   answer twice, an error's `code()` is one of the parse codes, and its
//!   error frame serializes to `{"type":"error","code":...}`;
//! * a parsed request is the variant its `type` field names (every frame
//!   type of `wire::Request`, see [`TYPES`]) and holds only validated names,
//!   an object body, a clamped inbox limit, a non-empty receipt/thread id and
//!   a receipt timeout within 0..=86400 s;
//! * encoding a payload and decoding it again gives the payload back.
#![no_main]

use bytes::{BufMut, BytesMut};
use hermod_core::model::{AgentName, Channel};
use hermod_core::wire::{self, Request, ServerFrame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

/// The codes a frame parse may answer with.
const PARSE_CODES: &[&str] = &[
    "invalid_json",
    "unknown_type",
    "invalid_name",
    "invalid_request",
    "invalid_topic",
];

/// Every `type` a client frame may have, as `parse_client_frame` spells it
/// (one per `wire::Request` variant; `kind` below must name each).
const TYPES: &[&str] = &[
    "register",
    "ping",
    "status",
    "message",
    "send",
    "list_endpoints",
    "ack",
    "agents",
    "forget",
    "publish",
    "inbox",
    "tail",
    "subscribe",
    "identity_add",
    "identity_list",
    "identity_rotate",
    "identity_revoke",
    "receipt",
    "thread",
    "presence",
    "release",
    "console",
];

/// The `type` a parsed request came from. Exhaustive: a new `Request`
/// variant does not compile until it is named here (and in [`TYPES`]).
fn kind(req: &Request) -> &'static str {
    match req {
        Request::Register { .. } => "register",
        Request::Ping => "ping",
        Request::Status => "status",
        Request::Message(_) => "message",
        Request::Send(_) => "send",
        Request::ListEndpoints => "list_endpoints",
        Request::Ack(_) => "ack",
        Request::Agents => "agents",
        Request::Forget(_) => "forget",
        Request::Publish(_) => "publish",
        Request::Subscribe { .. } => "subscribe",
        Request::Inbox { .. } => "inbox",
        Request::Tail => "tail",
        Request::IdentityAdd(_) => "identity_add",
        Request::IdentityList => "identity_list",
        Request::IdentityRotate(_) => "identity_rotate",
        Request::IdentityRevoke(_) => "identity_revoke",
        Request::Receipt { .. } => "receipt",
        Request::Thread(_) => "thread",
        Request::Presence { .. } => "presence",
        Request::Release { .. } => "release",
        Request::Console { .. } => "console",
    }
}

/// What the reference splitter expects next.
enum Expect<'a> {
    Frame(&'a [u8]),
    TooBig,
    NeedMore,
}

fn reference(stream: &[u8]) -> Vec<Expect<'_>> {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 4 {
            out.push(Expect::NeedMore);
            return out;
        }
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if n > MAX_FRAME {
            out.push(Expect::TooBig);
            return out;
        }
        if rest.len() - 4 < n {
            out.push(Expect::NeedMore);
            return out;
        }
        out.push(Expect::Frame(&rest[4..4 + n]));
        rest = &rest[4 + n..];
    }
}

fn check_name(name: &AgentName) {
    AgentName::parse(name.as_str()).expect("a parsed agent name re-validates");
}

fn check_channel(channel: &Channel) {
    Channel::parse(channel.as_str()).expect("a parsed channel re-validates");
}

fn check_body(body: &hermod_core::model::Body) {
    let text = body.as_str();
    assert!(text.starts_with('{'), "body is not an object: {text:?}");
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        .expect("a body is a JSON object");
}

fn check_parse(payload: &[u8]) {
    let first = wire::parse_client_frame(payload);
    let second = wire::parse_client_frame(payload);
    match (&first, &second) {
        (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "unstable error code"),
        (Ok(_), Ok(_)) => {}
        _ => panic!("parse_client_frame is not deterministic"),
    }
    match first {
        Err(e) => {
            let code = e.code();
            assert!(PARSE_CODES.contains(&code), "unexpected code {code}");
            let _ = e.to_string();
            let frame = ServerFrame::error(&e, None).to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&frame).expect("error frame is JSON");
            assert_eq!(v["type"], "error");
            assert_eq!(v["code"], code);
        }
        Ok(req) => check_request(payload, req),
    }
}

fn check_request(payload: &[u8], req: Request) {
    // A frame that parsed is a JSON object whose `type` is the variant's.
    // (Raw values: a `Value` would refuse numbers the parser skips, `1e400`.)
    let fields: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_slice(payload).expect("a parsed frame is a JSON object");
    let given = fields
        .get("type")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
    let k = kind(&req);
    assert!(TYPES.contains(&k), "{k} missing from TYPES");
    assert_eq!(given.as_deref(), Some(k), "frame type and request differ");
    match req {
        Request::Register {
            endpoint, channel, ..
        } => {
            check_name(&endpoint);
            check_channel(&channel);
        }
        Request::Message(env) | Request::Send(env) => {
            env.to.iter().for_each(check_name);
            env.from.iter().for_each(check_name);
            check_channel(&env.channel);
            check_body(&env.body);
            assert!(env.id.as_deref() != Some(""), "empty id kept");
        }
        Request::Publish(p) => {
            p.from.iter().for_each(check_name);
            check_channel(&p.channel);
        }
        Request::Inbox { key, limit, .. } => {
            check_name(&key.agent);
            check_channel(&key.channel);
            assert!((1..=1000).contains(&limit), "limit {limit} not clamped");
        }
        Request::Forget(key) => {
            check_name(&key.agent);
            check_channel(&key.channel);
        }
        Request::IdentityRotate(name) | Request::IdentityRevoke(name) => check_name(&name),
        Request::Receipt { id, timeout, .. } => {
            assert!(!id.is_empty(), "empty receipt id kept");
            assert!(
                timeout.is_finite() && (0.0..=86_400.0).contains(&timeout),
                "receipt timeout {timeout} out of range"
            );
        }
        Request::Thread(id) => assert!(!id.is_empty(), "empty thread id kept"),
        Request::Presence { agent, channel, .. } => {
            agent.iter().for_each(check_name);
            check_channel(&channel);
        }
        Request::Release {
            channel,
            agent,
            peer,
        } => {
            check_name(&agent);
            check_name(&peer);
            check_channel(&channel);
        }
        Request::Ping
        | Request::Status
        | Request::ListEndpoints
        | Request::Ack(_)
        | Request::Agents
        | Request::Subscribe { .. }
        | Request::Tail
        | Request::IdentityAdd(_)
        | Request::IdentityList
        | Request::Console { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;

    // The raw stream as one payload: exercises the JSON side directly.
    check_parse(stream);

    let expected = reference(stream);
    let mut codec = wire::codec();
    let mut buf = BytesMut::new();
    let mut got: Vec<BytesMut> = Vec::new();
    let mut failed = false;
    'feed: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME);
                    got.push(frame);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
        // Never more than the input plus one capped frame is reserved.
        assert!(
            buf.capacity() <= stream.len() + MAX_FRAME + 4 + 64,
            "buffer grew to {} for a {}-byte stream",
            buf.capacity(),
            stream.len()
        );
    }

    let frames: Vec<&[u8]> = expected
        .iter()
        .filter_map(|e| match e {
            Expect::Frame(f) => Some(*f),
            _ => None,
        })
        .collect();
    let too_big = matches!(expected.last(), Some(Expect::TooBig));
    assert_eq!(
        failed, too_big,
        "codec error iff a length prefix is over the cap"
    );
    if too_big {
        // The oversized length was refused from the prefix alone.
        assert!(
            buf.capacity() < MAX_FRAME,
            "oversized frame allocated {} bytes",
            buf.capacity()
        );
    }
    assert_eq!(
        got.len(),
        frames.len(),
        "frame count differs from the reference"
    );
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(&g[..], *f, "frame bytes differ from the reference");
    }

    for frame in &got {
        check_parse(frame);
        // Round trip through the encoder.
        let mut out = BytesMut::new();
        codec
            .encode(frame.clone().freeze(), &mut out)
            .expect("a decoded frame re-encodes");
        let mut prefix = BytesMut::new();
        prefix.put_u32(frame.len() as u32);
        assert_eq!(&out[..4], &prefix[..]);
        let mut again = wire::codec();
        let back = again.decode(&mut out).unwrap().unwrap();
        assert_eq!(back, frame);
    }
});
