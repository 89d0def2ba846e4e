//! Network namespaces for tests that need real iptables rules.
//!
//! [`Pair`] makes two namespaces joined by a veth pair, with addresses in
//! 10.213.0.0/24 and fd00:213::/64 that exist only inside them; traffic between
//! them never leaves the machine. Names carry the test process's id and a counter,
//! so parallel tests and parallel runs never share one; dropping the pair deletes
//! both (which deletes the veth ends too), and namespaces left by runs that died are
//! deleted first.
//!
//! [`NsRuntime`] is a tokio runtime on a thread that entered one namespace: sockets
//! that its tasks open live there. [`TetherProcess`] runs the tether binary in a
//! namespace as a non-root uid, as the sidecar does, so iptables can tell its
//! traffic from the client's.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Every namespace these tests make starts with this.
pub const PREFIX: &str = "tether-e2e-";
/// The address of the first namespace's end of the veth pair.
pub const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The address of the second namespace's end.
pub const B_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
/// The IPv6 (unique local) address of the first namespace's end.
pub const A_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x213, 0, 0, 0, 0, 0, 1);
/// The IPv6 address of the second namespace's end.
pub const B_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x213, 0, 0, 0, 0, 0, 2);

/// Whether the test can run: it needs root, `ip`, `iptables` and `setpriv`. Outside
/// CI a missing one skips the test with a message; in CI (`CI` set) it fails.
pub fn can_run(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("root (network namespaces and iptables)".to_string())
    } else {
        ["ip", "iptables", "setpriv"]
            .into_iter()
            .find(|tool| {
                // `ip -V`: iproute2's `ip --version` exits 255.
                let flag = if *tool == "ip" { "-V" } else { "--version" };
                Command::new(tool)
                    .arg(flag)
                    .output()
                    .map_or(true, |o| !o.status.success())
            })
            .map(|tool| format!("`{tool}` (apt-get install iproute2 iptables util-linux)"))
    };
    let Some(missing) = missing else {
        return true;
    };
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
    assert!(
        !in_ci,
        "CI is set but {test} cannot run: it needs {missing}"
    );
    eprintln!("SKIPPED {test}: needs {missing}");
    false
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command inside namespace `ns`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Two namespaces joined by a veth pair: `a` (10.213.0.1, fd00:213::1) and `b`
/// (10.213.0.2, fd00:213::2).
pub struct Pair {
    pub a: String,
    pub b: String,
}

impl Pair {
    /// Makes the pair. `hosts` entries go into `a`'s `/etc/hosts` (as `ip netns
    /// exec` sees it), so processes there can resolve names to `b`.
    pub fn new(hosts: &[(&str, IpAddr)]) -> Pair {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        remove_stale();
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = Pair {
            a: format!("{PREFIX}{id}-a"),
            b: format!("{PREFIX}{id}-b"),
        };
        // Interface names are limited to 15 bytes.
        let short = format!("t{}{}", std::process::id(), NEXT.load(Ordering::Relaxed));
        let (veth_a, veth_b) = (format!("{short}a"), format!("{short}b"));
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        run("ip", &["netns", "add", a]);
        run("ip", &["netns", "add", b]);
        run(
            "ip",
            &[
                "link", "add", &veth_a, "netns", a, "type", "veth", "peer", "name", &veth_b,
                "netns", b,
            ],
        );
        for (ns, dev, addr) in [(a, &veth_a, A_ADDR), (b, &veth_b, B_ADDR)] {
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            );
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        for (ns, dev, addr) in [(a, &veth_a, A_ADDR6), (b, &veth_b, B_ADDR6)] {
            // nodad: usable at once, without duplicate address detection's delay.
            let cidr = format!("{addr}/64");
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev, "nodad"]);
        }
        if !hosts.is_empty() {
            let dir = Path::new("/etc/netns").join(a);
            std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
            let mut text = "127.0.0.1 localhost\n".to_string();
            for (name, ip) in hosts {
                text.push_str(&format!("{ip} {name}\n"));
            }
            std::fs::write(dir.join("hosts"), text).expect("write the namespace's hosts");
        }
        pair
    }

    /// Gives `a` its own resolver configuration: `ip netns exec` mounts
    /// `/etc/netns/<a>/resolv.conf` over `/etc/resolv.conf` for the processes it
    /// starts, so their system resolver asks `nameserver` (the machine's own
    /// resolv.conf is untouched).
    pub fn resolver(&self, nameserver: IpAddr) {
        let dir = Path::new("/etc/netns").join(&self.a);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        let text = format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n");
        std::fs::write(dir.join("resolv.conf"), text).expect("write the namespace's resolv.conf");
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            delete(ns);
        }
    }
}

fn delete(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Deletes namespaces (and their hosts files) and temporary directories (with a
/// copy of the binary each) left by test processes that died.
fn remove_stale() {
    let dead = |name: &str| {
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next());
        pid.is_some_and(|pid| !pid.is_empty() && !Path::new("/proc").join(pid).exists())
    };
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if dead(name) {
            delete(name);
        }
    }
}

/// A current-thread tokio runtime on a thread inside one network namespace.
pub struct NsRuntime {
    pub handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    pub fn enter(ns: &str) -> NsRuntime {
        let path = Path::new("/run/netns").join(ns);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).expect("open the namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the namespace");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            tx.send((runtime.handle().clone(), stop_tx)).unwrap();
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let (handle, stop) = rx.recv().expect("the namespace thread started");
        NsRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `work` inside the namespace and returns its output.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(work)
            .await
            .expect("task in the namespace")
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The uid tether runs as in these tests (the sidecar manifest's `runAsUser`).
pub const TETHER_UID: u32 = 65532;

/// The tether binary, running inside a namespace as [`TETHER_UID`]; killed when
/// dropped.
pub struct TetherProcess {
    child: std::sync::Mutex<Child>,
    pub dir: TempDir,
    pub config: PathBuf,
    pub binary: PathBuf,
}

impl TetherProcess {
    /// Writes `config` and starts `tether run` with it inside `ns`. The binary is
    /// copied next to the config, so the unprivileged uid can run it wherever the
    /// build directory is.
    pub fn spawn(ns: &str, config: &str) -> TetherProcess {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        let open = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        open(dir.path(), 0o755);
        let binary = dir.path().join("tether");
        std::fs::copy(env!("CARGO_BIN_EXE_tether"), &binary).expect("copy the binary");
        open(&binary, 0o755);
        let config_path = dir.path().join("tether.toml");
        std::fs::write(&config_path, config).unwrap();
        open(&config_path, 0o644);
        let log = File::create(dir.path().join("tether.log")).unwrap();
        let uid = TETHER_UID.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "setpriv"])
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            // Dies with the test, even one killed before it could clean up.
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&binary)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info,tether=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tether");
        TetherProcess {
            child: std::sync::Mutex::new(child),
            config: config_path,
            binary,
            dir,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tether.log")).unwrap_or_default()
    }

    /// Panics with the log if tether has exited.
    pub fn assert_running(&self) {
        if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
            panic!("tether exited ({status}):\n{}", self.log());
        }
    }

    /// Rewrites the config and sends SIGHUP. (`ip netns exec` and `setpriv` exec,
    /// so the child is tether itself.)
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.lock().unwrap().id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("signal tether");
    }
}

impl Drop for TetherProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Established TCP sockets in `ns` whose local port is `port`: from a server's side,
/// its clients.
pub fn established_from(ns: &str, port: u16) -> usize {
    run_in(
        ns,
        "ss",
        &[
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ],
    )
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count()
}
