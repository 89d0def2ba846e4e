//! tether: a connection-governing egress proxy.
//!
//! A request travels: [`server`] (accept, admission, the client's clocks) →
//! [`proxy`] (refuse what cannot be forwarded, rewrite the head) → [`route`] (pick
//! the upstream) → [`upstream`] (the governed pool: cap, queue, reuse, connect,
//! reaper) → back through [`proxy::body`] and [`proxy::rewrite`]. The state they
//! share is in [`shared`], [`downstream`] and [`upstream`]; [`instance`] starts,
//! reloads and stops it all. [`admin`] serves metrics and health; [`telemetry`]
//! names every metric; [`cluster`] splits cluster-wide caps between gateway
//! replicas; [`hop_by_hop`] is the one list of the headers no hop forwards.
//! `ARCHITECTURE.md` has the map.

pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
#[cfg(feature = "demo")]
pub mod demo;
pub mod diagnosis;
pub mod downstream;
pub mod error;
pub mod hop_by_hop;
pub mod instance;
pub mod iptables;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod server;
pub mod shared;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod upstream;

pub use config::Config;
pub use instance::{start, Running, StartError};
pub use shared::{Shared, Table};
