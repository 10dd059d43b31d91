//! Live migration of a VM — its disk and its memory — across a WAN.
//!
//! - [`nbd`]: the NBD server the hypervisor uses as the VM's disk; every write passes
//!   through it, which is where dirty tracking and throttling hook in.
//! - [`precopy`]: the sans-I/O disk pre-copy engine (bulk pass, dirty rounds,
//!   throttling, convergence).
//! - [`transport`]: framed messages over one TLS 1.3 connection with pinned keys.
//! - [`source`] and [`agent`]: the two ends of a migration.
//! - [`qmp`] and [`vm`]: the QMP client, and QEMU's side of a migration at
//!   each end.
//! - [`memrelay`]: QEMU's migration stream carried as frames on our link.

pub mod agent;
pub mod args;
pub mod control;
pub mod disk;
pub mod events;
pub mod failpoint;
pub mod image;
pub mod memrelay;
pub mod nbd;
pub mod node;
pub mod orchestrate;
pub mod precopy;
pub mod qmp;
pub mod source;
pub mod transport;
pub mod vm;
