//! Test bed helpers: network namespaces with Drop guards, child processes that are
//! killed when their guard drops.
pub mod netns;
pub mod proc;
