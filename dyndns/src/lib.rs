//! Authoritative dynamic DNS for service names (RFC 2136 UPDATE with TSIG,
//! RFC 8945), with a crash-safe journal, and a client that sends the same
//! signed updates to any RFC 2136 server (BIND 9, Knot, PowerDNS).
//!
//! - [`server`]: the authoritative server (hickory-server catalog + our update path)
//! - [`udp`]: UDP receive loops with an answer cache in front of the catalog
//! - [`zone`]: RFC 2136 update rules as a pure function
//! - [`journal`]: acknowledged updates survive kill -9
//! - [`auth`]: TSIG verification, replay refusal
//! - [`client`]: signed UPDATE / query client with clear refusal errors
//! - [`ops`]: migration operations on a service name: prepare, switch, finish

pub mod auth;
pub mod client;
pub mod config;
pub mod journal;
pub mod key;
pub mod ops;
pub mod server;
pub mod udp;
pub mod zone;

pub use config::Config;
pub use key::TsigKey;
