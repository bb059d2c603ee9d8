//! An engine's network for a VM. The engine gives the container a network namespace it set
//! up: containerd's CRI and Podman name it by path (CNI, netavark), Docker's libnetwork
//! connects the namespace of the container's `state.pid` from its prestart hook. Its interface
//! (the one the default route leaves by, else the first with an address) is read there with
//! iproute2's JSON output, a tap is made beside it and tc mirrors every frame between the two
//! (each one's ingress redirected to the other's egress), as Kata Containers' "tcfilter" model
//! does. The VMM runs in that namespace and opens the tap; the VM's device takes the
//! interface's hardware address, and the agent gives it the interface's MTU, addresses and
//! routes.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use husk_hypervisor::NetDevice;
use husk_protocol::{IpPrefix, Network, Route};
use serde_json::Value;
use tracing::{debug, warn};

use crate::SandboxError;

/// The tap's name in the network namespace.
const TAP: &str = "husk0";

/// An engine's interface wired to a tap.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// What the VMM opens.
    pub device: NetDevice,
    /// What the agent configures.
    pub network: Network,
    /// The engine's interface in the namespace.
    interface: String,
}

impl PodNetwork {
    /// Reads the interface in `netns` and wires a new tap to it; `None` when the namespace
    /// has no interface with an address (nothing to carry).
    ///
    /// # Errors
    /// [`SandboxError::PodNetwork`]: iproute2 or tc fail, or their output is not understood.
    pub fn wire(netns: &Path) -> Result<Option<Self>, SandboxError> {
        if same_file(netns, Path::new("/proc/self/ns/net")) {
            // The host's own network (`--with-ns network:/proc/1/ns/net`): never mirrored.
            warn!(netns = %netns.display(), "the network namespace is the host's: not wired to the VM");
            return Ok(None);
        }
        let Some((interface, network)) = read(netns)? else {
            return Ok(None);
        };
        make_tap(netns)?;
        Self::mirror(netns, interface, network).map(Some)
    }

    /// Mirrors `interface` (carrying `network`) in `netns` to the tap made there.
    fn mirror(netns: &Path, interface: String, network: Network) -> Result<Self, SandboxError> {
        let pod = Self {
            device: NetDevice {
                netns: netns.to_owned(),
                tap: TAP.to_owned(),
                mac: network.mac.clone(),
                mtu: u16::try_from(network.mtu).ok(),
            },
            network,
            interface,
        };
        let mtu = pod.network.mtu.to_string();
        let redirect = |from: &str, to: &str| {
            let filter = [
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ];
            run(netns, "tc", &filter)
        };
        let wired = run(netns, "ip", &["link", "set", TAP, "mtu", &mtu, "up"])
            .and_then(|()| {
                run(
                    netns,
                    "tc",
                    &["qdisc", "add", "dev", &pod.interface, "ingress"],
                )
            })
            .and_then(|()| redirect(&pod.interface, TAP))
            .and_then(|()| run(netns, "tc", &["qdisc", "add", "dev", TAP, "ingress"]))
            .and_then(|()| redirect(TAP, &pod.interface));
        if let Err(e) = wired {
            pod.unwire();
            return Err(e);
        }
        debug!(netns = %netns.display(), interface = %pod.interface, network = ?pod.network, "network wired");
        Ok(pod)
    }

    /// Removes the tap and the interface's mirroring (best effort: the namespace may be gone).
    pub fn unwire(&self) {
        unwire(&self.device.netns, Some(&self.interface));
    }
}

/// The network of a container's own VM, from its engine.
#[derive(Debug)]
pub enum VmNetwork {
    /// The engine made and connected the namespace before `create` and named it (Podman):
    /// wired at once.
    Given(PodNetwork),
    /// The engine's hooks connect the namespace of the container's `state.pid` (Docker's
    /// libnetwork): husk makes that namespace (in the run directory) and the tap the VMM
    /// opens, and wires what the hooks put there after they ran.
    Hooked {
        /// The tap the VMM opens, in husk's namespace.
        device: NetDevice,
        /// What the hooks connected, once wired.
        wired: Option<PodNetwork>,
    },
}

impl VmNetwork {
    /// The network of `bundle`'s VM, whose run directory is `run_dir`: `None` when the
    /// container has none from an engine.
    ///
    /// # Errors
    /// [`SandboxError::PodNetwork`]: the namespace or the tap cannot be made; nothing is left.
    pub fn prepare(
        bundle: &crate::bundle::Bundle,
        run_dir: &Path,
    ) -> Result<Option<Self>, SandboxError> {
        if let Some(netns) = &bundle.pod_netns {
            return Ok(PodNetwork::wire(netns)?.map(Self::Given));
        }
        if !bundle.hooked_network {
            return Ok(None);
        }
        let netns = crate::state_dir::netns_path(run_dir);
        make_netns(&netns)?;
        if let Err(e) = make_tap(&netns) {
            remove_netns(&netns);
            return Err(e);
        }
        Ok(Some(Self::Hooked {
            device: NetDevice {
                netns,
                tap: TAP.to_owned(),
                mac: local_mac(),
                mtu: None,
            },
            wired: None,
        }))
    }

