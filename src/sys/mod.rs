//! Kernel edges.
