//! A saga participant ([`ParticipantHost`]) on real IO: an HTTP endpoint for
//! the broker's callbacks, a [`BrokerClient`] for its publishes and
//! subscriptions, and its own log file with the same writer thread as the
//! broker's.
//!
//! **Invariants:** one task owns the host; a callback is answered 2xx only
//! when the host says `Answer { ok: true }` (its record is durable); a
//! callback whose signature does not verify never reaches the host.

use super::callbacks::{SIGNATURE_HEADER, verify_now};
use super::client::BrokerClient;
use super::clock::Clock;
use super::driver::FatalLogError;
use super::file_disk::FileDisk;
use super::log_writer::{LogWriter, PendingWrites};
use crate::machine::Machine;
use crate::saga::{
    CallbackToken, Command, CommandOutcome, HostConfig, Participant, ParticipantHost, ParticipantInput,
    ParticipantOutput,
};
use crate::types::{ClientId, Message};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Capacity of the channel into a participant's task.
pub const NODE_COMMANDS_QUEUED_MAX: usize = 1024;
/// Capacity of the channel of broker answers (publish / subscribe results).
const NODE_RESULTS_QUEUED_MAX: usize = 1024;

type Query<P> = Box<dyn FnOnce(&ParticipantHost<P>) + Send>;

enum NodeCmd<P: Participant> {
    Deliver {
        message: Message,
        reply: oneshot::Sender<bool>,
    },
    Command {
        command: Command,
        reply: oneshot::Sender<CommandOutcome>,
    },
    Query(Query<P>),
    Shutdown,
}

pub struct NodeOptions {
    pub client_id: ClientId,
    pub data_dir: PathBuf,
    pub broker: BrokerClient,
    /// Verifies `X-SagaMQ-Signature` on callbacks when set.
    pub signing_key: Option<Vec<u8>>,
    pub listen: SocketAddr,
    pub seed: u64,
}

/// A running participant.
pub struct ParticipantNode<P: Participant> {
    pub notify_url: String,
    tx: mpsc::Sender<NodeCmd<P>>,
    task: JoinHandle<Result<(), FatalLogError>>,
    server: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl<P: Participant + Send + 'static> ParticipantNode<P> {
    /// Binds the callback endpoint, recovers the participant from its log in
    /// `opts.data_dir` (or starts it fresh as `logic`), and runs it.
    pub async fn start(logic: P, opts: NodeOptions) -> Result<ParticipantNode<P>, String> {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| format!("bind {}: {e}", opts.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let notify_url = format!("http://{addr}/notify");
        let mut config = HostConfig::new(opts.client_id.clone(), notify_url.clone());
        config.seed = opts.seed;

        let mut disk = FileDisk::open(&opts.data_dir).map_err(|e| format!("{}: {e}", opts.data_dir.display()))?;
        let image = disk.try_read_all().map_err(|e| e.to_string())?;
        let mut recovered = None;
        if !image.is_empty() {
            // Log format v2 tells a tail of zeros (a size that reached the disk
            // before its data) from damage itself: the zeros are cut as a torn
            // tail, damage followed by a valid frame is refused.
            let r = ParticipantHost::recover(logic.clone(), config.clone(), &image)
                .map_err(|err| format!("recover {}: {err}", disk.path().display()))?;
            recovered = Some(r);
        }
        let host = match recovered {
            None => ParticipantHost::new(logic, config),
            Some((host, report)) => {
                if report.torn_bytes > 0 {
                    disk.try_truncate(report.valid_len).map_err(|e| e.to_string())?;
                }
                host
            }
        };
        let writer = LogWriter::spawn(disk).map_err(|e| e.to_string())?;

        let (tx, rx) = mpsc::channel(NODE_COMMANDS_QUEUED_MAX);
        let (results_tx, results_rx) = mpsc::channel(NODE_RESULTS_QUEUED_MAX);
        let node = NodeTask {
            host,
            clock: Clock::new(),
            writer,
            pending: PendingWrites::default(),
            broker: opts.broker,
            results_tx,
            results_rx,
            commands: rx,
            answers: BTreeMap::new(),
            command_waiters: VecDeque::new(),
            token_next: 0,
        };
        let task = tokio::spawn(node.run());

        let state = CallbackState {
            tx: tx.clone(),
            key: opts.signing_key.map(Arc::from),
        };
        let app = axum::Router::new()
            .route("/notify", axum::routing::post(on_callback::<P>))
            .with_state(state);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(ParticipantNode {
            notify_url,
            tx,
            task,
            server,
            stop: Some(stop),
        })
    }

    /// Runs a workload command; answers once it is committed (durable) or refused.
    pub async fn command(&self, command: Command) -> Result<CommandOutcome, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeCmd::Command { command, reply })
            .await
            .map_err(|_| "participant stopped".to_string())?;
        rx.await.map_err(|_| "participant stopped".to_string())
    }

    /// Reads the host's state.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ParticipantHost<P>) -> T + Send + 'static,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        let q: Query<P> = Box::new(move |h| {
            let _ = reply.send(f(h));
        });
        self.tx
            .send(NodeCmd::Query(q))
            .await
            .map_err(|_| "participant stopped".to_string())?;
        rx.await.map_err(|_| "participant stopped".to_string())
    }

    /// Stops the endpoint, finishes pending writes and stops the task.
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.server).await;
        let _ = self.tx.send(NodeCmd::Shutdown).await;
        match (&mut self.task).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl<P: Participant> Drop for ParticipantNode<P> {
    fn drop(&mut self) {
        self.server.abort();
        self.task.abort();
    }
}

