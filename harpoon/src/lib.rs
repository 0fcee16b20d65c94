//! Harpoon: consensus cells on raft-rs.

pub mod transport;
