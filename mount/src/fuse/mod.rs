//! What netmount needs: the FUSE file system over the client, and how it is mounted.
//!
//! - [`options`]: the `-o` options.  - [`mountpoint`]: checks before mounting, and unmounting.
//! - [`fs`]: `impl fuser::Filesystem`, thin adapters over [`ops`].
//! - [`inodes`], [`cache`], [`handles`]: the state the adapters keep.  - [`attr`]: conversions.
//! - [`notices`]: the server's change notices applied to the cache and the kernel's.
//! - [`session`]: building the state, mounting, running until unmounted.
//! - [`daemon`]: going to the background once the mount is ready.
//! - [`writes`]: write-behind, and the order and errors it must keep.
//! - [`prefetch`]: listings in flight (directory read-ahead, lookups that fetch a listing).
//! - [`unlinks`]: unlink-behind, and what waits for it.
//! - [`creates`]: create-behind: a new small file stored in one request at its close.
//! - [`usage`]: `statfs` answered from the last usage figures while nothing moved them.
//! - [`listed`]: a directory stream read after its directory changed.

pub mod applied;
pub mod attr;
pub mod cache;
pub mod creates;
pub mod daemon;
pub mod fs;
pub mod handles;
pub mod inodes;
pub mod listed;
pub mod mountpoint;
pub mod notices;
pub mod ops;
pub mod options;
pub mod prefetch;
pub mod reads;
pub mod session;
pub mod unlinks;
pub mod usage;
pub mod writes;