    /// The device the VMM opens.
    #[must_use]
    pub fn device(&self) -> NetDevice {
        match self {
            Self::Given(pod) => pod.device.clone(),
            Self::Hooked { device, .. } => device.clone(),
        }
    }

    /// After the hooks ran: the network the agent gives the VM's device, `None` when the
    /// engine connected nothing (Docker's `--network none`).
    ///
    /// # Errors
    /// [`SandboxError::PodNetwork`]: what the hooks made cannot be read or wired.
    pub fn connect(&mut self) -> Result<Option<Network>, SandboxError> {
        match self {
            Self::Given(pod) => Ok(Some(pod.network.clone())),
            Self::Hooked { device, wired } => {
                if wired.is_none() {
                    let Some((interface, network)) = read(&device.netns)? else {
                        return Ok(None);
                    };
                    *wired = Some(PodNetwork::mirror(&device.netns, interface, network)?);
                }
                Ok(wired.as_ref().map(|w| w.network.clone()))
            }
        }
    }

    /// Undoes what [`VmNetwork::prepare`] and [`VmNetwork::connect`] made (best effort).
    fn remove(&self) {
        match self {
            Self::Given(pod) => pod.unwire(),
            Self::Hooked { device, wired } => {
                match wired {
                    Some(pod) => pod.unwire(),
                    None => unwire(&device.netns, None),
                }
                remove_netns(&device.netns);
            }
        }
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes the tap in `netns` and the ingress mirroring of `interface`.
fn unwire(netns: &Path, interface: Option<&str>) {
    let qdisc = interface.map(|i| ["qdisc", "del", "dev", i, "ingress"]);
    let undo = qdisc
        .iter()
        .map(|args| ("tc", &args[..]))
        .chain(std::iter::once(("ip", &["link", "del", "dev", TAP][..])));
    for (tool, args) in undo {
        if let Err(e) = run(netns, tool, args) {
            debug!(error = %e, "network unwire");
        }
    }
}

/// The interface of `netns` worth carrying and its network.
fn read(netns: &Path) -> Result<Option<(String, Network)>, SandboxError> {
    let links = ip_json(netns, &["-j", "address", "show"])?;
    let routes = ip_json(netns, &["-j", "route", "show"])?;
    interface(&links, &routes)
}

/// Makes the tap the VMM opens in `netns`.
fn make_tap(netns: &Path) -> Result<(), SandboxError> {
    run(netns, "ip", &["tuntap", "add", "dev", TAP, "mode", "tap"])
}

/// Makes a new network namespace and keeps it at `path` (a bind mount of its nsfs file).
fn make_netns(path: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |what: &str, e: &dyn std::fmt::Display| {
        SandboxError::PodNetwork(format!("{what} {}: {e}", path.display()))
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err("create", &e))?;
    let target = path.to_owned();
    // unshare(2) moves only the calling thread: a thread of its own, gone once it is kept.
    let made = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .map_err(|_| err("make namespace", &"thread panicked"))
    .and_then(|r| r.map_err(|e| err("make namespace", &e)));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Removes a namespace [`make_netns`] kept (it ends with its last user).
pub(crate) fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// A random locally administered unicast hardware address (the VM's device until the agent
/// gives it the engine's interface's).
fn local_mac() -> String {
    use std::io::Read;
    let mut b = [0u8; 6];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        warn!(error = %e, "no random hardware address: a fixed one");
        b = [0, 0x16, 0x3e, 0, 0, 1];
    }
    b[0] = (b[0] & 0xfc) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `a` and `b` are the same file (namespace files: the same namespace).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `nsenter --net=<netns> <tool> <args>`, its stdout.
fn output(netns: &Path, tool: &str, args: &[&str]) -> Result<Vec<u8>, SandboxError> {
    let mut ns = std::ffi::OsString::from("--net=");
    ns.push(netns);
    let out = Command::new("nsenter")
        .arg(ns)
        .arg("--")
        .arg(tool)
        .args(args)
        .output()
        .map_err(|e| SandboxError::PodNetwork(format!("nsenter {tool}: {e}")))?;
    if !out.status.success() {
        return Err(SandboxError::PodNetwork(format!(
            "{tool} {} in {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn run(netns: &Path, tool: &str, args: &[&str]) -> Result<(), SandboxError> {
    output(netns, tool, args).map(drop)
}

fn ip_json(netns: &Path, args: &[&str]) -> Result<Value, SandboxError> {
    let out = output(netns, "ip", args)?;
    serde_json::from_slice(&out)
        .map_err(|e| SandboxError::PodNetwork(format!("ip {}: {e}", args.join(" "))))
}

/// The pod's interface and its network, from `ip -j address` and `ip -j route` (IPv4
/// routes; global addresses of both families).
fn interface(links: &Value, routes: &Value) -> Result<Option<(String, Network)>, SandboxError> {
    let bad = |what: &str| SandboxError::PodNetwork(format!("unexpected ip output: {what}"));
    let links = links.as_array().ok_or_else(|| bad("address list"))?;
    let routes = routes.as_array().ok_or_else(|| bad("route list"))?;
    let addresses = |link: &Value| -> Vec<IpPrefix> {
        link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"] == "global")
            .filter_map(|a| {
                Some(IpPrefix {
                    address: a["local"].as_str()?.parse().ok()?,
                    prefix: u8::try_from(a["prefixlen"].as_u64()?).ok()?,
                })
            })
            .collect()
    };
    let default_dev = routes
        .iter()
        .find(|r| r["dst"] == "default")
        .and_then(|r| r["dev"].as_str());
    // Interfaces with an address: the default route's, else the first.
    let candidates: Vec<(&Value, Vec<IpPrefix>)> = links
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .map(|l| (l, addresses(l)))
        .filter(|(_, a)| !a.is_empty())
        .collect();
    let chosen = candidates
        .iter()
        .find(|(l, _)| default_dev.is_some() && l["ifname"].as_str() == default_dev)
        .or(candidates.first());
    let Some((link, link_addresses)) = chosen else {
        return Ok(None);
    };
    let name = link["ifname"]
        .as_str()
        .ok_or_else(|| bad("ifname"))?
        .to_owned();
    let mac = link["address"]
        .as_str()
        .ok_or_else(|| bad("address"))?
        .to_owned();
    let mtu = link["mtu"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| bad("mtu"))?;
    let mut pod_routes: Vec<Route> = Vec::new();
    for r in routes
        .iter()
        .filter(|r| r["dev"].as_str() == Some(name.as_str()))
    {
        let gateway = r["gateway"].as_str().and_then(|g| g.parse::<IpAddr>().ok());
        let destination = match r["dst"].as_str() {
            Some("default") => None,
            Some(dst) => Some(parse_prefix(dst).ok_or_else(|| bad("route destination"))?),
            None => continue,
        };
        // The kernel makes the prefix routes of the addresses itself.
        if gateway.is_none() && r["protocol"] == "kernel" {
            continue;
        }
        pod_routes.push(Route {
            destination,
            gateway,
        });
    }
    // Link routes first (a gateway must be reachable), the default route last.
    pod_routes.sort_by_key(|r| (r.gateway.is_some(), r.destination.is_none()));
    let network = Network {
        mac,
        mtu,
        addresses: link_addresses.clone(),
        routes: pod_routes,
    };
    if let Err(e) = network.validate() {
        warn!(error = %e, "pod network not understood");
        return Err(SandboxError::PodNetwork(e));
    }
    Ok(Some((name, network)))
}

/// `a.b.c.d/n` or a bare address (a host route).
fn parse_prefix(s: &str) -> Option<IpPrefix> {
    let (address, prefix) = match s.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse().ok()?),
        None => {
            let a = s.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    Some(IpPrefix { address, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ip -j address show` and `ip -j route show` print in a pod namespace made by the
    /// CNI ptp plugin.
    #[test]
    fn test_interface_from_ptp_pod_namespace() {
        let links: Value = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"address":"00:00:00:00:00:00",
                 "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
                {"ifindex":3,"ifname":"eth0","mtu":1500,"address":"0a:58:0a:fe:4d:02",
                 "addr_info":[{"family":"inet","local":"10.254.77.2","prefixlen":24,"scope":"global"},
                              {"family":"inet6","local":"fe80::858:aff:fefe:4d02","prefixlen":64,"scope":"link"}]}]"#,
        )
        .unwrap();
        let routes: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.254.77.1","dev":"eth0","flags":[]},
                {"dst":"10.254.77.0/24","gateway":"10.254.77.1","dev":"eth0","protocol":"kernel","prefsrc":"10.254.77.2","flags":[]},
                {"dst":"10.254.77.1","dev":"eth0","scope":"link","flags":[]}]"#,
        )
        .unwrap();
        let (name, network) = interface(&links, &routes).unwrap().unwrap();
        assert_eq!(name, "eth0");
        assert_eq!(network.mac, "0a:58:0a:fe:4d:02");
        assert_eq!(network.mtu, 1500);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            network.addresses,
            [IpPrefix {
                address: ip("10.254.77.2"),
                prefix: 24
            }]
        );
        assert_eq!(
            network.routes,
            [
                Route {
                    destination: Some(IpPrefix {
                        address: ip("10.254.77.1"),
                        prefix: 32
                    }),
                    gateway: None
                },
                Route {
                    destination: Some(IpPrefix {
                        address: ip("10.254.77.0"),
                        prefix: 24
                    }),
                    gateway: Some(ip("10.254.77.1"))
                },
                Route {
                    destination: None,
                    gateway: Some(ip("10.254.77.1"))
                },
            ]
        );
    }

    #[test]
    fn test_interface_none_without_addresses() {
        let links: Value = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"address":"00:00:00:00:00:00","addr_info":[]}]"#,
        )
        .unwrap();
        assert!(interface(&links, &Value::Array(Vec::new()))
            .unwrap()
            .is_none());
    }
}
