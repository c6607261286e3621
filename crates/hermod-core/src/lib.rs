//! The socket-free heart of hermod.
//!
//! # Layout
//! - [`model`], [`wire`], [`error`]: the protocol, from `hermod-proto`
//!   (re-exported, so the daemon's code says `hermod_core::model` and the
//!   client depends on the protocol alone).
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
pub mod text;

pub use hermod_proto::{error, model, wire};

pub use broker::Broker;
pub use error::{Error, Result};
pub use model::{AgentName, Channel, Message};
