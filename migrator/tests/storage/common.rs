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
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener, UnixStream};

use migrator::nbd::client::ClientError;
use tokio::sync::{oneshot, Mutex};

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

pub const MIB: u64 = 1024 * 1024;

/// Random writes through NBD until the source refuses them (it has moved) or
/// `stop` is set; every acknowledged write is applied to `model`.
pub async fn writer(
    sock: std::path::PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    writer_within(sock, model, seed, stop, None).await
}

/// [`writer`], its writes all within the first `span` bytes of the disk.
pub async fn writer_within(
    sock: std::path::PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    span: Option<u64>,
) -> u64 {
    let mut c = client(&sock).await;
    let size = span.unwrap_or(c.size()).min(c.size());
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfeed);
    let mut acked = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (off, len, zero) = random_write(&mut rng, size);
        let mut data = vec![0u8; len];
        if !zero {
            rng.fill_bytes(&mut data);
        }
        let r = if zero {
            c.write_zeroes(off, len as u32).await
        } else {
            c.write(off, &data, rng.gen_range(0..8) == 0).await
        };
        match r {
            Ok(()) => {
                model.lock().await[off as usize..off as usize + len].copy_from_slice(&data);
                acked += 1;
            }
            Err(ClientError::Server { code: 1, .. }) => break, // EPERM: moved
            Err(e) => panic!("write failed: {e}"),
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    acked
}

pub async fn read_all(sock: &Path) -> Vec<u8> {
    let mut c = client(sock).await;
    let mut out = vec![0u8; c.size() as usize];
    for (i, chunk) in out.chunks_mut(4 * MIB as usize).enumerate() {
        c.read(i as u64 * 4 * MIB, chunk).await.expect("read back");
    }
    out
}

/// A TCP relay on loopback standing in for the WAN between two nodes: it can
/// cut every connection it carries (a broken link), or hold what they carry
/// (a black hole) and later deliver it late. New connections always pass.
pub struct Proxy {
    pub addr: String,
    links: Arc<std::sync::Mutex<Vec<Carried>>>,
    accept: tokio::task::JoinHandle<()>,
}

struct Carried {
    task: tokio::task::AbortHandle,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(to: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = l.local_addr().expect("addr").to_string();
        let links: Arc<std::sync::Mutex<Vec<Carried>>> = Arc::default();
        let ls = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let Ok(b) = tokio::net::TcpStream::connect(&to).await else {
                    continue;
                };
                let (hold, held) = tokio::sync::watch::channel(false);
                let task = tokio::spawn(async move {
                    let (ar, aw) = a.into_split();
                    let (br, bw) = b.into_split();
                    tokio::select! {
                        _ = pipe(ar, bw, held.clone()) => {}
                        _ = pipe(br, aw, held) => {}
                    }
                });
                ls.lock().unwrap_or_else(|p| p.into_inner()).push(Carried {
                    task: task.abort_handle(),
                    hold,
                });
            }
        });
        Proxy {
            addr,
            links,
            accept,
        }
    }

    /// Closes every connection it carries now.
    pub fn cut(&self) {
        for l in self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            l.task.abort();
        }
    }

    /// The connections it carries now go silent: open, nothing delivered.
    pub fn black_hole(&self) {
        for l in self.links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = l.hold.send(true);
        }
    }

    /// Delivers what the black hole held, late.
    pub fn release(&self) {
        for l in self.links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = l.hold.send(false);
        }
    }
}

/// Copies `r` to `w`, holding what it read while `held` says so.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
