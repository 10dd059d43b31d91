//! The rtnetlink helpers against a real kernel, in a fresh namespace
//! (needs root): each change is visible to `ip`, and repeating or undoing
//! it is harmless.

use std::net::IpAddr;
use std::process::Command;

use gateway::netlink::{Net, REVERSE_TABLE};
use tests::netns::{available, block_on_in, unique, Netns};

fn ip(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn routes_rules_and_proxy_arp_are_applied_idempotently() {
    applied_and_removed(IpAddr::from([10, 1, 0, 10]));
}

#[test]
fn ipv6_routes_rules_and_proxy_ndp_are_applied_idempotently() {
    applied_and_removed("fd00:1::10".parse().expect("address"));
}

fn applied_and_removed(g: IpAddr) {
    assert!(available(), "needs root (network namespaces)");
    let v6 = g.is_ipv6();
    let fam = if v6 { "-6" } else { "-4" };
    let gs = g.to_string();
    let ns = Netns::new(unique("nl")).expect("netns");
    let (l1, l2) = (unique("x"), unique("y"));
    tests::netns::run(&[
        "ip", "-n", &ns.name, "link", "add", &l1, "type", "veth", "peer", "name", &l2,
    ])
    .expect("veth");
    ns.exec(&["ip", "link", "set", &l1, "up"]).expect("up");
    ns.exec(&["ip", "link", "set", &l2, "up"]).expect("up");
    let (a, b) = (l1.clone(), l2.clone());
    block_on_in(&ns.name, move || async move {
        let net = Net::connect().expect("netlink");
        for _ in 0..2 {
            net.add_host_route(g, &a, None).await.expect("route");
            net.add_default_route(&a, REVERSE_TABLE, v6)
                .await
                .expect("default");
            net.add_rule_from(g, &b, REVERSE_TABLE).await.expect("rule");
            net.add_proxy_neighbour(g, &b).await.expect("proxy");
        }
    })
    .expect("netns");
    let routes = ip(&ns, &[fam, "route"]);
    assert!(routes.contains(&format!("{gs} dev {l1}")), "{routes}");
    let table = REVERSE_TABLE.to_string();
    let reverse = ip(&ns, &[fam, "route", "show", "table", &table]);
    assert!(reverse.contains(&format!("default dev {l1}")), "{reverse}");
    let rules = ip(&ns, &[fam, "rule"]);
    assert!(
        rules.contains(&format!("from {gs} iif {l2} lookup {table}")),
        "{rules}"
    );
    let proxies = ip(&ns, &[fam, "neigh", "show", "proxy"]);
    assert!(proxies.contains(&format!("{gs} dev {l2}")), "{proxies}");

    let (a, b) = (l1.clone(), l2.clone());
    block_on_in(&ns.name, move || async move {
        let net = Net::connect().expect("netlink");
        for _ in 0..2 {
            net.del_host_route(g, &a, None).await.expect("del route");
            net.del_rule_from(g, &b, REVERSE_TABLE)
                .await
                .expect("del rule");
            net.del_proxy_neighbour(g, &b).await.expect("del proxy");
        }
    })
    .expect("netns");
    assert!(!ip(&ns, &[fam, "route"]).contains(&gs));
    assert!(!ip(&ns, &[fam, "rule"]).contains(&gs));
    assert!(!ip(&ns, &[fam, "neigh", "show", "proxy"]).contains(&gs));
}
