//! Box networking. Every box has a network namespace of its own, whatever
//! its mode: a `none` box has only its loopback; an `egress` box also gets
//! one end of a veth pair, routed (never bridged) through the host:
//!
//! ```text
//!   box netns                         host
//!   eth0 10.224.0.7/32  ── veth ──  bl<…> (gateway 10.224.0.1/32, group G)
//!   default via 10.224.0.1            route 10.224.0.7/32 dev bl<…>
//! ```
//!
//! One nftables table per runner (`inet boxlite-<key>`) decides what those
//! interfaces (matched by their interface group) may do:
//! - nothing addressed to the host itself (input: drop), so no host
//!   service, runner or control-plane port is reachable, on any address;
//! - no packet whose source would not route back through the interface it
//!   came in on (`fib saddr . iif`): a box cannot borrow another's address;
//! - never to another box (of this runner: `oifgroup`; of any runner on the
//!   host: the whole box subnet pool is denied), nor to loopback,
//!   link-local (the cloud metadata service included), multicast or
//!   reserved ranges, nor to the control plane's and runner's addresses —
//!   the *hard* deny list, which nothing lifts;
//! - not to private ranges (RFC 1918, CGNAT, …) unless the box's own
//!   allow-list (within the stage's) names the destination;
//! - IPv4 only: IPv6 from a box is dropped;
//! - DNS: the box's resolver is its gateway address, DNAT'ed to the host's
//!   upstream resolver (only port 53 of that one address).
//!
//! Everything that is not an egress box's traffic is left alone, so several
//! runners (the local target) share a host without touching each other.
//!
//! Inbound traffic reaches a box only through the runner:
//! [`connect_in_netns`] opens a TCP connection to `127.0.0.1:PORT` inside a
//! box's namespace, whatever the box's mode.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::Ipv4Cidr;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where runners take their box subnet from unless `box_subnet` is set; the
/// whole pool is on every runner's hard deny list, so boxes of different
/// runners on one host never reach each other either.
pub const SUBNET_POOL: &str = "10.224.0.0/12";
/// Prefix length of the subnet a runner takes from the pool (1,021 boxes).
pub const RUNNER_PREFIX: u8 = 22;

/// Destinations no allow-list lifts (besides the host itself, which the
/// input chain covers, and the addresses given by configuration).
pub const HARD_DENY: [&str; 5] = [
    "0.0.0.0/8",      // "this network"
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local: instance metadata (169.254.169.254), cloud DNS
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, broadcast
];

/// Private and special-purpose ranges: denied unless a box's allow-list names them.
pub const PRIVATE: [&str; 6] = [
    "10.0.0.0/8",     // RFC 1918 (VPCs)
    "172.16.0.0/12",  // RFC 1918
    "192.168.0.0/16", // RFC 1918
    "100.64.0.0/10",  // RFC 6598 carrier-grade NAT
    "192.0.0.0/24",   // IETF protocol assignments
    "198.18.0.0/15",  // benchmarking
];

/// The built-in hard deny list: [`HARD_DENY`] and the box subnet pool.
pub fn hard_deny_builtin() -> Vec<Ipv4Cidr> {
    let mut v = cidrs(&HARD_DENY);
    v.push(SUBNET_POOL.parse().expect("constant CIDR"));
    v
}

/// `v` without the blocks another block of `v` covers, sorted: nftables
/// refuses overlapping intervals in one set.
pub fn normalize(mut v: Vec<Ipv4Cidr>) -> Vec<Ipv4Cidr> {
    v.sort_by_key(|c| (c.prefix(), c.network()));
    let mut out: Vec<Ipv4Cidr> = Vec::with_capacity(v.len());
    for c in v {
        if !out.iter().any(|o| o.covers(&c)) {
            out.push(c);
        }
    }
    out.sort();
    out
}

fn cidrs(list: &[&str]) -> Vec<Ipv4Cidr> {
    list.iter()
        .map(|s| s.parse().expect("constant CIDR"))
        .collect()
}

