//! Server-side costs: CPU seconds from `/proc/<pid>/stat`, counters from a Prometheus page.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a counter could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected format")]
    Format { path: String },
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// User plus system CPU seconds used so far by process `pid` (`None`: this process).
///
/// # Errors
/// The stat file is missing (process gone) or malformed.
pub fn cpu_seconds(pid: Option<u32>) -> Result<f64, StatError> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| StatError::Read {
        path: path.clone(),
        source,
    })?;
    let ticks = parse_stat_ticks(&text).ok_or(StatError::Format { path })?;
    let hz = rustix::param::clock_ticks_per_second();
    Ok(ticks as f64 / hz.max(1) as f64)
}

/// `utime + stime` in clock ticks from the text of a `/proc/<pid>/stat` file. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')': field 3 (state) is index 0, so utime (field 14) is index 11, stime index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Sum of CPU seconds of this process and of `pids`; the second value is `None` when `pids`
/// is empty. A pid that cannot be read is an error (a server that died mid-run must not look
/// cheap).
///
/// # Errors
/// See [`cpu_seconds`].
pub fn cpu_sample(pids: &[u32]) -> Result<(f64, Option<f64>), StatError> {
    let me = cpu_seconds(None)?;
    if pids.is_empty() {
        return Ok((me, None));
    }
    let mut servers = 0.0;
    for p in pids {
        servers += cpu_seconds(Some(*p))?;
    }
    Ok((me, Some(servers)))
}

/// Sum of every sample of `metric` (any labels) in a Prometheus text exposition.
pub fn parse_prometheus(text: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        // The name must end here: `foo_count` must not match `foo_count_total`.
        let rest = match rest.as_bytes().first() {
            Some(b'{') => &rest[rest.find('}')? + 1..],
            Some(b' ') | Some(b'\t') => rest,
            _ => continue,
        };
        let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Fetch `url` (plain `http://host:port/path`) with HTTP/1.0 and return the body.
///
/// # Errors
/// Not an `http://` URL, connection or read failure, a status other than 200, or a timeout.
pub async fn http_get(url: &str, timeout: Duration) -> Result<String, StatError> {
    let fail = |reason: String| StatError::Fetch {
        url: url.to_string(),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| fail("only http:// URLs".into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("no header".into()))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_ascii_whitespace().nth(1) != Some("200") {
            return Err(fail(format!("status line {status:?}")));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// Sum of `metric` over the `/metrics` pages at `urls`; `None` if any page or sample is missing.
pub async fn scrape_sum(urls: &[String], metric: &str) -> Option<u64> {
    let mut total = 0.0;
    for url in urls {
        let body = http_get(url, Duration::from_secs(5)).await.ok()?;
        total += parse_prometheus(&body, metric)?;
    }
    Some(total.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (my (odd) cmd) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 1 0 100 200 300";
        assert_eq!(parse_stat_ticks(stat), Some(280));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert!(cpu_seconds(None).is_ok_and(|s| s >= 0.0));
    }

    #[test]
    fn prometheus_counters_are_summed_and_names_are_exact() {
        let text = "# HELP etcd_disk_wal_fsync_duration_seconds x\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 5\n\
            etcd_disk_wal_fsync_duration_seconds_sum 0.5\n\
            etcd_disk_wal_fsync_duration_seconds_count 1234\n\
            etcd_disk_wal_fsync_duration_seconds_count_total 9\n\
            other{a=\"1\"} 2\nother{a=\"2\"} 3.5\n";
        assert_eq!(
            parse_prometheus(text, "etcd_disk_wal_fsync_duration_seconds_count"),
            Some(1234.0)
        );
        assert_eq!(parse_prometheus(text, "other"), Some(5.5));
        assert_eq!(parse_prometheus(text, "missing"), None);
    }
}
