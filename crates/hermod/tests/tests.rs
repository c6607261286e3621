//! Black-box tests: every test starts the real `hermod` binary on a
//! temporary data directory and talks to it over its real socket, with the
//! Rust client, raw frames, the CLI, or the PyPI `hermes-bus` client.

mod support;

mod actions;
mod bridge;
mod browser;
mod caps;
mod cli;
mod console;
mod crash;
mod delivery;
mod hermes_bus;
mod history;
mod hooks;
mod http;
mod limits;
mod mcp;
mod memory;
mod nats;
mod start;
mod storage;
mod topics;
mod trust;
mod unix;
