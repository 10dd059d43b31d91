//! The node's control API: the types both ends share, and the client.
//!
//! One request per connection on the node's unix socket, as one JSON line;
//! the node answers with JSON lines of [`Reply`]. A `migrate` request is
//! answered with the migration's events as they happen, ending with its
//! summary or its error; the migration itself belongs to the node, so
//! `status`, `cancel` and `set` work from any other shell meanwhile.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::agent::DiskState;
use crate::args::Tuning;
use crate::events::{Event, Phase, Summary};

/// The longest request line a node reads.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// This node's VMs and the migrations in flight.
    Status,
    /// Send `vm` to the peer node named `to` (a `[peer.NAME]` of the
    /// node's config: a node never sends to an address it was handed).
    Migrate {
        vm: String,
        to: String,
        #[serde(default)]
        tuning: Tuning,
    },
    /// Abort `vm`'s migration before its commit point: it keeps running here.
    Cancel { vm: String },
    /// Change `vm`'s migration while it runs.
    Set {
        vm: String,
        #[serde(default)]
        max_rate_mbit: Option<f64>,
        #[serde(default)]
        downtime_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(NodeStatus),
    Event(Event),
    /// The request was carried out (cancel, set).
    Done {
        message: String,
    },
    /// The request was refused or failed; nothing changed unless it says so.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name, as its peers call it.
    pub node: String,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    /// `complete`: it runs here; `moved`: it left for `to`; `partial`: a
    /// copy that never committed; `committed`: arrived, last blocks coming;
    /// `in_doubt`: sent on, waiting to hear whether `to` took over.
    pub state: DiskState,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A QEMU of this VM runs under this node.
    pub qemu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<JobStatus>,
}

/// A migration in flight, as `virsh domjobinfo` shows one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub to: String,
    pub phase: Option<Phase>,
    pub elapsed_s: f64,
    pub wire_bytes: u64,
    pub rate_bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    pub round: u32,
    pub dirty_blocks: u64,
    pub max_rate_mbit: Option<f64>,
    /// QEMU's memory passes so far (a VM's migration).
    pub memory_passes: Option<u64>,
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the node's control socket {path}: {source} (is `migrator node run` running, and is this the socket its config names?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node sent a reply this client does not understand: {0} (are both the same migrator version?)")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Node(String),
    #[error("the node closed the connection without an answer")]
    NoAnswer,
}

/// Sends `req` and passes every reply to `each` until the node closes the
/// connection. The last `Error` reply becomes the result.
pub async fn call(
    socket: &Path,
    req: &Request,
    mut each: impl FnMut(Reply),
) -> Result<(), ClientError> {
    let s = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (rd, mut wr) = s.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let mut failed = None;
    let mut any = false;
    while let Some(l) = lines.next_line().await? {
        let r: Reply = serde_json::from_str(&l)?;
        any = true;
        match &r {
            Reply::Error { message } | Reply::Event(Event::Error { message }) => {
                failed = Some(message.clone())
            }
            _ => {}
        }
        each(r);
    }
    match (failed, any) {
        (Some(m), _) => Err(ClientError::Node(m)),
        (None, true) => Ok(()),
        (None, false) => Err(ClientError::NoAnswer),
    }
}

/// `status`.
pub async fn status(socket: &Path) -> Result<NodeStatus, ClientError> {
    let mut st = None;
    call(socket, &Request::Status, |r| {
        if let Reply::Status(s) = r {
            st = Some(s)
        }
    })
    .await?;
    st.ok_or(ClientError::NoAnswer)
}

/// `migrate`: events go to `tx` as they come; the summary at the end.
pub async fn migrate(
    socket: &Path,
    vm: &str,
    to: &str,
    tuning: Tuning,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<Summary, ClientError> {
    let mut summary = None;
    call(
        socket,
        &Request::Migrate {
            vm: vm.to_string(),
            to: to.to_string(),
            tuning,
        },
        |r| {
            if let Reply::Event(e) = r {
                if let Event::Summary(s) = &e {
                    summary = Some(s.clone());
                }
                let _ = tx.send(e);
            }
        },
    )
    .await?;
    summary.ok_or(ClientError::NoAnswer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_are_typed_and_strict() {
        let r: Request =
            serde_json::from_str(r#"{"request":"cancel","vm":"web1"}"#).expect("a cancel request");
        assert_eq!(r, Request::Cancel { vm: "web1".into() });
        // a field the node does not know is refused, not ignored
        assert!(serde_json::from_str::<Request>(
            r#"{"request":"migrate","vm":"web1","to":"siteB","identity":"/tmp/k"}"#
        )
        .is_err());
        let m: Request = serde_json::from_str(r#"{"request":"migrate","vm":"web1","to":"siteB"}"#)
            .expect("tuning defaults");
        let Request::Migrate { tuning, .. } = m else {
            panic!("not a migrate request")
        };
        assert_eq!(tuning.downtime_ms, Tuning::default().downtime_ms);
    }

    proptest! {
        #[test]
        fn any_line_is_a_request_or_an_error(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Request>(&b);
        }

        #[test]
        fn set_roundtrips(vm in "[a-z0-9]{1,20}", rate in proptest::option::of((1u32..100_000).prop_map(f64::from)), d in proptest::option::of(any::<u64>())) {
            let r = Request::Set { vm, max_rate_mbit: rate, downtime_ms: d };
            let back: Request = serde_json::from_str(&serde_json::to_string(&r).expect("encode")).expect("decode");
            prop_assert_eq!(back, r);
        }
    }
}
