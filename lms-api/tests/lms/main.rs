//! The LMS API against a real lmskv cluster (node processes), one module per
//! suite, built as one test binary so the API, the client and the harness
//! are compiled and linked once.

mod api;
mod common;
mod jobs;
mod reads;
mod retention;
mod splits;
