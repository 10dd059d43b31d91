//! Storage integration tests: real NBD clients against our server, and disk
//! migrations over loopback TLS with a concurrent writer.

mod common;
mod interop;
mod migrate;
mod node;
mod node_proc;
