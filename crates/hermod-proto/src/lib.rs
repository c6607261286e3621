//! hermod's protocol: the message model, the hermes-bus wire frames and
//! their codec, the stable error codes, and agent identities — everything
//! a client and the daemon must agree on, and nothing else (no storage, no
//! broker), so a client builds without SQLite.

pub mod error;
pub mod identity;
pub mod model;
pub mod wire;

pub use error::{Error, Result};
pub use model::{AgentName, Channel, Message};
