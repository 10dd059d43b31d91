//! Packet encapsulation (IPIP, 6in4, 4in6/6in6, FOU), TUN and raw-socket I/O, a
//! flow table with TCP state, MSS clamping and PMTU signalling.
//!
//! Not implemented yet: tracked by the network-continuity issue. See ARCHITECTURE.md.
