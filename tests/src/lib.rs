//! Test bed helpers: network namespaces with Drop guards, child processes that are
//! killed when their guard drops, and the QEMU guest test bed.
pub mod bed;
pub mod delay;
pub mod guest;
pub mod interrupt;
pub mod load;
pub mod native;
pub mod netns;
pub mod proc;
pub mod sysbed;
pub mod vmbed;
