//! leadsync: mirrors Thumbtack leads into SQLite and drains an outbox of
//! job-status transitions back to Thumbtack.
//!
//! Data flows one way: [`config`] → [`thumbtack`] (the API client) →
//! [`sync`] / [`drain`] → [`store`]; [`daemon`] wires them together, and
//! [`daemon::run`] lets tests start and stop the whole program in-process.

pub mod app;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drain;
pub mod ingest;
pub mod lead;
pub mod logging;
pub mod manpage;
pub mod messages;
pub mod metrics;
pub mod probe;
pub mod sandbox;
pub mod schedule;
pub mod secret;
pub mod serve;
pub mod status;
pub mod store;
pub mod sync;
pub mod terminal;
pub mod thumbtack;
pub mod time;
pub mod webhooks;

pub use daemon::run;
