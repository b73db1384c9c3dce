//! Whole-model CPU forward and backward (clear, slow, for tests). (Pending.)
