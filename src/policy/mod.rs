//! Egress policy: which origins a client may reach through tether.
//!
//! Only origins listed as `[[upstream]]` and origins matching an explicit `[egress]
//! allow` pattern are reachable; everything else is denied before any upstream socket
//! is opened. tether is never an open proxy by default.
//!
//! An allow pattern admits a name, not whatever it resolves to: unless
//! `allow_private`, an origin reached through one may only be dialled at plain
//! globally reachable unicast addresses ([`first_refused`] over the resolved
//! addresses; [`refusal`] says what "private" covers, in [`ranges`]). Listed
//! upstreams are trusted as written. Origins and patterns themselves are parsed in
//! [`origin`], which the config's validation uses too.

pub mod origin;
pub mod ranges;

use std::collections::HashMap;

pub use origin::{Origin, Pattern};
pub use ranges::{first_refused, refusal, Refusal};

/// What the policy says about an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A listed upstream, by index in the config.
    Upstream(usize),
    /// Matched an allow pattern; pooled under the `unlisted` label. Private
    /// destinations are refused at connect time unless `allow_private`.
    Allowed,
    Denied,
}

/// The egress policy built from the config.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    upstreams: HashMap<Origin, usize>,
    allow: Vec<Pattern>,
    pub allow_private: bool,
}

impl Policy {
    pub fn new(config: &crate::config::Config) -> Policy {
        Policy {
            upstreams: config
                .upstream
                .iter()
                .enumerate()
                .filter_map(|(i, u)| Origin::parse_authority(&u.origin).ok().map(|o| (o, i)))
                .collect(),
            allow: config
                .egress
                .allow
                .iter()
                .filter_map(|p| Pattern::parse(p).ok())
                .collect(),
            allow_private: config.egress.allow_private,
        }
    }

    pub fn decide(&self, origin: &Origin) -> Decision {
        if let Some(&i) = self.upstreams.get(origin) {
            Decision::Upstream(i)
        } else if self.allow.iter().any(|p| p.matches(origin)) {
            Decision::Allowed
        } else {
            Decision::Denied
        }
    }
}
