//! Codecs shared by more than one protocol adapter (and by the core's warm-up and payload log): tensor data in
//! JSON, the KServe v2 request body, and the limits and memory budget every decoder keeps.
//!
//! Pure functions of bytes: no model table, no metrics, no routes; it uses only [`crate::error`].

pub mod json;
pub mod kserve;
pub mod limits;
