//! The demo's peers: the fake registry pair of one run, and the leaky preheats
//! against it, paced in bursts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::DemoOptions;
use crate::testkit::leaky::LeakyClient;
use crate::testkit::listening::Listening;
use crate::testkit::registry::{registry_flow, FakeRegistry, RegistryOptions};

/// A preheat that takes longer than this counts as failed.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The fake registry and token server of one run.
pub(super) struct Servers {
    pub(super) fake: FakeRegistry,
}

impl Servers {
    pub(super) async fn start() -> Servers {
        Servers {
            fake: FakeRegistry::start(RegistryOptions::default()).await,
        }
    }

    pub(super) fn both(&self) -> [&Listening; 2] {
        [&self.fake.registry, &self.fake.auth]
    }

    pub(super) fn open(&self) -> [usize; 2] {
        self.both().map(Listening::open)
    }

    pub(super) fn peaks(&self) -> [usize; 2] {
        self.both().map(Listening::peak)
    }

    /// Requests that did not come through a proxy (no `Via`).
    pub(super) fn unproxied(&self) -> [usize; 2] {
        self.both().map(Listening::unproxied_requests)
    }

    pub(super) fn ss(&self) -> Option<[usize; 2]> {
        Some([
            crate::testkit::ss_established_to(self.fake.registry.addr.port())?,
            crate::testkit::ss_established_to(self.fake.auth.addr.port())?,
        ])
    }
}

/// The preheats of one run, in bursts of `concurrency` paced evenly over `duration`,
/// and every client they leaked. Dropping this closes the leaked sockets.
pub(super) struct Preheats {
    pub(super) started: Instant,
    total: usize,
    pub(super) done: Arc<AtomicUsize>,
    pub(super) succeeded: Arc<AtomicUsize>,
    pub(super) first_error: Arc<Mutex<Option<String>>>,
    clients: Arc<Mutex<Vec<LeakyClient>>>,
    driver: JoinHandle<()>,
}

impl Preheats {
    pub(super) fn start(options: &DemoOptions, registry: SocketAddr) -> Preheats {
        let started = Instant::now();
        let total = options.preheats;
        let burst = options.concurrency.max(1);
        let pace = options.duration / total.div_ceil(burst).max(1) as u32;
        let permits = Arc::new(Semaphore::new(burst));
        let done = Arc::new(AtomicUsize::new(0));
        let succeeded = Arc::new(AtomicUsize::new(0));
        let first_error = Arc::new(Mutex::new(None));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let driver = {
            let (done, succeeded) = (done.clone(), succeeded.clone());
            let (first_error, clients) = (first_error.clone(), clients.clone());
            tokio::spawn(async move {
                for n in 0..total {
                    tokio::time::sleep_until(started + pace * (n / burst) as u32).await;
                    let permit = permits.clone().acquire_owned().await.expect("never closed");
                    let (done, succeeded) = (done.clone(), succeeded.clone());
                    let (first_error, clients) = (first_error.clone(), clients.clone());
                    tokio::spawn(async move {
                        // A new client per preheat, never closed: the Dragonfly bug.
                        let mut client = LeakyClient::new();
                        let result = preheat(&mut client, registry, n).await;
                        clients.lock().push(client);
                        match result {
                            Ok(()) => {
                                succeeded.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                first_error.lock().get_or_insert(e);
                            }
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                        drop(permit);
                    });
                }
            })
        };
        Preheats {
            started,
            total,
            done,
            succeeded,
            first_error,
            clients,
            driver,
        }
    }

    pub(super) fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst) >= self.total
    }

    /// The leaky client's sockets still open (only the server side closes them).
    pub(super) fn open(&self) -> usize {
        self.clients.lock().iter().map(LeakyClient::open).sum()
    }
}

impl Drop for Preheats {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One preheat of image `library/app-<n>` against the registry at `registry`.
async fn preheat(client: &mut LeakyClient, registry: SocketAddr, n: usize) -> Result<(), String> {
    let base = format!("http://{registry}");
    let image = format!("library/app-{n}");
    let flow = registry_flow(client, &base, &image, "latest");
    match tokio::time::timeout(PREHEAT_TIMEOUT, flow).await {
        Ok(result) => result.map(|_| ()).map_err(|e| e.to_string()),
        Err(_) => Err(format!("took longer than {PREHEAT_TIMEOUT:?}")),
    }
}
