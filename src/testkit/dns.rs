//! A DNS server on UDP that answers A and AAAA queries from a table a test sets
//! and changes while it runs, with TTL 0 so no resolver caches an answer: what a
//! headless Service's records look like to a pod's resolver. A name it does not
//! know gets NXDOMAIN. It counts the queries it answered.
//!
//! Only the part of RFC 1035 a stub resolver's query needs: one question, no
//! compression in it, answers pointing back at it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::UdpSocket;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const NXDOMAIN: u8 = 3;
const FORMERR: u8 = 1;

type Records = Arc<Mutex<HashMap<String, Vec<IpAddr>>>>;

/// A running DNS server.
#[derive(Clone)]
pub struct DnsServer {
    pub addr: SocketAddr,
    records: Records,
    queries: Arc<AtomicUsize>,
}

impl DnsServer {
    /// Serves on `bind` (UDP) until the runtime it was started on ends.
    pub async fn start(bind: SocketAddr) -> DnsServer {
        let socket = UdpSocket::bind(bind).await.expect("bind the DNS server");
        let addr = socket.local_addr().expect("bound");
        let server = DnsServer {
            addr,
            records: Arc::default(),
            queries: Arc::default(),
        };
        let (records, queries) = (server.records.clone(), server.queries.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = answer(&buf[..n], &records.lock());
                if let Some(reply) = reply {
                    queries.fetch_add(1, Ordering::SeqCst);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        server
    }

    /// `name` resolves to `addrs` from now on (no addresses: an empty answer).
    pub fn set(&self, name: &str, addrs: &[IpAddr]) {
        self.records
            .lock()
            .insert(name.to_ascii_lowercase(), addrs.to_vec());
    }

    /// `name` is unknown from now on (NXDOMAIN).
    pub fn remove(&self, name: &str) {
        self.records.lock().remove(&name.to_ascii_lowercase());
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// The reply to one query packet; `None` for what is not a query at all.
fn answer(query: &[u8], records: &HashMap<String, Vec<IpAddr>>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None; // too short, or a response
    }
    let mut reply = query[..2].to_vec(); // the id
                                         // QR, the query's opcode and RD; RA.
    let flags = 0x80 | (query[2] & 0x79);
    let question = parse_question(query);
    let Some((name, qtype, end)) = question else {
        reply.extend_from_slice(&[flags, 0x80 | FORMERR, 0, 0, 0, 0, 0, 0, 0, 0]);
        return Some(reply);
    };
    let found = records.get(&name);
    let addrs: Vec<&IpAddr> = found
        .into_iter()
        .flatten()
        .filter(|a| match qtype {
            TYPE_A => a.is_ipv4(),
            TYPE_AAAA => a.is_ipv6(),
            _ => false,
        })
        .collect();
    let rcode = if found.is_some() { 0 } else { NXDOMAIN };
    reply.extend_from_slice(&[flags, 0x80 | rcode, 0, 1]);
    reply.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    reply.extend_from_slice(&query[12..end]);
    for addr in addrs {
        reply.extend_from_slice(&[0xc0, 12]); // the name: the question's
        let (rtype, data) = match addr {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        reply.extend_from_slice(&rtype.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: never cached
        reply.extend_from_slice(&(data.len() as u16).to_be_bytes());
        reply.extend_from_slice(&data);
    }
    Some(reply)
}

/// The first question: its name (lower case, no trailing dot), type, and where it
/// ends in the packet.
fn parse_question(packet: &[u8]) -> Option<(String, u16, usize)> {
    if u16::from_be_bytes([packet[4], packet[5]]) == 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a pointer or reserved: not in a query's question
        }
        let label = packet.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]);
    packet.get(at + 2..at + 4)?; // the class
    Some((labels.join("."), qtype, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_answers_a_and_aaaa_from_its_table_and_nxdomain_otherwise() {
        let dns = DnsServer::start(([127, 0, 0, 1], 0).into()).await;
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        dns.set("gw.Test", &[v4, v6]);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let query = |id: u8, qtype: u16, name: &str| {
            let mut q = vec![0, id, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in name.split('.') {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.push(0);
            q.extend_from_slice(&qtype.to_be_bytes());
            q.extend_from_slice(&CLASS_IN.to_be_bytes());
            q
        };
        let mut buf = [0u8; 512];
        for (id, qtype, name, rcode, answers, last) in [
            (1, TYPE_A, "gw.test", 0, 1, vec![10, 0, 0, 1]),
            (2, TYPE_AAAA, "GW.test", 0, 1, v6_octets(v6)),
            (3, TYPE_A, "other.test", NXDOMAIN, 0, vec![]),
        ] {
            client
                .send_to(&query(id, qtype, name), dns.addr)
                .await
                .unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            let reply = &buf[..n];
            assert_eq!(reply[1], id);
            assert_eq!(reply[3] & 0x0f, rcode, "{name}");
            assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), answers);
            assert!(reply.ends_with(&last));
        }
        assert_eq!(dns.queries(), 3);
    }

    fn v6_octets(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V6(v6) => v6.octets().to_vec(),
            IpAddr::V4(_) => unreachable!(),
        }
    }
}
