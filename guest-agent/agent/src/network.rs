//! The pod's network: the VM's virtio-net device gets what the host found on the pod's
//! interface (hardware address, MTU, addresses, routes), through rtnetlink in the agent's own
//! network namespace, which a pod's containers share (the host mirrors the pod interface's
//! traffic to the device).

use std::net::IpAddr;

use futures::TryStreamExt;
use husk_protocol::{ErrorKind, Network};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteScope;
use rtnetlink::Handle;

use crate::container::Failure;

/// Configures the device whose hardware address is `network.mac`.
pub async fn configure(network: &Network) -> Result<(), Failure> {
    network
        .validate()
        .map_err(|e| (ErrorKind::InvalidRequest, e))?;
    let mac = network
        .mac_bytes()
        .map_err(|e| (ErrorKind::InvalidRequest, e))?;
    crate::sys::loopback_up().map_err(|e| failed("loopback up", &e))?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| failed("netlink", &e))?;
    let connection = tokio::spawn(connection);
    let result = apply(&handle, network, mac).await;
    connection.abort();
    result
}

async fn apply(handle: &Handle, network: &Network, mac: [u8; 6]) -> Result<(), Failure> {
    let index = device_with(handle, mac).await?;
    handle
        .link()
        .set(index)
        .mtu(network.mtu)
        .up()
        .execute()
        .await
        .map_err(|e| failed("set the device up", &e))?;
    for a in &network.addresses {
        handle
            .address()
            .add(index, a.address, a.prefix)
            .execute()
            .await
            .map_err(|e| failed(&format!("add address {}/{}", a.address, a.prefix), &e))?;
    }
    for r in &network.routes {
        let what = format!(
            "add route to {} via {}",
            r.destination.map_or("default".to_owned(), |d| format!(
                "{}/{}",
                d.address, d.prefix
            )),
            r.gateway.map_or("the link".to_owned(), |g| g.to_string())
        );
        let family = r
            .destination
            .map(|d| d.address)
            .or(r.gateway)
            .unwrap_or(IpAddr::from([0u8; 4]));
        let request = handle.route().add().output_interface(index);
        let request = match r.gateway {
            None => request.scope(RouteScope::Link),
            Some(_) => request,
        };
        let added = match family {
            IpAddr::V4(_) => {
                let mut v4 = request.v4();
                if let Some(d) = r.destination {
                    if let IpAddr::V4(a) = d.address {
                        v4 = v4.destination_prefix(a, d.prefix);
                    }
                }
                if let Some(IpAddr::V4(g)) = r.gateway {
                    v4 = v4.gateway(g);
                }
                // Replacing: the address's own prefix route may be one CNI changed.
                v4.replace().execute().await
            }
            IpAddr::V6(_) => {
                let mut v6 = request.v6();
                if let Some(d) = r.destination {
                    if let IpAddr::V6(a) = d.address {
                        v6 = v6.destination_prefix(a, d.prefix);
                    }
                }
                if let Some(IpAddr::V6(g)) = r.gateway {
                    v6 = v6.gateway(g);
                }
                v6.replace().execute().await
            }
        };
        added.map_err(|e| failed(&what, &e))?;
    }
    Ok(())
}

/// The index of the VM's device for `mac`: the link with that hardware address (the VMM gave
/// the engine interface's to the device), else the VM's only Ethernet device, which takes it
/// (the device was made before the engine's hooks connected the interface).
async fn device_with(handle: &Handle, mac: [u8; 6]) -> Result<u32, Failure> {
    let mut links = handle.link().get().execute();
    let mut ethernet = Vec::new();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| failed("list links", &e))?
    {
        let address = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.as_slice()),
            _ => None,
        });
        match address {
            Some(m) if m == mac => return Ok(link.header.index),
            Some(m) if m.len() == 6 && m.iter().any(|b| *b != 0) => {
                ethernet.push(link.header.index);
            }
            _ => {}
        }
    }
    let [index] = ethernet[..] else {
        return Err((
            ErrorKind::InvalidRequest,
            format!(
                "network: no device with hardware address {} among {} devices",
                mac.map(|b| format!("{b:02x}")).join(":"),
                ethernet.len()
            ),
        ));
    };
    handle
        .link()
        .set(index)
        .address(mac.to_vec())
        .execute()
        .await
        .map_err(|e| failed("set the hardware address", &e))?;
    Ok(index)
}

fn failed(what: &str, e: &dyn std::fmt::Display) -> Failure {
    (ErrorKind::Internal, format!("network: {what}: {e}"))
}
