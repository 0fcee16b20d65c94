//! Id newtypes, so a node id can never be passed where a cell id is expected.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw number, as carried on the wire.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }
    };
}

id_type!(
    /// A node: one `quiver node` process, id created once and kept in its data dir. Never 0
    /// (raft-rs reserves peer id 0 for "none").
    NodeId,
    "n"
);
id_type!(
    /// A Harpoon cell: the consensus group that replicates one range. Never 0.
    CellId,
    "c"
);
