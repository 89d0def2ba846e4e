//! Why a client connection closed: the `reason` label of
//! `tether_downstream_connections_closed_total`, one typed value per reason.

/// Why a client connection closed: the `reason` label of the closed counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientClose {
    ClientClosed = 0,
    IdleTimeout = 1,
    HeaderTimeout = 2,
    Evicted = 3,
    Shutdown = 4,
    Error = 5,
    /// Refused at accept: `max_client_connections` reached and none idle.
    Limit = 6,
    /// A redirected connection whose original destination the egress policy does
    /// not allow (or that was not redirected at all): closed without a byte.
    Denied = 7,
    /// Refused at accept: the client is at `max_connections_per_client` and none of
    /// its connections is idle.
    ClientLimit = 8,
}

impl ClientClose {
    /// Every reason, in discriminant order: the counters are built from it.
    pub const ALL: [ClientClose; 9] = [
        ClientClose::ClientClosed,
        ClientClose::IdleTimeout,
        ClientClose::HeaderTimeout,
        ClientClose::Evicted,
        ClientClose::Shutdown,
        ClientClose::Error,
        ClientClose::Limit,
        ClientClose::Denied,
        ClientClose::ClientLimit,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientClose::ClientClosed => "client_closed",
            ClientClose::IdleTimeout => "idle_timeout",
            ClientClose::HeaderTimeout => "header_timeout",
            ClientClose::Evicted => "evicted",
            ClientClose::Shutdown => "shutdown",
            ClientClose::Error => "error",
            ClientClose::Limit => "limit",
            ClientClose::Denied => "denied",
            ClientClose::ClientLimit => "client_limit",
        }
    }

    pub(super) fn from_u8(n: u8) -> ClientClose {
        Self::ALL
            .get(n as usize)
            .copied()
            .unwrap_or(ClientClose::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_listed_in_discriminant_order() {
        for (i, reason) in ClientClose::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{}", reason.as_str());
            assert_eq!(ClientClose::from_u8(i as u8), reason);
        }
    }
}
