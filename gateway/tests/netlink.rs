//! The rtnetlink helpers against a real kernel, in a fresh namespace
//! (needs root): each change is visible to `ip`, and repeating or undoing
//! it is harmless.

use std::net::Ipv4Addr;
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
    assert!(available(), "needs root (network namespaces)");
    let ns = Netns::new(unique("nl")).expect("netns");
    let (l1, l2) = (unique("x"), unique("y"));
    tests::netns::run(&[
        "ip", "-n", &ns.name, "link", "add", &l1, "type", "veth", "peer", "name", &l2,
    ])
    .expect("veth");
    ns.exec(&["ip", "link", "set", &l1, "up"]).expect("up");
    ns.exec(&["ip", "link", "set", &l2, "up"]).expect("up");
    let g = Ipv4Addr::new(10, 1, 0, 10);
    let (a, b) = (l1.clone(), l2.clone());
    block_on_in(&ns.name, move || async move {
        let net = Net::connect().expect("netlink");
        for _ in 0..2 {
            net.add_host_route(g, &a, None).await.expect("route");
            net.add_default_route(&a, REVERSE_TABLE)
                .await
                .expect("default");
            net.add_rule_from(g, &b, REVERSE_TABLE).await.expect("rule");
            net.add_proxy_arp(g, &b).await.expect("proxy");
        }
    })
    .expect("netns");
    assert!(
        ip(&ns, &["route"]).contains(&format!("10.1.0.10 dev {l1}")),
        "{}",
        ip(&ns, &["route"])
    );
    let table = REVERSE_TABLE.to_string();
    assert!(ip(&ns, &["route", "show", "table", &table]).contains(&format!("default dev {l1}")));
    let rules = ip(&ns, &["rule"]);
    assert!(
        rules.contains(&format!("from 10.1.0.10 iif {l2} lookup {table}")),
        "{rules}"
    );
    let proxies = ip(&ns, &["neigh", "show", "proxy"]);
    assert!(
        proxies.contains(&format!("10.1.0.10 dev {l2}")),
        "{proxies}"
    );

    let (a, b) = (l1.clone(), l2.clone());
    block_on_in(&ns.name, move || async move {
        let net = Net::connect().expect("netlink");
        for _ in 0..2 {
            net.del_host_route(g, &a, None).await.expect("del route");
            net.del_rule_from(g, &b, REVERSE_TABLE)
                .await
                .expect("del rule");
            net.del_proxy_arp(g, &b).await.expect("del proxy");
        }
    })
    .expect("netns");
    assert!(!ip(&ns, &["route"]).contains("10.1.0.10"));
    assert!(!ip(&ns, &["rule"]).contains("10.1.0.10"));
    assert!(!ip(&ns, &["neigh", "show", "proxy"]).contains("10.1.0.10"));
}
