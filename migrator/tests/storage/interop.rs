//! Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against our server.

use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::*;

const MIB: u64 = 1024 * 1024;

fn regions() -> Vec<(u64, u64)> {
    vec![
        (0, 64 * 1024),
        (3 * MIB, 2 * MIB + 4096),
        (11 * MIB, 512 * 1024),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_img_info_and_convert_read_every_byte() {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().expect("tmp");
    let model = make_image(&dir.path().join("a.img"), 16 * MIB, &regions(), 1);
    let s = serve(&dir.path().join("a.img"), "a", dir.path().join("a.sock")).await;
    let info = tokio::task::spawn_blocking({
        let (q, u) = (qemu_img.clone(), uri(&s.sock));
        move || run(Command::new(q).args(["info", "--output=json", &u]))
    })
    .await
    .expect("join");
    let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img json");
    assert_eq!(v["virtual-size"], 16 * MIB);
    let out = dir.path().join("copy.raw");
    tokio::task::spawn_blocking({
        let (q, u, o) = (qemu_img, uri(&s.sock), out.clone());
        move || {
            run(Command::new(q)
                .args(["convert", "-f", "raw", "-O", "raw", &u])
                .arg(&o))
        }
    })
    .await
    .expect("join");
    assert_eq!(hash(&std::fs::read(&out).expect("read copy")), hash(&model));
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_io_writes_zeroes_discards_and_reads_back() {
    let qemu_io = tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("b.img");
    make_image(&path, 8 * MIB, &[(0, 8 * MIB)], 2);
    let s = serve(&path, "b", dir.path().join("b.sock")).await;
    let out = tokio::task::spawn_blocking({
        let u = uri(&s.sock);
        move || {
            run(Command::new(qemu_io).args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0xcd -f 1048577 511",
                "-c",
                "write -z 2M 128k",
                "-c",
                "discard 4M 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0xab 1M 1",
                "-c",
                "read -P 0xcd 1048577 511",
                "-c",
                "read -P 0 2M 128k",
                &u,
            ]))
        }
    })
    .await
    .expect("join");
    assert!(!out.contains("failed"), "qemu-io reported: {out}");
    let img = std::fs::read(&path).expect("read image");
    let m = MIB as usize;
    assert!(img[m..m + 1].iter().all(|&b| b == 0xab));
    assert!(img[m + 1..m + 512].iter().all(|&b| b == 0xcd));
    assert!(img[m + 512..m + 65536].iter().all(|&b| b == 0xab));
    assert!(img[2 * m..2 * m + 131072].iter().all(|&b| b == 0));
    assert!(img[4 * m..4 * m + 65536].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_reports_size_list_and_allocation_map() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.img");
    make_image(&path, 16 * MIB, &regions(), 3);
    let s = serve(&path, "c", dir.path().join("c.sock")).await;
    let u = uri(&s.sock);
    let (size, list, map) = tokio::task::spawn_blocking({
        let (n, u) = (nbdinfo.clone(), u.clone());
        move || {
            (
                run(Command::new(&n).args(["--size", &u])),
                run(Command::new(&n).args(["--list", &u])),
                run(Command::new(&n).args(["--map", "--json", &u])),
            )
        }
    })
    .await
    .expect("join");
    assert_eq!(size.trim(), (16 * MIB).to_string());
    assert!(
        list.contains("export=\"c\"") || list.contains("export: c") || list.contains("\"c\""),
        "{list}"
    );
    let map: serde_json::Value = serde_json::from_str(&map).expect("map json");
    let extents = map.as_array().expect("array");
    // Every byte is covered, and the data regions are reported as data.
    let mut pos = 0u64;
    let mut data = Vec::new();
    for e in extents {
        let (off, len, ty) = (
            e["offset"].as_u64().expect("o"),
            e["length"].as_u64().expect("l"),
            e["type"].as_u64().expect("t"),
        );
        assert_eq!(off, pos);
        pos += len;
        if ty == 0 {
            data.push((off, len));
        }
    }
    assert_eq!(pos, 16 * MIB);
    for (ro, rl) in regions() {
        assert!(
            data.iter().any(|&(o, l)| o <= ro && o + l >= ro + rl),
            "region {ro}+{rl} not data in {data:?}"
        );
    }
    let data_bytes: u64 = data.iter().map(|d| d.1).sum();
    assert!(
        data_bytes < 8 * MIB,
        "holes must be reported as holes: {data_bytes} data bytes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdcopy_copies_out_and_in_byte_for_byte() {
    let nbdcopy = tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("d.img");
    let model = make_image(&src, 16 * MIB, &regions(), 4);
    let s = serve(&src, "d", dir.path().join("d.sock")).await;
    let out = dir.path().join("out.raw");
    let dst = dir.path().join("e.img");
    make_image(&dst, 16 * MIB, &[(5 * MIB, MIB)], 5);
    let t = serve(&dst, "e", dir.path().join("e.sock")).await;
    tokio::task::spawn_blocking({
        let (n, u, o, ut) = (nbdcopy, uri(&s.sock), out.clone(), uri(&t.sock));
        move || {
            run(Command::new(&n).arg(&u).arg(&o));
            // Into an NBD target: multi-conn, zeroing and all.
            run(Command::new(&n).arg(&o).arg(&ut));
        }
    })
    .await
    .expect("join");
    assert_eq!(hash(&std::fs::read(&out).expect("read")), hash(&model));
    assert_eq!(hash(&std::fs::read(&dst).expect("read")), hash(&model));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_requests_get_errors_and_the_connection_survives() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("f.img");
    make_image(&path, MIB, &[(0, 4096)], 6);
    let s = serve(&path, "f", dir.path().join("f.sock")).await;
    let mut c = client(&s.sock).await;
    let mut buf = vec![0u8; 4096];
    let e = c.read(MIB - 10, &mut buf).await.expect_err("read past end");
    assert!(e.to_string().contains("error 22"), "{e}");
    let e = c
        .write(MIB, &[1, 2, 3], false)
        .await
        .expect_err("write past end");
    assert!(e.to_string().contains("error 28"), "{e}");
    c.read(0, &mut buf).await.expect("connection still usable");
    let before = hash(&std::fs::read(&path).expect("read"));
    c.disconnect().await.expect("disc");
    assert_eq!(hash(&std::fs::read(&path).expect("read")), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_handshakes_are_closed_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("g.img");
    make_image(&path, MIB, &[(0, 4096)], 7);
    let s = serve(&path, "g", dir.path().join("g.sock")).await;
    for garbage in [
        vec![0u8, 0, 0, 0], // not fixed newstyle
        vec![0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 7, 0, 0, 0, 0], // bad option magic
        {
            // IHAVEOPT with a 1 GiB option length.
            let mut v = vec![0, 0, 0, 3];
            v.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            v.extend_from_slice(&7u32.to_be_bytes());
            v.extend_from_slice(&(1u32 << 30).to_be_bytes());
            v
        },
    ] {
        let mut st = UnixStream::connect(&s.sock).await.expect("connect");
        let mut greeting = [0u8; 18];
        st.read_exact(&mut greeting).await.expect("greeting");
        st.write_all(&garbage).await.expect("send");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), st.read_to_end(&mut rest))
            .await
            .expect("server must close the connection")
            .expect("read");
        assert_eq!(n, 0, "no reply to a malformed handshake: {rest:?}");
    }
    // An unknown option gets NBD_REP_ERR_UNSUP and negotiation continues.
    let mut st = UnixStream::connect(&s.sock).await.expect("connect");
    let mut greeting = [0u8; 18];
    st.read_exact(&mut greeting).await.expect("greeting");
    let mut v = vec![0, 0, 0, 3];
    v.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    v.extend_from_slice(&999u32.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    st.write_all(&v).await.expect("send");
    let mut reply = [0u8; 20];
    st.read_exact(&mut reply).await.expect("reply");
    assert_eq!(
        u32::from_be_bytes([reply[12], reply[13], reply[14], reply[15]]),
        (1 << 31) + 1
    );
    let mut c = client(&s.sock).await;
    let mut buf = [0u8; 16];
    c.read(0, &mut buf).await.expect("server still serves");
}
