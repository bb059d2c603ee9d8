//! A pod's network as the host found it in the pod's network namespace (CNI's work): the
//! interface the VM's virtio-net device stands in for, with its addresses and routes. The host
//! mirrors that interface's traffic to the device; the agent gives the device the same
//! hardware address, MTU, addresses and routes (version 5).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Most addresses and routes one interface may bring.
const MAX_ADDRESSES: usize = 16;
const MAX_ROUTES: usize = 64;

/// The pod's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Hardware address, `aa:bb:cc:dd:ee:ff`: the guest finds its device by it.
    pub mac: String,
    /// MTU (68..=65535).
    pub mtu: u32,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<IpPrefix>,
    /// Routes through the interface, in the order they are added (one whose gateway needs a
    /// link route comes after it).
    pub routes: Vec<Route>,
}

/// An address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    /// The address.
    pub address: IpAddr,
    /// Prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
}

/// A route through the pod's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Where to; `None` is the default route.
    pub destination: Option<IpPrefix>,
    /// Via; `None` for a destination on the link.
    pub gateway: Option<IpAddr>,
}

impl IpPrefix {
    fn validate(&self) -> Result<(), String> {
        let max = if self.address.is_ipv4() { 32 } else { 128 };
        match self.prefix <= max {
            true => Ok(()),
            false => Err(format!(
                "prefix /{} of {} is too long",
                self.prefix, self.address
            )),
        }
    }
}

impl Network {
    /// The hardware address as bytes.
    ///
    /// # Errors
    /// `mac` is not six `:`-separated hex bytes.
    pub fn mac_bytes(&self) -> Result<[u8; 6], String> {
        let mut bytes = [0u8; 6];
        let mut parts = self.mac.split(':');
        for byte in &mut bytes {
            *byte = parts
                .next()
                .filter(|p| p.len() == 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("network: bad hardware address {:?}", self.mac))?;
        }
        match parts.next() {
            None => Ok(bytes),
            Some(_) => Err(format!("network: bad hardware address {:?}", self.mac)),
        }
    }

    /// Checks every field (the guest never trusts the host's values blindly either).
    ///
    /// # Errors
    /// The first field that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        self.mac_bytes()?;
        if !(68..=65535).contains(&self.mtu) {
            return Err(format!("network: MTU {} is out of 68..=65535", self.mtu));
        }
        if self.addresses.len() > MAX_ADDRESSES || self.routes.len() > MAX_ROUTES {
            return Err(format!(
                "network: at most {MAX_ADDRESSES} addresses and {MAX_ROUTES} routes"
            ));
        }
        for a in &self.addresses {
            a.validate().map_err(|e| format!("network: {e}"))?;
        }
        for r in &self.routes {
            if let Some(d) = &r.destination {
                d.validate().map_err(|e| format!("network: {e}"))?;
            }
            let family = |a: &IpAddr| a.is_ipv4();
            if let (Some(d), Some(g)) = (&r.destination, &r.gateway) {
                if family(&d.address) != family(g) {
                    return Err(format!(
                        "network: route to {}/{} via {g} mixes address families",
                        d.address, d.prefix
                    ));
                }
            }
            if r.destination.is_none() && r.gateway.is_none() {
                return Err("network: a default route needs a gateway".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> Network {
        Network {
            mac: "0a:58:0a:fe:4d:02".into(),
            mtu: 1500,
            addresses: vec![IpPrefix {
                address: "10.254.77.2".parse().unwrap(),
                prefix: 24,
            }],
            routes: vec![
                Route {
                    destination: Some(IpPrefix {
                        address: "10.254.77.1".parse().unwrap(),
                        prefix: 32,
                    }),
                    gateway: None,
                },
                Route {
                    destination: None,
                    gateway: Some("10.254.77.1".parse().unwrap()),
                },
            ],
        }
    }

    #[test]
    fn test_network_validate_accepts_a_cni_interface() {
        let n = network();
        assert_eq!(n.validate(), Ok(()));
        assert_eq!(n.mac_bytes().unwrap(), [0x0a, 0x58, 0x0a, 0xfe, 0x4d, 0x02]);
    }

    #[test]
    fn test_network_validate_refuses_bad_fields() {
        for bad in [
            Network {
                mac: "0a:58:0a:fe:4d".into(),
                ..network()
            },
            Network {
                mac: "0a:58:0a:fe:4d:02:ff".into(),
                ..network()
            },
            Network {
                mtu: 10,
                ..network()
            },
            Network {
                addresses: vec![IpPrefix {
                    address: "10.0.0.1".parse().unwrap(),
                    prefix: 33,
                }],
                ..network()
            },
            Network {
                routes: vec![Route {
                    destination: None,
                    gateway: None,
                }],
                ..network()
            },
            Network {
                routes: vec![Route {
                    destination: Some(IpPrefix {
                        address: "fd00::".parse().unwrap(),
                        prefix: 8,
                    }),
                    gateway: Some("10.0.0.1".parse().unwrap()),
                }],
                ..network()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