struct CallbackState<P: Participant> {
    tx: mpsc::Sender<NodeCmd<P>>,
    key: Option<Arc<[u8]>>,
}

impl<P: Participant> Clone for CallbackState<P> {
    fn clone(&self) -> Self {
        CallbackState {
            tx: self.tx.clone(),
            key: self.key.clone(),
        }
    }
}

fn answer(status: StatusCode, ok: bool, error: Option<&str>) -> Response {
    let body = match error {
        Some(e) => json!({"ok": ok, "error": e}),
        None => json!({"ok": ok}),
    };
    (status, axum::Json(body)).into_response()
}

async fn on_callback<P: Participant + Send + 'static>(
    State(s): State<CallbackState<P>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(key) = &s.key {
        let sig = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Err(e) = verify_now(key, &body, sig) {
            return answer(StatusCode::UNAUTHORIZED, false, Some(&e.to_string()));
        }
    }
    let message: Message = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return answer(StatusCode::BAD_REQUEST, false, Some(&e.to_string())),
    };
    let (reply, rx) = oneshot::channel();
    if s.tx.send(NodeCmd::Deliver { message, reply }).await.is_err() {
        return answer(StatusCode::SERVICE_UNAVAILABLE, false, Some("participant stopping"));
    }
    match rx.await {
        Ok(true) => answer(StatusCode::OK, true, None),
        Ok(false) => answer(StatusCode::SERVICE_UNAVAILABLE, false, Some("not processed; retry")),
        Err(_) => answer(StatusCode::SERVICE_UNAVAILABLE, false, Some("participant stopping")),
    }
}

struct NodeTask<P: Participant> {
    host: ParticipantHost<P>,
    clock: Clock,
    writer: LogWriter,
    pending: PendingWrites,
    broker: BrokerClient,
    results_tx: mpsc::Sender<ParticipantInput>,
    results_rx: mpsc::Receiver<ParticipantInput>,
    commands: mpsc::Receiver<NodeCmd<P>>,
    answers: BTreeMap<CallbackToken, oneshot::Sender<bool>>,
    command_waiters: VecDeque<(Command, oneshot::Sender<CommandOutcome>)>,
    token_next: u64,
}

