//! dyndns against the real thing: dig, nsupdate, BIND 9's named.
//! Needs bind9 and bind9-dnsutils (tests/install-deps.sh installs them).

mod bind;
mod common;
mod interop;
mod robust;
