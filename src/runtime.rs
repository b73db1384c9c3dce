//! The only module that touches `llama-cpp-2`. (Pending.)
