//! The socket-free heart of hermod.
//!
//! # Layout
//! - [`model`]: validated names, the [`model::Message`] every transport carries.
//! - [`wire`]: the hermes-bus frame format (4-byte big-endian length + JSON),
//!   shared by the daemon and the Rust client.
//! - [`error`]: the one error type, with stable wire codes.
//! - [`engine`]: persistence behind the [`engine::Engine`] trait — the SQLite
//!   log with group commit (default) and an in-memory store.
//! - [`auth`]: who is calling (`--auth` mode, agent identities and tokens),
//!   the ACL rules and send rates every transport goes through.
//! - [`broker`]: routing, inboxes as views of the log, cursors, presence and
//!   wake-ups. Transports talk only to the [`broker::Broker`].
//! - [`text`]: message text made safe to show on a terminal, to type into a
//!   tmux pane, or to use as a file name.
//!
//! Nothing in this crate opens a socket, so all of it is testable without IO.

pub mod auth;
pub mod broker;
pub mod engine;
pub mod error;
pub mod model;
pub mod text;
pub mod wire;

pub use broker::Broker;
pub use error::{Error, Result};
pub use model::{AgentName, Channel, Message};
