//! IPv4 network arithmetic for carving a stage's VPC into subnets.

use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 network: a base address with its host bits clear, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

impl Cidr {
    /// Parse `a.b.c.d/n`; the host bits must be zero.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, prefix) = s.split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        if prefix > 32 {
            return None;
        }
        let base = u32::from(ip);
        (base & !mask(prefix) == 0).then_some(Cidr { base, prefix })
    }

    /// Prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// Number of addresses.
    pub fn size(self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The `index`-th of the `2^bits` equal networks this one splits into.
    pub fn subnet(self, bits: u8, index: u32) -> Option<Cidr> {
        let prefix = self.prefix.checked_add(bits)?;
        if prefix > 32 || u64::from(index) >= 1u64 << bits {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        let base = u64::from(self.base) + u64::from(index) * step;
        Some(Cidr {
            base: u32::try_from(base).ok()?,
            prefix,
        })
    }

    /// The address `offset` places after the base, if it is inside the network.
    pub fn host(self, offset: u32) -> Option<Ipv4Addr> {
        (u64::from(offset) < self.size()).then(|| Ipv4Addr::from(self.base + offset))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// How a stage's VPC is divided: the first quarter holds the public subnets
/// (one per zone), the second the private ones (services, database), and the
/// last two quarters the runners of each zone, whose addresses are fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Public subnets, zone a and b.
    pub public: [Cidr; 2],
    /// Private subnets (services, database), zone a and b.
    pub private: [Cidr; 2],
    /// Runner subnets, zone a and b.
    pub runners: [Cidr; 2],
}

/// The first address AWS lets an instance use in a subnet (it keeps four).
pub const FIRST_HOST: u32 = 4;

impl Layout {
    /// Carve `vpc` (a /16 to /24) into the stage's subnets.
    pub fn carve(vpc: Cidr) -> Option<Layout> {
        if !(16..=24).contains(&vpc.prefix()) {
            return None;
        }
        let q = |i| vpc.subnet(2, i);
        let (pubq, privq) = (q(0)?, q(1)?);
        Some(Layout {
            public: [pubq.subnet(1, 0)?, pubq.subnet(1, 1)?],
            private: [privq.subnet(1, 0)?, privq.subnet(1, 1)?],
            runners: [q(2)?, q(3)?],
        })
    }

    /// Zone index (0 = a, 1 = b) and fixed private address of runner `n` (1-based):
    /// runners alternate zones, and each takes the next address of its zone's subnet.
    pub fn runner_address(&self, n: u32) -> Option<(usize, Ipv4Addr)> {
        let n = n.checked_sub(1)?;
        let zone = (n % 2) as usize;
        let slot = n / 2;
        let subnet = self.runners[zone];
        // The last address is the broadcast address, which AWS reserves too.
        let offset = FIRST_HOST + slot;
        (u64::from(offset) < subnet.size() - 1)
            .then(|| subnet.host(offset))
            .flatten()
            .map(|ip| (zone, ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_host_bits() {
        assert_eq!(
            Cidr::parse("10.42.0.0/16").unwrap().to_string(),
            "10.42.0.0/16"
        );
        assert!(Cidr::parse("10.42.0.1/16").is_none());
        assert!(Cidr::parse("10.42.0.0/33").is_none());
        assert!(Cidr::parse("10.42.0.0").is_none());
    }

    #[test]
    fn a_slash_16_is_carved_into_quarters_and_halves() {
        let l = Layout::carve(Cidr::parse("10.42.0.0/16").unwrap()).unwrap();
        let s = |c: [Cidr; 2]| [c[0].to_string(), c[1].to_string()];
        assert_eq!(s(l.public), ["10.42.0.0/19", "10.42.32.0/19"]);
        assert_eq!(s(l.private), ["10.42.64.0/19", "10.42.96.0/19"]);
        assert_eq!(s(l.runners), ["10.42.128.0/18", "10.42.192.0/18"]);
    }

    #[test]
    fn runners_alternate_zones_with_fixed_addresses() {
        let l = Layout::carve(Cidr::parse("10.42.0.0/16").unwrap()).unwrap();
        assert_eq!(
            l.runner_address(1),
            Some((0, "10.42.128.4".parse().unwrap()))
        );
        assert_eq!(
            l.runner_address(2),
            Some((1, "10.42.192.4".parse().unwrap()))
        );
        assert_eq!(
            l.runner_address(3),
            Some((0, "10.42.128.5".parse().unwrap()))
        );
        assert_eq!(l.runner_address(0), None);
    }

    #[test]
    fn the_smallest_vpc_still_holds_the_largest_runner_count() {
        let l = Layout::carve(Cidr::parse("10.0.0.0/24").unwrap()).unwrap();
        assert_eq!(l.runners[1].to_string(), "10.0.0.192/26");
        let (zone, ip) = l
            .runner_address(crate::model::defaults::MAX_RUNNERS)
            .unwrap();
        assert_eq!((zone, ip.to_string()), (1, "10.0.0.245".to_string()));
        assert!(l.runner_address(120).is_none());
        assert!(Layout::carve(Cidr::parse("10.0.0.0/25").unwrap()).is_none());
    }
}
