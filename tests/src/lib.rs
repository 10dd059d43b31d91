//! Test bed helpers: network namespaces with Drop guards, child processes that are
//! killed when their guard drops.
pub mod bed;
pub mod netns;
pub mod proc;
