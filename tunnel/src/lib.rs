//! The tunnel's data plane: what the gateways do to each packet, as pure
//! functions and state machines (no I/O), and the shell that moves packets.
//!
//! - [`packet`]: parse and validate an inner IP packet; its flow key
//! - [`encap`]: the encapsulations (IPIP, 6in4, 4in6/6in6, FOU) and the
//!   decapsulation checks (known peer, protocol matches, inner well-formed)
//! - [`flow`]: the flow table: TCP state, idle timeouts, per-flow counters
//! - [`mss`]: TCP MSS clamping on SYNs that cross the tunnel
//! - [`nat`]: one-to-one translation between a moved VM's new public address and its own
//! - [`icmp`]: "fragmentation needed" / "packet too big" for oversize packets
//! - [`checksum`]: completing the transport checksum of offloaded packets
//!
//! Outer headers and outer fragmentation belong to the kernel: the gateway
//! sends the encapsulated payload through a raw socket (protocol 4 or 41) or
//! a UDP socket (FOU) with path-MTU discovery off, so an oversize outer packet
//! is fragmented and the far kernel reassembles it (RFC 4459 §3.1: connections
//! opened before the switch keep their full-size segments).
//!
//! The I/O shell: [`tundev`] (the TUN device with offloads: TCP super-packets
//! split on read, segments coalesced on write), [`mmsg`] (many datagrams per
//! system call) and [`io`] (the outer sockets, counters, and [`io::Pipe`],
//! the endpoint `tunnel-pipe` runs; the gateway's plane is its own).

pub mod checksum;
pub mod coalesce;
pub mod encap;
pub mod fastpath;
pub mod flow;
pub mod icmp;
pub mod io;
pub mod mmsg;
pub mod mss;
pub mod nat;
pub mod packet;
pub mod poll;
pub mod tundev;

pub use packet::{DropReason, Inner};
