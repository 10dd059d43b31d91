use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use migrator::agent::{Agent, AgentOptions};
use migrator::disk::Disk;
use migrator::image::Image;
use migrator::nbd::client::Client;
use migrator::nbd::server::serve_unix;
use migrator::transport::tls::Identity;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::oneshot;

/// Path of an external tool; fails the test with the install hint if missing.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package} (bash .ci/run does)");
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn tool");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A sparse image of `size` bytes with random data in `regions`; returns its
/// full content (the model).
pub fn make_image(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let img = Image::create(path, size).expect("create image");
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(seed);
    for &(off, len) in regions {
        let buf = &mut model[off as usize..(off + len) as usize];
        rng.fill_bytes(buf);
        img.write_at(buf, off).expect("fill image");
    }
    model
}

pub struct Served {
    pub disk: Arc<Disk>,
    pub sock: PathBuf,
    _stop: oneshot::Sender<()>,
}

pub async fn serve(image: &Path, name: &str, sock: PathBuf) -> Served {
    let disk = Arc::new(Disk::new(Image::open(image, true).expect("open"), name));
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).expect("bind nbd socket");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(serve_unix(l, disk.clone(), async {
        let _ = rx.await;
    }));
    Served {
        disk,
        sock,
        _stop: tx,
    }
}

pub async fn client(sock: &Path) -> Client<UnixStream> {
    let s = UnixStream::connect(sock).await.expect("connect nbd socket");
    Client::connect(s, "").await.expect("nbd handshake")
}

pub fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

pub struct Keys {
    pub src: Identity,
    pub dst: Identity,
}

pub fn keys() -> Keys {
    Keys {
        src: Identity::generate().expect("keygen"),
        dst: Identity::generate().expect("keygen"),
    }
}

pub struct RunningAgent {
    pub agent: Arc<Agent>,
    pub addr: String,
    _stop: oneshot::Sender<()>,
}

pub async fn agent(dir: &Path, id: Identity, peers: Vec<[u8; 32]>) -> RunningAgent {
    let agent = Agent::new(AgentOptions {
        dir: dir.to_owned(),
        identity: id,
        peers,
    });
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
    let addr = l.local_addr().expect("addr").to_string();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(agent.clone().run(l, async {
        let _ = rx.await;
    }));
    RunningAgent {
        agent,
        addr,
        _stop: tx,
    }
}

/// A random write: offset, data (or None for write-zeroes).
pub fn random_write(rng: &mut StdRng, size: u64) -> (u64, usize, bool) {
    let len = match rng.gen_range(0..10) {
        0..=5 => rng.gen_range(1..=8) * 512,
        6..=8 => rng.gen_range(1..=64) * 4096,
        _ => rng.gen_range(1..=1024 * 1024),
    } as u64;
    let off = rng.gen_range(0..size - len);
    (off, len as usize, rng.gen_range(0..12) == 0)
}

pub fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}