/// The runner's egress network, fixed at agent start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPlan {
    /// Short key of this runner on the host (from its state directory).
    pub key: String,
    /// Boxes' addresses come from here; the first address is the gateway.
    pub subnet: Ipv4Cidr,
    /// Interface group of every box's host-side interface.
    pub group: u32,
    /// Upstream resolver the gateway's port 53 leads to, if any.
    pub dns: Option<Ipv4Addr>,
    /// Denied whatever the allow-lists say (configuration plus [`HARD_DENY`] and the pool).
    pub hard_deny: Vec<Ipv4Cidr>,
    /// Denied unless a box's allow-list names the destination.
    pub private: Vec<Ipv4Cidr>,
}

impl NetPlan {
    /// The plan for a runner whose state directory is `state_dir`.
    pub fn new(
        state_dir: &Path,
        subnet: Ipv4Cidr,
        dns: Option<Ipv4Addr>,
        extra_deny: &[Ipv4Cidr],
    ) -> NetPlan {
        let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
        let key = hex::encode(&digest[..4]);
        // Interface groups 0..=255 are the ones people name in /etc/iproute2/group.
        let group = 0x1000_0000
            | (u32::from_be_bytes([digest[4], digest[5], digest[6], digest[7]]) & 0x0fff_ffff);
        let mut hard_deny = hard_deny_builtin();
        let pool: Ipv4Cidr = SUBNET_POOL.parse().expect("constant CIDR");
        if !pool.covers(&subnet) {
            hard_deny.push(subnet);
        }
        hard_deny.extend_from_slice(extra_deny);
        let hard_deny = normalize(hard_deny);
        NetPlan {
            key,
            subnet,
            group,
            dns,
            hard_deny,
            private: cidrs(&PRIVATE),
        }
    }

