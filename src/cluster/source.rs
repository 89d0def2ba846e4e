//! Reading the member list: `dns:NAME` through the system resolver (the A and AAAA
//! records of a Kubernetes headless Service), or `file:PATH` (one address per line,
//! a mounted ConfigMap say). A read either gives the whole list or fails: a list
//! read in part could count fewer members than there are, and so hand out too
//! large a share.

use std::net::IpAddr;

use crate::config::Members;

/// Why the list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {text:?} is not an IP address")]
    Line {
        path: String,
        line: usize,
        text: String,
    },
    #[error("cannot resolve {name}: {source}")]
    Dns {
        name: String,
        source: std::io::Error,
    },
}

/// Every member address `members` lists now (unsorted, possibly repeated).
pub async fn read(members: &Members) -> Result<Vec<IpAddr>, ReadError> {
    match members {
        Members::File(path) => {
            let shown = path.display().to_string();
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|source| ReadError::File {
                    path: shown.clone(),
                    source,
                })?;
            parse_list(&text).map_err(|(line, text)| ReadError::Line {
                path: shown,
                line,
                text,
            })
        }
        Members::Dns(name) => {
            // getaddrinfo(3), as every other program on the host resolves: the
            // pod's resolv.conf search path and nameserver, /etc/hosts, nsswitch.
            let addrs = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map_err(|source| ReadError::Dns {
                    name: name.clone(),
                    source,
                })?;
            Ok(addrs.map(|a| a.ip()).collect())
        }
    }
}

/// The addresses of a member file: one per line, `#` starts a comment, blank lines
/// are skipped. The first line that is not an address fails the whole list, with
/// its number (from 1) and text.
pub fn parse_list(text: &str) -> Result<Vec<IpAddr>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.split('#').next().unwrap_or("").trim();
            (!line.is_empty()).then_some((i + 1, line))
        })
        .map(|(n, line)| line.parse().map_err(|_| (n, line.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_file_takes_one_address_a_line_with_comments_and_blank_lines() {
        let text = "# gateway replicas\n10.0.0.2\n\n  10.0.0.1  # first\nfd00::1\n";
        let list = parse_list(text).unwrap();
        assert_eq!(
            list,
            ["10.0.0.2", "10.0.0.1", "fd00::1"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(parse_list("").unwrap(), Vec::<IpAddr>::new());
    }

    #[test]
    fn a_line_that_is_not_an_address_fails_the_whole_list() {
        assert_eq!(
            parse_list("10.0.0.1\n10.0.0.300\n10.0.0.2\n"),
            Err((2, "10.0.0.300".to_string()))
        );
        assert!(parse_list("gateway-0.tether\n").is_err());
    }

    #[tokio::test]
    async fn an_unreadable_file_is_an_error_naming_it() {
        let missing = Members::File("/nonexistent/tether-members".into());
        let err = read(&missing).await.unwrap_err().to_string();
        assert!(err.contains("/nonexistent/tether-members"), "{err}");
    }
}