impl<P: Participant + Send + 'static> NodeTask<P> {
    async fn run(mut self) -> Result<(), FatalLogError> {
        loop {
            self.turn();
            let deadline = self.host.poll_timeout().map(|t| self.clock.instant_of(t));
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                done = self.writer.done() => {
                    done.result.map_err(FatalLogError)?;
                    let now = self.clock.now();
                    self.host.handle(now, ParticipantInput::Durable { lsn: done.lsn });
                }
                Some(input) = self.results_rx.recv() => {
                    let now = self.clock.now();
                    self.host.handle(now, input);
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(NodeCmd::Shutdown) => break,
                    Some(cmd) => self.on_command(cmd),
                },
                () = sleep => {}
            }
        }
        // Finish what is being written so answers already promised hold.
        self.turn();
        while self.writer.in_flight().is_some() {
            let done = self.writer.done().await;
            done.result.map_err(FatalLogError)?;
        }
        Ok(())
    }

    fn on_command(&mut self, cmd: NodeCmd<P>) {
        let now = self.clock.now();
        match cmd {
            NodeCmd::Deliver { message, reply } => {
                self.token_next += 1;
                let token = CallbackToken(self.token_next);
                self.answers.insert(token, reply);
                self.host.handle(now, ParticipantInput::Deliver { token, message });
            }
            NodeCmd::Command { command, reply } => {
                self.command_waiters.push_back((command.clone(), reply));
                self.host.handle(now, ParticipantInput::Command(command));
            }
            NodeCmd::Query(q) => q(&self.host),
            NodeCmd::Shutdown => {}
        }
    }

    fn turn(&mut self) {
        let now = self.clock.now();
        if self.host.poll_timeout().is_some_and(|t| t <= now) {
            self.host.handle_timeout(now);
        }
        while let Some(out) = self.host.poll_output() {
            match out {
                ParticipantOutput::Persist { lsn, frames } => self.pending.append(lsn, frames),
                ParticipantOutput::Publish { outbox, publish } => {
                    let broker = self.broker.clone();
                    let results = self.results_tx.clone();
                    tokio::spawn(async move {
                        let input = match broker.publish(&publish).await {
                            Ok(ack) => ParticipantInput::PublishAcked {
                                outbox,
                                msg_id: ack.msg_id,
                            },
                            Err(e) => {
                                tracing::debug!(outbox = outbox.0, "publish failed: {e}");
                                ParticipantInput::PublishFailed { outbox }
                            }
                        };
                        let _ = results.send(input).await;
                    });
                }
                ParticipantOutput::Subscribe(sub) => {
                    let broker = self.broker.clone();
                    let results = self.results_tx.clone();
                    tokio::spawn(async move {
                        let topic = sub.topic.clone();
                        match broker.subscribe(&sub).await {
                            Ok(_) => {
                                let _ = results.send(ParticipantInput::Subscribed { topic }).await;
                            }
                            // The host sends the subscribe again after `subscribe_retry`.
                            Err(e) => tracing::debug!(%topic, "subscribe failed: {e}"),
                        }
                    });
                }
                ParticipantOutput::Answer { token, ok } => {
                    if let Some(tx) = self.answers.remove(&token) {
                        let _ = tx.send(ok);
                    }
                }
                ParticipantOutput::CommandDone { command, outcome } => {
                    if let Some(i) = self.command_waiters.iter().position(|(c, _)| *c == command)
                        && let Some((_, tx)) = self.command_waiters.remove(i)
                    {
                        let _ = tx.send(outcome);
                    }
                }
            }
        }
        self.writer.start(&mut self.pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::encode_frame;
    use crate::saga::{scenario, topics};

    fn options(dir: &std::path::Path) -> NodeOptions {
        NodeOptions {
            client_id: ClientId::lit(topics::STOCK_SERVICE),
            data_dir: dir.to_path_buf(),
            // Nobody listens there: the node's subscribe keeps retrying, which is fine here.
            broker: BrokerClient::new("http://127.0.0.1:9", None),
            signing_key: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            seed: 1,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_of_zeros_is_a_torn_write_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("sagamq-participant-zeros-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(super::super::file_disk::LOG_FILE_NAME);
        // Created and grown, but its data never reached the disk.
        std::fs::write(&log, [0u8; 64]).unwrap();
        let node = ParticipantNode::start(scenario::seed().stock_participant(), options(&dir))
            .await
            .expect("a zero-filled log is a torn write");
        let _ = node.shutdown().await;
        let after = std::fs::read(&log).unwrap();
        assert!(
            !after.starts_with(&[0u8; 8]),
            "the zeros were not cut: {} bytes",
            after.len()
        );

        // A damaged record followed by another: refused, the log untouched.
        let mut damaged = Vec::new();
        encode_frame(b"{\"x\":1}", &mut damaged);
        encode_frame(b"{\"x\":2}", &mut damaged);
        damaged[9] ^= 0x40;
        std::fs::write(&log, &damaged).unwrap();
        let err = ParticipantNode::start(scenario::seed().stock_participant(), options(&dir))
            .await
            .err()
            .expect("refused");
        assert!(err.contains("corrupt"), "{err}");
        assert_eq!(std::fs::read(&log).unwrap(), damaged);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
