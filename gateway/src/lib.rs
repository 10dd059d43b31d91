//! Per-site gateway daemon: tunnels a migrated VM's old address to its new site,
//! translates its new address, and exposes an authenticated control API.
//!
//! Not implemented yet: tracked by the network-continuity issue. See ARCHITECTURE.md.
