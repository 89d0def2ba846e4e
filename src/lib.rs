//! tether: a connection-governing egress proxy.
//!
//! A request travels: [`listener`] (accept, client timeouts and limits) →
//! [`proxy`] (classify, [`policy`], head rewriting) → [`upstream`] (governed pool:
//! cap, queue, reuse, connect, reaper) → back through [`body`] and [`rewrite`].
//! [`admin`] serves metrics and health; [`telemetry`] names every metric.

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod diagnosis;
pub mod downstream;
pub mod error;
pub mod instance;
pub mod iptables;
pub mod policy;
pub mod proxy;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod shared;
pub mod telemetry;
pub mod testkit;
pub mod upstream;

/// The client side's former name, kept while the request path moves to `server`.
pub use server as listener;
pub use server::transparent;

pub use config::Config;
pub use instance::{start, Running, StartError};
pub use shared::{Shared, Table};