    /// Address every box uses as its gateway (and resolver).
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1).expect("a runner subnet has room")
    }

    /// The nftables table's name.
    pub fn table(&self) -> String {
        format!("boxlite-{}", self.key)
    }

    /// Host-side interface name of a box's veth (15 bytes at most).
    pub fn host_iface(&self, box_id: &uuid::Uuid) -> String {
        let d = Sha256::digest(box_id.as_bytes());
        format!("bl{}{}", &self.key[..5], &hex::encode(&d[..4]))
    }

    /// Addresses boxes may be given: the subnet minus network, gateway and broadcast.
    pub fn box_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (2..self.subnet.size().saturating_sub(1)).filter_map(|n| self.subnet.nth(n))
    }

    /// The lowest free box address, given those in use.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        self.box_addresses().find(|a| !used.contains(a))
    }

    /// The whole ruleset, as one `nft -f` transaction that replaces the
    /// table atomically (a box never sees a moment without rules).
    pub fn ruleset(&self, allow: &[(Ipv4Addr, Ipv4Cidr)]) -> String {
        let t = self.table();
        let g = self.group;
        let set = |v: &[Ipv4Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# boxlite-runner: egress rules of the boxes of one runner."
        );
        let _ = writeln!(s, "table inet {t} {{}}");
        let _ = writeln!(s, "delete table inet {t}");
        let _ = writeln!(s, "table inet {t} {{");
        let _ = writeln!(
            s,
            "  set hard_deny {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
            set(&self.hard_deny)
        );
        let _ = writeln!(
            s,
            "  set private {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
            set(&self.private)
        );
        let _ = write!(
            s,
            "  set box_allow {{ type ipv4_addr . ipv4_addr; flags interval;"
        );
        let mut by_box: std::collections::BTreeMap<Ipv4Addr, Vec<Ipv4Cidr>> = Default::default();
        for (a, c) in allow {
            by_box.entry(*a).or_default().push(*c);
        }
        let allow: Vec<(Ipv4Addr, Ipv4Cidr)> = by_box
            .into_iter()
            .flat_map(|(a, v)| normalize(v).into_iter().map(move |c| (a, c)))
            .collect();
        if allow.is_empty() {
            let _ = writeln!(s, " }}");
        } else {
            let elems: Vec<String> = allow.iter().map(|(a, c)| format!("{a} . {c}")).collect();
            let _ = writeln!(s, " elements = {{ {} }} }}", elems.join(", "));
        }
        let _ = writeln!(
            s,
            "  chain box_antispoof {{ type filter hook prerouting priority raw; policy accept;"
        );
        let _ = writeln!(s, "    iifgroup {g} fib saddr . iif oif missing drop");
        let _ = writeln!(s, "    iifgroup {g} ip saddr != {} drop", self.subnet);
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain box_dns {{ type nat hook prerouting priority dstnat; policy accept;"
        );
        if let Some(dns) = self.dns {
            let gw = self.gateway();
            for proto in ["udp", "tcp"] {
                let _ = writeln!(
                    s,
                    "    iifgroup {g} ip daddr {gw} {proto} dport 53 dnat ip to {dns}:53"
                );
            }
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain box_input {{ type filter hook input priority filter; policy accept;"
        );
        let _ = writeln!(s, "    iifgroup {g} drop");
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain box_forward {{ type filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(s, "    iifgroup {g} meta nfproto ipv6 drop");
        let _ = writeln!(s, "    iifgroup {g} oifgroup {g} drop");
        if let Some(dns) = self.dns {
            let _ = writeln!(
                s,
                "    iifgroup {g} ct status dnat ip daddr {dns} th dport 53 accept"
            );
        }
        let _ = writeln!(s, "    iifgroup {g} ip daddr @hard_deny drop");
        let _ = writeln!(s, "    iifgroup {g} ip saddr . ip daddr @box_allow accept");
        let _ = writeln!(s, "    iifgroup {g} ip daddr @private drop");
        let _ = writeln!(s, "    iifgroup {g} accept");
        let _ = writeln!(s, "    oifgroup {g} ct state established,related accept");
        let _ = writeln!(s, "    oifgroup {g} drop");
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain box_nat {{ type nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(s, "    ip saddr {} oifgroup != {g} masquerade", self.subnet);
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "}}");
        s
    }

    /// `nft` commands adding (or deleting) one box's allow-list elements.
    pub fn allow_elements(&self, add: bool, addr: Ipv4Addr, allow: &[Ipv4Cidr]) -> String {
        if allow.is_empty() {
            return String::new();
        }
        let elems: Vec<String> = normalize(allow.to_vec())
            .iter()
            .map(|c| format!("{addr} . {c}"))
            .collect();
        format!(
            "{} element inet {} box_allow {{ {} }}\n",
            if add { "add" } else { "delete" },
            self.table(),
            elems.join(", ")
        )
    }
}

/// What a box's shim needs to wire an `egress` box (part of `launch.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressLaunch {
    /// The box's address.
    pub address: Ipv4Addr,
    /// Its gateway and resolver.
    pub gateway: Ipv4Addr,
    /// Host-side interface name.
    pub host_iface: String,
    /// Interface group of the host side.
    pub group: u32,
}

impl EgressLaunch {
    /// `/etc/resolv.conf` of the box.
    pub fn resolv_conf(&self) -> String {
        format!("# written by boxlite-runner\nnameserver {}\n", self.gateway)
    }
}

/// What `<state>/network.json` keeps: the subnet this runner took.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    subnet: Ipv4Cidr,
}

/// Host-wide lock serialising subnet choice between runners on one host.
const HOST_LOCK: &str = "/run/boxlite/network.lock";

/// Prepare egress networking for the runner with state directory
/// `state_dir`: take its subnet (configured, kept from an earlier start, or
/// a free block of the pool, marked taken on the host by an `unreachable`
/// route that also makes unused box addresses fail fast), install its
/// nftables table with `allow` (the allow-lists of boxes already running),
/// and enable forwarding.
pub fn setup(
    state_dir: &Path,
    configured: Option<Ipv4Cidr>,
    dns: Option<Ipv4Addr>,
    extra_deny: &[Ipv4Cidr],
    allow: &[(Ipv4Addr, Ipv4Cidr)],
) -> Result<NetPlan> {
    let file = state_dir.join("network.json");
    let kept: Option<Persisted> = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let subnet = match (configured, kept) {
        (Some(c), _) => c,
        (None, Some(k)) => k.subnet,
        (None, None) => {
            std::fs::create_dir_all("/run/boxlite").context("creating /run/boxlite")?;
            let lock = crate::sys::lock_wait(Path::new(HOST_LOCK))?;
            let taken = host_networks()?;
            let pool: Ipv4Cidr = SUBNET_POOL.parse().expect("constant CIDR");
            let picked = pick_subnet(pool, RUNNER_PREFIX, &taken).ok_or_else(|| {
                anyhow!("no free /{RUNNER_PREFIX} left in {SUBNET_POOL} for box addresses; set `box_subnet`")
            })?;
            claim_route(picked)?;
            drop(lock);
            picked
        }
    };
    claim_route(subnet)?;
    crate::sys::write_atomic(
        &file,
        &serde_json::to_vec_pretty(&Persisted { subnet })?,
        0o600,
    )?;
    let plan = NetPlan::new(state_dir, subnet, dns, extra_deny);
    nft(&plan.ruleset(allow)).context("installing the box egress rules")?;
    enable_forwarding()?;
    Ok(plan)
}

/// Mark `subnet` as taken on the host (idempotent).
fn claim_route(subnet: Ipv4Cidr) -> Result<()> {
    ip_batch(None, &format!("route replace unreachable {subnet}\n"))
        .with_context(|| format!("claiming {subnet} for boxes"))
}

/// Remove what [`setup`] installed: the runner's table and subnet route
/// (retiring a runner). Missing pieces are fine.
pub fn teardown(state_dir: &Path) {
    let Some(kept) = std::fs::read(state_dir.join("network.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Persisted>(&b).ok())
    else {
        return;
    };
    let plan = NetPlan::new(state_dir, kept.subnet, None, &[]);
    let _ = nft(&format!("delete table inet {}\n", plan.table()));
    let _ = ip_batch(None, &format!("route del unreachable {}\n", kept.subnet));
}

/// Run `ip -batch -` with `script` on stdin, in the network namespace `netns`
/// (the caller's own when `None`).
fn ip_batch(netns: Option<RawFd>, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-batch", "-"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fd) = netns {
        // SAFETY: setns is async-signal-safe and `fd` stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().context("running `ip` (install iproute2)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Give the box whose PID 1 is `pid1` (network namespace `netns`) its veth,
/// address and route. Runs in the shim, before anything runs in the box.
pub fn attach(e: &EgressLaunch, pid1: u32, netns: &OwnedFd) -> Result<()> {
    // A leftover interface of an earlier run of this box would block the name.
    let _ = ip_batch(None, &format!("link del {}\n", e.host_iface));
    ip_batch(
        None,
        &format!(
            "link add {h} group {g} type veth peer name eth0 netns {pid1}\n\
             addr add {gw}/32 dev {h} scope link\n\
             link set {h} up\n\
             route add {a}/32 dev {h} scope link\n",
            h = e.host_iface,
            g = e.group,
            gw = e.gateway,
            a = e.address,
        ),
    )
    .context("creating the box's network interface")?;
    ip_batch(
        Some(netns.as_raw_fd()),
        &format!(
            "addr add {a}/32 dev eth0\n\
             link set eth0 up\n\
             route add default via {gw} dev eth0 onlink\n",
            a = e.address,
            gw = e.gateway,
        ),
    )
    .context("configuring the box's network interface")?;
    Ok(())
}

/// Run `nft -f -` with `script`.
pub fn nft(script: &str) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `nft` (install nftables)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Open a TCP connection to `127.0.0.1:port` inside the network namespace
/// `netns` (a box's): the one way in to a box, for previews and SSH
/// forwarding. The socket is created in a dedicated thread that enters the
/// namespace (a socket belongs to the namespace it was created in), so no
/// thread of the caller ever changes namespace.
pub async fn connect_in_netns(
    netns: OwnedFd,
    port: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("boxlite-netns".into())
        .spawn(move || {
            let r = (|| -> std::io::Result<std::net::TcpStream> {
                // SAFETY: setns on a namespace descriptor we own; this thread ends below.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let s = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    timeout,
                )?;
                s.set_nonblocking(true)?;
                Ok(s)
            })();
            let _ = tx.send(r);
        })
        .context("starting a thread")?;
    let std_stream = rx
        .await
        .map_err(|_| anyhow!("the connecting thread died"))?
        .with_context(|| format!("connecting to port {port} in the box"))?;
    Ok(tokio::net::TcpStream::from_std(std_stream)?)
}

/// The IPv4 addresses the hosts of `urls` resolve to, as /32 blocks
/// (the control plane's and the runner's own: never reachable from a box).
pub fn addresses_of(urls: &[String]) -> Vec<Ipv4Cidr> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for u in urls {
        let Ok(url) = url::Url::parse(u) else {
            continue;
        };
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match (host, port).to_socket_addrs() {
            Ok(addrs) => out.extend(addrs.filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Ipv4Cidr::new(v4, 32),
                std::net::IpAddr::V6(_) => None,
            })),
            Err(e) => tracing::warn!("resolving {host} for the box deny list: {e}"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The host's IPv4 routes and addresses, as CIDR blocks (every table).
pub fn host_networks() -> Result<Vec<Ipv4Cidr>> {
    let out = Command::new("ip")
        .args(["-j", "-4", "route", "show", "table", "all"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .context("running `ip route` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip route failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    #[derive(Deserialize)]
    struct Route {
        dst: String,
    }
    let routes: Vec<Route> =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j route`")?;
    Ok(routes
        .iter()
        .filter_map(|r| match r.dst.as_str() {
            "default" => None,
            d => d.parse().ok(),
        })
        .collect())
}

/// The first block of `pool` of `prefix` bits that overlaps none of `taken`.
pub fn pick_subnet(pool: Ipv4Cidr, prefix: u8, taken: &[Ipv4Cidr]) -> Option<Ipv4Cidr> {
    if prefix < pool.prefix() || prefix > 30 {
        return None;
    }
    let step = 1u64 << (32 - u32::from(prefix));
    (0..pool.size() / step)
        .filter_map(|i| pool.nth(i * step).and_then(|a| Ipv4Cidr::new(a, prefix)))
        .find(|c| !taken.iter().any(|t| t.overlaps(c)))
}

/// The first usable upstream resolver of the host: from systemd-resolved's
/// list of real upstreams when it runs, else `/etc/resolv.conf`; loopback
/// resolvers (a local stub) are unusable from a box and skipped.
pub fn host_resolver() -> Option<Ipv4Addr> {
    for f in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let found = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
            .find(|a| !a.is_loopback() && !a.is_unspecified());
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Enable IPv4 forwarding (egress boxes are routed through the host).
pub fn enable_forwarding() -> Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(p, "1").with_context(|| format!("enabling IPv4 forwarding ({p})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetPlan {
        NetPlan::new(
            Path::new("/var/lib/boxlite/runner"),
            "10.224.4.0/22".parse().unwrap(),
            Some("10.0.0.2".parse().unwrap()),
            &["203.0.113.10/32".parse().unwrap()],
        )
    }

    #[test]
    fn names_fit_the_kernel_and_differ_per_runner_and_box() {
        let p = plan();
        let a = p.host_iface(&uuid::Uuid::from_u128(1));
        let b = p.host_iface(&uuid::Uuid::from_u128(2));
        assert!(a.len() <= 15 && a != b, "{a} {b}");
        let other = NetPlan::new(Path::new("/elsewhere"), p.subnet, None, &[]);
        assert_ne!(other.table(), p.table());
        assert_ne!(other.group, p.group);
        assert!(p.group > 255);
    }

    #[test]
    fn addresses_skip_network_gateway_and_broadcast() {
        let p = plan();
        assert_eq!(p.gateway(), "10.224.4.1".parse::<Ipv4Addr>().unwrap());
        let mut used = BTreeSet::new();
        let first = p.allocate(&used).unwrap();
        assert_eq!(first, "10.224.4.2".parse::<Ipv4Addr>().unwrap());
        used.insert(first);
        assert_eq!(
            p.allocate(&used).unwrap(),
            "10.224.4.3".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(p.box_addresses().count(), 1021);
        assert_eq!(
            p.box_addresses().last().unwrap(),
            "10.224.7.254".parse::<Ipv4Addr>().unwrap()
        );
        let all: BTreeSet<Ipv4Addr> = p.box_addresses().collect();
        assert_eq!(p.allocate(&all), None);
    }

    #[test]
    fn subnets_avoid_the_hosts_networks() {
        let pool: Ipv4Cidr = SUBNET_POOL.parse().unwrap();
        let taken = vec![
            "10.224.0.0/24".parse().unwrap(),
            "10.224.4.5/32".parse().unwrap(),
            "0.0.0.0/0"
                .parse::<Ipv4Cidr>()
                .map(|_| "192.0.2.0/24".parse().unwrap())
                .unwrap(),
        ];
        assert_eq!(
            pick_subnet(pool, RUNNER_PREFIX, &taken),
            Some("10.224.8.0/22".parse().unwrap())
        );
        assert_eq!(pick_subnet(pool, 8, &taken), None);
        assert_eq!(pick_subnet(pool, RUNNER_PREFIX, &[pool]), None);
    }

    #[test]
    fn overlapping_blocks_are_folded_into_the_wider() {
        let v = normalize(vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
            "192.168.1.0/24".parse().unwrap(),
        ]);
        let s: Vec<String> = v.iter().map(|c| c.to_string()).collect();
        assert_eq!(s, ["10.0.0.0/8", "127.0.0.0/8", "192.168.1.0/24"]);
    }

    #[test]
    fn the_ruleset_denies_before_it_allows() {
        let p = plan();
        let box_ip: Ipv4Addr = "10.224.4.2".parse().unwrap();
        let text = p.ruleset(&[(box_ip, "10.1.0.0/16".parse().unwrap())]);
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing in\n{text}"))
        };
        let g = p.group;
        // The host itself, nothing but the DNS path, and spoofed sources.
        pos(&format!("iifgroup {g} drop"));
        pos(&format!("iifgroup {g} fib saddr . iif oif missing drop"));
        pos("dnat ip to 10.0.0.2:53");
        // Hard deny before the allow-list, private ranges after it, accept last.
        let hard = pos("ip daddr @hard_deny drop");
        let allow = pos("ip saddr . ip daddr @box_allow accept");
        let private = pos("ip daddr @private drop");
        let accept = pos(&format!("    iifgroup {g} accept"));
        assert!(
            hard < allow && allow < private && private < accept,
            "{text}"
        );
        assert!(pos(&format!("iifgroup {g} oifgroup {g} drop")) < accept);
        assert!(pos("meta nfproto ipv6 drop") < accept);
        for c in [
            "169.254.0.0/16",
            "127.0.0.0/8",
            SUBNET_POOL,
            "203.0.113.10/32",
        ] {
            let line = &text[pos("set hard_deny")..pos("set private")];
            assert!(line.contains(c), "{c} not hard-denied: {line}");
        }
        assert!(text.contains("10.224.4.2 . 10.1.0.0/16"));
        // Atomic replacement.
        assert!(text.starts_with("# boxlite-runner"));
        assert!(pos("delete table inet boxlite-") < pos("set hard_deny"));
        let add = p.allow_elements(true, box_ip, &["10.2.0.0/16".parse().unwrap()]);
        assert_eq!(
            add,
            format!(
                "add element inet {} box_allow {{ 10.224.4.2 . 10.2.0.0/16 }}\n",
                p.table()
            )
        );
        assert!(p.allow_elements(false, box_ip, &[]).is_empty());
    }

    #[test]
    fn nft_accepts_the_ruleset() {
        // Checked by the real nft (`-c`: parse and validate, change nothing).
        if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("-v").output().is_err() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let p = NetPlan::new(
            Path::new("/s"),
            "10.224.4.0/22".parse().unwrap(),
            Some("10.0.0.2".parse().unwrap()),
            &[
                "127.0.0.1/32".parse().unwrap(),
                "10.224.0.9/32".parse().unwrap(),
            ],
        );
        let b: Ipv4Addr = "10.224.4.2".parse().unwrap();
        for allow in [
            vec![],
            vec![
                (b, "10.1.0.0/16".parse().unwrap()),
                (b, "10.1.2.0/24".parse().unwrap()),
            ],
        ] {
            let text = p.ruleset(&allow);
            let mut child = Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn without_a_resolver_there_is_no_dns_path() {
        let p = NetPlan::new(Path::new("/s"), "10.224.0.0/22".parse().unwrap(), None, &[]);
        let text = p.ruleset(&[]);
        assert!(!text.contains("dnat"), "{text}");
        assert!(!text.contains("ct status dnat"), "{text}");
    }
}
