//! Authoritative dynamic DNS with RFC 2136 UPDATE and TSIG, plus a client for
//! standard RFC 2136 servers.
//!
//! Not implemented yet: tracked by the dynamic-DNS issue. See ARCHITECTURE.md.
