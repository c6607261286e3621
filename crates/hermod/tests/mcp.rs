//! `hermod mcp` with the real Python MCP SDK: tools, the Claude Code
//! channel capability and push, and the sender allow-list.

use crate::support::{run_python, Daemon};

#[test]
fn mcp_tools_and_channel_notifications_with_the_python_sdk() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "mcp_client.py"));
}
