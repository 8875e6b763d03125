//! Box networking on the wire: the mode a box asks for and IPv4 CIDR blocks.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a box reaches the network. Every box has a network namespace of its
/// own whatever the mode; nothing of the host is reachable from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetworkMode {
    /// Loopback only (the default).
    #[default]
    None,
    /// Outbound IPv4 through the runner's NAT, minus the runner's deny list
    /// (host, link-local, private ranges, other boxes), plus the box's own
    /// allow-list within the stage's.
    Egress,
}

impl NetworkMode {
    /// The API's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
        }
    }

    /// True for [`NetworkMode::Egress`].
    pub fn is_egress(self) -> bool {
        self == NetworkMode::Egress
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetworkMode::None),
            "egress" => Ok(NetworkMode::Egress),
            other => Err(format!(
                "unknown network mode {other:?} (expected \"none\" or \"egress\")"
            )),
        }
    }
}

impl Serialize for NetworkMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for NetworkMode {
    /// `"none"`, `"egress"`, or the older booleans (`true` = egress, `false` = none).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(true) => Ok(NetworkMode::Egress),
            Raw::Flag(false) => Ok(NetworkMode::None),
            Raw::Name(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An IPv4 network, `a.b.c.d/n`, always in canonical form (no host bits set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network of `addr` with `prefix` bits; `None` when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Cidr> {
        (prefix <= 32).then(|| Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// First address.
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Last address.
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    /// True when `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// True when every address of `other` is inside.
    pub fn covers(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// True when the two share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The `n`-th address (0 = the network address); `None` past the end.
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    /// `a.b.c.d/n` with no host bits set, or a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => {
                let p: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
                (ip, p)
            }
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR block"))?;
        let c = Ipv4Cidr::new(addr, prefix).expect("prefix checked");
        if c.addr != addr {
            return Err(format!("{s:?} has host bits set (the network is {c})"));
        }
        Ok(c)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The CIDR blocks of `wanted` not covered by any block of `ceiling`.
pub fn outside_of(wanted: &[Ipv4Cidr], ceiling: &[Ipv4Cidr]) -> Vec<Ipv4Cidr> {
    wanted
        .iter()
        .filter(|w| !ceiling.iter().any(|c| c.covers(w)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_names_and_the_old_booleans() {
        let m: NetworkMode = serde_json::from_str("\"egress\"").unwrap();
        assert_eq!(m, NetworkMode::Egress);
        assert_eq!(
            serde_json::from_str::<NetworkMode>("true").unwrap(),
            NetworkMode::Egress
        );
        assert_eq!(
            serde_json::from_str::<NetworkMode>("false").unwrap(),
            NetworkMode::None
        );
        assert_eq!(
            serde_json::to_string(&NetworkMode::None).unwrap(),
            "\"none\""
        );
        let e = serde_json::from_str::<NetworkMode>("\"host\"").unwrap_err();
        assert!(e.to_string().contains("unknown network mode"), "{e}");
    }

    #[test]
    fn cidrs_parse_canonically_and_compare() {
        let c: Ipv4Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.0".parse().unwrap()));
        assert_eq!(c.last(), "10.1.255.255".parse::<Ipv4Addr>().unwrap());
        let host: Ipv4Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(host.prefix(), 32);
        assert!(c.covers(&host) && !host.covers(&c) && host.overlaps(&c));
        assert!(
            "10.1.0.1/16"
                .parse::<Ipv4Cidr>()
                .unwrap_err()
                .contains("host bits")
        );
        assert!("10.1.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/8".parse::<Ipv4Cidr>().is_err());
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.covers(&c));
        assert_eq!(
            outside_of(
                &[c, "192.168.1.0/24".parse().unwrap()],
                &["10.0.0.0/8".parse().unwrap()]
            ),
            vec!["192.168.1.0/24".parse::<Ipv4Cidr>().unwrap()]
        );
    }
}
