//! Free loopback ports for the servers.
//!
//! Ports are picked at random *below* the kernel's ephemeral range (read from
//! `/proc/sys/net/ipv4/ip_local_port_range`), then checked by binding them on 127.0.0.1
//! for both TCP and UDP. Staying out of the ephemeral range matters for `restart()`:
//! a killed server's port would otherwise be free for any outgoing connection of the
//! test process to take as its local port, and the server could not bind it again.
//! If that range cannot be used, the kernel's own choice (`127.0.0.1:0`) is the fallback.
//!
//! No port is handed out twice in one process, so servers started by concurrent tests
//! never race for the same port.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};

use rand::Rng;

use super::HarnessError;

/// The lowest port the harness picks from.
const LOW: u16 = 10_000;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static SET: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Holds the port bound (TCP and UDP) until all ports of one request are found.
struct Reservation {
    _tcp: TcpListener,
    _udp: UdpSocket,
    port: u16,
}

fn reserve(port: u16) -> Option<Reservation> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let tcp = TcpListener::bind(addr).ok()?;
    let port = tcp.local_addr().ok()?.port();
    let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).ok()?;
    Some(Reservation {
        _tcp: tcp,
        _udp: udp,
        port,
    })
}

/// `n` distinct ports, free for TCP and UDP on 127.0.0.1 at the time of the call.
pub(crate) fn allocate(n: usize) -> Result<Vec<u16>, HarnessError> {
    let mut used = handed_out().lock().unwrap_or_else(|e| e.into_inner());
    let mut held: Vec<Reservation> = Vec::with_capacity(n);
    let high = ephemeral_low();
    let mut rng = rand::thread_rng();
    let mut tries = 0usize;
    while held.len() < n {
        tries += 1;
        if tries > 10_000 {
            return Err(HarnessError::io(
                "finding free ports on 127.0.0.1",
                std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port found"),
            ));
        }
        // Random ports below the ephemeral range; only if that range is too small or
        // nearly full does the kernel choose.
        let candidate = if high > LOW + 1_000 && tries <= 1_000 {
            rng.gen_range(LOW..high)
        } else {
            0
        };
        if candidate != 0 && used.contains(&candidate) {
            continue;
        }
        let Some(r) = reserve(candidate) else {
            continue;
        };
        if used.contains(&r.port) || held.iter().any(|h| h.port == r.port) {
            continue;
        }
        held.push(r);
    }
    let ports: Vec<u16> = held.iter().map(|r| r.port).collect();
    used.extend(ports.iter().copied());
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_never_reused() {
        let a = allocate(6).unwrap();
        let b = allocate(6).unwrap();
        let all: HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 12);
    }
}
