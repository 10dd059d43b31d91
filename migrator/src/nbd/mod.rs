//! NBD: the block protocol between the hypervisor and our disk server.

pub mod client;
pub mod server;
pub mod wire;
