//! (Pending.)
