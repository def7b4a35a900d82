//! The Thumbtack API client: the one place that knows the wire format.
//! Every wire assumption of SPEC §5 lives in `model.rs` (shapes),
//! `client.rs` (paths, headers) or `problem.rs` (errors, classification).

pub mod auth;
pub mod client;
pub mod model;
pub mod paging;
pub mod problem;
pub mod webhook;

pub use auth::Auth;
pub use client::{Client, ClientSettings, Delivery, Exchange, RateBudget, Response};
pub use problem::{ApiError, Disposition};
