//! The gateway daemon serves its `[dns]` zones: dig answers, a signed update
//! from our client lands, and SIGTERM stops it.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use dyndns::client::Client;
use dyndns::{ops, TsigKey};

#[tokio::test]
async fn gateway_serves_and_updates_its_embedded_zone() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("example.test.zone"),
        "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns1 hostmaster ( 1 3600 600 86400 60 )\n  IN NS ns1\nns1 IN A 127.0.0.1\nweb IN A 10.1.0.10\n",
    )
    .expect("zone");
    let key = TsigKey::generate("mig-key").expect("key");
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "site = \"siteA\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[[dns.key]]\nname = \"mig-key\"\nsecret = \"{}\"\n[[dns.zone]]\norigin = \"example.test.\"\nfile = \"example.test.zone\"\n",
            key.secret_base64()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    let addr: SocketAddr = first
        .strip_prefix("dns listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .expect("addr");

    let dig = Command::new("dig")
        .args([
            &format!("@{}", addr.ip()),
            "-p",
            &addr.port().to_string(),
            "web.example.test.",
            "A",
            "+short",
        ])
        .output()
        .expect("dig (install bind9-dnsutils: sudo bash tests/install-deps.sh)");
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), "10.1.0.10");

    let client = Client::new(addr, Some(&key)).expect("client");
    let zone = ops::parse_name("example.test.").expect("zone");
    let web = ops::parse_name("web.example.test.").expect("name");
    let to = ["10.2.0.10".parse().expect("ip")];
    ops::switch(
        &client,
        &zone,
        &web,
        &["10.1.0.10".parse().expect("ip")],
        &to,
        5,
    )
    .await
    .expect("switch through the gateway's DNS");
    assert_eq!(
        ops::addresses(&client, &web).await.expect("read").ips(),
        to.to_vec()
    );

    // SIGTERM: a clean stop
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let status = child.wait().expect("wait");
    assert!(status.success(), "gateway exited with {status}");
}
