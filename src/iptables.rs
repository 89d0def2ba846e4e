//! The iptables rules behind transparent interception (`tether iptables`).
//!
//! They live in the client's network namespace (a pod's, in Kubernetes) and send its
//! outbound TCP connections to chosen ports to tether's transparent listener with
//! `REDIRECT`, which keeps the original destination in conntrack for
//! `SO_ORIGINAL_DST`. Two exclusions come first, in a chain of tether's own so that
//! removing it leaves nothing behind:
//!
//! - connections made by tether's uid: tether's own upstream sockets go to the very
//!   ports that are redirected, and redirecting them would loop into tether;
//! - connections routed over `lo`: destinations on this host (tether's route
//!   listeners on the pod IP, say) are not egress.

use std::fmt;
use std::process::Command;

/// The nat chain holding tether's rules; `OUTPUT` jumps to it once.
pub const CHAIN: &str = "TETHER_OUTPUT";

/// What to redirect, where to, and whose traffic to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Destination ports whose connections are redirected.
    pub ports: Vec<u16>,
    /// The transparent listener's port.
    pub proxy_port: u16,
    /// The uid tether runs as.
    pub uid: u32,
    /// Also write the rules for IPv6 (`ip6tables`).
    pub ipv6: bool,
}

/// One `iptables`/`ip6tables` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: &'static str,
    pub args: Vec<String>,
}

impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.program, self.args.join(" "))
    }
}

fn programs(ipv6: bool) -> &'static [&'static str] {
    if ipv6 {
        &["iptables", "ip6tables"]
    } else {
        &["iptables"]
    }
}

fn nat(program: &'static str, args: &[&str]) -> Invocation {
    // -w: wait for the xtables lock rather than fail when another writer holds it.
    let mut all = vec!["-w".to_string(), "-t".into(), "nat".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    Invocation { program, args: all }
}

impl Rules {
    /// The invocations that install the rules (on a namespace without them).
    pub fn install(&self) -> Vec<Invocation> {
        let uid = self.uid.to_string();
        let to = self.proxy_port.to_string();
        let mut out = Vec::new();
        for &program in programs(self.ipv6) {
            out.push(nat(program, &["-N", CHAIN]));
            out.push(nat(
                program,
                &[
                    "-A",
                    CHAIN,
                    "-m",
                    "owner",
                    "--uid-owner",
                    &uid,
                    "-j",
                    "RETURN",
                ],
            ));
            out.push(nat(program, &["-A", CHAIN, "-o", "lo", "-j", "RETURN"]));
            for port in &self.ports {
                let port = port.to_string();
                out.push(nat(
                    program,
                    &[
                        "-A",
                        CHAIN,
                        "-p",
                        "tcp",
                        "--dport",
                        &port,
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &to,
                    ],
                ));
            }
            out.push(nat(program, &["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN]));
        }
        out
    }
}

/// The invocations that remove the rules: unhook the chain from `OUTPUT`, empty it,
/// delete it. Each may fail harmlessly when there is nothing to remove.
pub fn uninstall(ipv6: bool) -> Vec<Invocation> {
    programs(ipv6)
        .iter()
        .flat_map(|&program| {
            [
                nat(program, &["-D", "OUTPUT", "-p", "tcp", "-j", CHAIN]),
                nat(program, &["-F", CHAIN]),
                nat(program, &["-X", CHAIN]),
            ]
        })
        .collect()
}

/// Runs `invocation`; `Ok(false)` when the program ran and refused.
pub fn run(invocation: &Invocation) -> std::io::Result<bool> {
    let output = Command::new(invocation.program)
        .args(&invocation.args)
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", invocation.program)))?;
    if !output.status.success() {
        tracing::debug!(%invocation, stderr = %String::from_utf8_lossy(&output.stderr).trim(), "refused");
    }
    Ok(output.status.success())
}

/// Removes any rules tether installed. Idempotent: what is absent is skipped. The
/// `OUTPUT` jump is deleted until none is left, in case it was added twice.
pub fn remove(ipv6: bool) -> std::io::Result<()> {
    for invocation in uninstall(ipv6) {
        if invocation.args.contains(&"-D".to_string()) {
            for _ in 0..16 {
                if !run(&invocation)? {
                    break;
                }
            }
        } else {
            run(&invocation)?;
        }
    }
    Ok(())
}

/// Replaces whatever rules tether had installed with `rules`. Errors name the
/// invocation that failed.
pub fn apply(rules: &Rules) -> std::io::Result<()> {
    remove(rules.ipv6)?;
    for invocation in rules.install() {
        if !run(&invocation)? {
            return Err(std::io::Error::other(format!("`{invocation}` failed")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(invocations: &[Invocation]) -> Vec<String> {
        invocations.iter().map(|i| i.to_string()).collect()
    }

    #[test]
    fn the_exclusions_come_before_the_redirects_in_tethers_own_chain() {
        let rules = Rules {
            ports: vec![32402, 443],
            proxy_port: 15001,
            uid: 65532,
            ipv6: false,
        };
        assert_eq!(
            lines(&rules.install()),
            [
                "iptables -w -t nat -N TETHER_OUTPUT",
                "iptables -w -t nat -A TETHER_OUTPUT -m owner --uid-owner 65532 -j RETURN",
                "iptables -w -t nat -A TETHER_OUTPUT -o lo -j RETURN",
                "iptables -w -t nat -A TETHER_OUTPUT -p tcp --dport 32402 -j REDIRECT --to-ports 15001",
                "iptables -w -t nat -A TETHER_OUTPUT -p tcp --dport 443 -j REDIRECT --to-ports 15001",
                "iptables -w -t nat -A OUTPUT -p tcp -j TETHER_OUTPUT",
            ]
        );
    }

    #[test]
    fn ipv6_repeats_the_rules_with_ip6tables() {
        let rules = Rules {
            ports: vec![443],
            proxy_port: 15001,
            uid: 1,
            ipv6: true,
        };
        let install = rules.install();
        assert_eq!(install.len(), 10);
        assert!(install[5..].iter().all(|i| i.program == "ip6tables"));
        assert_eq!(
            lines(&uninstall(false)),
            [
                "iptables -w -t nat -D OUTPUT -p tcp -j TETHER_OUTPUT",
                "iptables -w -t nat -F TETHER_OUTPUT",
                "iptables -w -t nat -X TETHER_OUTPUT",
            ]
        );
    }
}
