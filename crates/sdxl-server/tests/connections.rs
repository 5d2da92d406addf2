//! Connection limits of `sdxl_server::serve` over real sockets: the first-request and idle
//! timeouts (HTTP/1 and HTTP/2), the connection cap and its overflow for health checks, the
//! write timeout, and graceful shutdown. Timeouts are hundreds of milliseconds; each wait on
//! the server has a generous upper bound.

mod common;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::Duration;

use common::{expect_error, SlowBackend, RUN};
use reqwest::StatusCode;
use sdxl_engine::queue::{Backend, Queue, QueueConfig, Step};
use sdxl_engine::GenerateRequest;
use sdxl_models::pixels::RgbImage;
use sdxl_server::{app, AppState, ConnectionLimits, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long past its deadline the server may take to close a connection (a loaded CI
/// machine); the tests also check that it did not close it before.
const SLACK: Duration = Duration::from_secs(3);

struct Running {
    address: SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.address).await.unwrap()
    }
}

async fn start(limits: ConnectionLimits, backend: impl Backend) -> Running {
    start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), limits, backend)
}

fn start_on(listener: TcpListener, limits: ConnectionLimits, backend: impl Backend) -> Running {
    let address = listener.local_addr().unwrap();
    let state = AppState::new(Queue::start(backend, QueueConfig::with_capacity(4)), ServerConfig::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(sdxl_server::serve(listener, app(state.clone()), limits, async {
        let _ = stopped.await;
    }));
    Running { address, state, stop: Some(stop), served }
}

fn limits(header_read: Duration, idle: Duration) -> ConnectionLimits {
    ConnectionLimits { header_read_timeout: header_read, idle_timeout: idle, ..ConnectionLimits::default() }
}

fn fast_backend() -> SlowBackend {
    SlowBackend::new(Duration::from_millis(1))
}

/// Reads until the server closes `stream` (EOF or reset), at most `bound`; returns when,
/// and what arrived before.
async fn until_closed(stream: &mut TcpStream, bound: Duration) -> (Instant, Vec<u8>) {
    let mut received = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let read = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("reading failed: {e}"),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection within {bound:?}");
    (Instant::now(), received)
}

/// An HTTP/1.1 response read off a raw socket: status, lower-cased head, body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response with a `Content-Length` body.
async fn read_response(stream: &mut TcpStream) -> Raw {
    let mut data = Vec::new();
    let mut buf = [0; 4096];
    let end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head: {:?}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(data[..end].to_vec()).unwrap().to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a content-length");
    let mut body = data[end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&buf[..n]);
    }
    Raw { status, head, body }
}

async fn get(stream: &mut TcpStream, path: &str) -> Raw {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream).await
}

/// `opened` is taken before connecting: the server's clock starts at accept, which may come
/// before `connect()` returns here.
fn assert_closed_between(opened: Instant, closed: Instant, from: Duration, what: &str) {
    let took = closed - opened;
    assert!(took >= from, "{what}: closed after {took:?}, before its {from:?}");
    assert!(took <= from + SLACK, "{what}: closed after {took:?}, long after its {from:?}");
}

// regression: the auto builder reads the protocol preface with no timeout, so a client that
// sent nothing held its connection, and a file descriptor, forever
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let header = Duration::from_millis(300);
    let server = start(limits(header, Duration::from_secs(30)), fast_backend()).await;
    let opened = Instant::now();
    let mut stream = server.connect().await;
    let (closed, received) = until_closed(&mut stream, header + SLACK).await;
    assert_closed_between(opened, closed, header, "silent");
    assert!(received.is_empty(), "{received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_http2_preface_is_closed_after_the_header_timeout() {
    let header = Duration::from_millis(300);
    let server = start(limits(header, Duration::from_secs(30)), fast_backend()).await;
    let opened = Instant::now();
    let mut stream = server.connect().await;
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (closed, _) = until_closed(&mut stream, header + SLACK).await;
    assert_closed_between(opened, closed, header, "partial preface");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_sends_no_headers_frame_is_closed_after_the_header_timeout() {
    let header = Duration::from_millis(300);
    let server = start(limits(header, Duration::from_secs(30)), fast_backend()).await;
    let opened = Instant::now();
    let mut stream = server.connect().await;
    // the whole preface and an empty SETTINGS frame, then nothing
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let (closed, received) = until_closed(&mut stream, header + SLACK).await;
    assert_closed_between(opened, closed, header, "preface without a request");
    assert_eq!(received.get(3), Some(&4), "the server answered with its SETTINGS frame first: {received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_head_that_never_ends_is_closed_after_the_header_timeout() {
    let header = Duration::from_millis(300);
    let server = start(limits(header, Duration::from_secs(30)), fast_backend()).await;
    let opened = Instant::now();
    let mut stream = server.connect().await;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
    let (closed, received) = until_closed(&mut stream, header + SLACK).await;
    assert_closed_between(opened, closed, header, "unfinished head");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // idle well above the header timeout: the idle timeout, not the header one, applies
    // between requests
    let (header, idle) = (Duration::from_millis(200), Duration::from_millis(800));
    let server = start(limits(header, idle), fast_backend()).await;
    let mut stream = server.connect().await;
    for _ in 0..2 {
        let response = get(&mut stream, "/health").await;
        assert_eq!(response.status, 200);
        assert!(response.body.starts_with(b"{"), "{:?}", String::from_utf8_lossy(&response.body));
        assert!(!response.head.contains("connection: close"), "{}", response.head);
    }
    let answered = Instant::now();
    let (closed, received) = until_closed(&mut stream, idle + SLACK).await;
    assert!(received.is_empty());
    // the server's idle time began when it wrote the response, a little before it was read
    assert_closed_between(answered, closed + Duration::from_millis(50), idle, "idle HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let (header, idle) = (Duration::from_millis(200), Duration::from_millis(800));
    let server = start(limits(header, idle), fast_backend()).await;
    let io = hyper_util::rt::TokioIo::new(server.connect().await);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = axum::http::Request::get(server.url("/health")).body(String::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), axum::http::Version::HTTP_2);
    drop(response);
    let answered = Instant::now();
    // the server's GOAWAY ends the client's connection
    let ended = tokio::time::timeout(idle + SLACK, connection).await.expect("no GOAWAY within the bound");
    ended.unwrap().expect("a clean HTTP/2 shutdown");
    assert_closed_between(answered, Instant::now() + Duration::from_millis(50), idle, "idle HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_cap_health_checks_are_answered_and_work_is_refused() {
    let limits = ConnectionLimits { max_connections: 2, ..limits(Duration::from_secs(30), Duration::from_secs(30)) };
    let server = start(limits, fast_backend()).await;
    // the cap taken by two connections that send nothing (accepted in order)
    let mut silent = vec![server.connect().await, server.connect().await];

    let mut probe = server.connect().await;
    let health = get(&mut probe, "/health").await;
    assert_eq!(health.status, 200);
    assert!(health.head.contains("connection: close"), "{}", health.head);
    let (_, after) = until_closed(&mut probe, SLACK).await;
    assert!(after.is_empty(), "one request per overflow connection");
    for path in ["/ready", "/metrics"] {
        let response = reqwest::Client::new().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }

    let body = json!({"prompt": "refused", "num_steps": 1, "width": 256, "height": 256});
    let refused = reqwest::Client::new().post(server.url(RUN)).json(&body).send().await.unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["connection"], "close");
    let message = expect_error(refused, StatusCode::SERVICE_UNAVAILABLE, 3040).await;
    assert!(message.contains("too many connections"), "{message}");

    // a closed connection frees its place: work is served again
    drop(silent.pop());
    let served = tokio::time::timeout(SLACK, async {
        loop {
            let response = reqwest::Client::new().post(server.url(RUN)).json(&body).send().await.unwrap();
            if response.status() != StatusCode::SERVICE_UNAVAILABLE {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
        }
    })
    .await
    .expect("the freed place was not given to a new connection");
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(&served.bytes().await.unwrap()[..4], b"\x89PNG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_replaces_a_silent_overflow_connection() {
    let limits = ConnectionLimits {
        max_connections: 1,
        overflow_connections: 1,
        overflow_deadline: Duration::from_secs(30),
        ..limits(Duration::from_secs(30), Duration::from_secs(30))
    };
    let server = start(limits, fast_backend()).await;
    let _main = server.connect().await;
    let mut overflow = server.connect().await;
    let mut probe = server.connect().await;
    // the overflow place goes to the newest connection; the silent one is closed at once
    let (_, received) = until_closed(&mut overflow, SLACK).await;
    assert!(received.is_empty());
    assert_eq!(get(&mut probe, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_cap_and_the_overflow_a_connection_is_closed_at_once() {
    let limits = ConnectionLimits {
        max_connections: 1,
        overflow_connections: 0,
        ..limits(Duration::from_secs(30), Duration::from_secs(30))
    };
    let server = start(limits, fast_backend()).await;
    let _main = server.connect().await;
    let mut refused = server.connect().await;
    let opened = Instant::now();
    let (closed, received) = until_closed(&mut refused, SLACK).await;
    assert!(received.is_empty());
    assert!(closed - opened < Duration::from_secs(1), "closed after {:?}", closed - opened);
}

/// Returns `width × height` pixels of noise, whose PNG is about as large as its pixels.
struct NoiseBackend;

impl Backend for NoiseBackend {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        _on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> sdxl_engine::Result<RgbImage> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let pixels = (0..3 * request.width * request.height)
            .map(|_| {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as u8
            })
            .collect();
        Ok(RgbImage { width: request.width, height: request.height, pixels })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_by_the_write_timeout() {
    let write = Duration::from_millis(300);
    // small socket buffers on both sides, so a 3 MB response stalls after a few kilobytes
    // (accepted sockets inherit the listener's buffer sizes)
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let limits = ConnectionLimits { write_timeout: write, ..ConnectionLimits::default() };
    let server = start_on(socket.listen(16).unwrap(), limits, NoiseBackend);

    let client = TcpSocket::new_v4().unwrap();
    client.set_recv_buffer_size(4096).unwrap();
    let mut stream = client.connect(server.address).await.unwrap();
    let body = json!({"prompt": "noise", "num_steps": 1, "width": 1024, "height": 1024, "guidance": 0}).to_string();
    let request = format!(
        "POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // read the head, then stop reading
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed before the head");
        head.push(byte[0]);
    }
    let stopped = Instant::now();
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).unwrap().trim().parse().unwrap();
    assert!(length > 2_000_000, "a response too small to stall: {length} bytes");

    // the server gives up on the connection: it counts the write timeout
    let counted = r#"sdxl_connections_closed_total{reason="write_timeout"} 1"#;
    let gave_up = tokio::time::timeout(write + SLACK, async {
        loop {
            let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
            if metrics.contains(counted) {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
        }
    })
    .await
    .expect("the stalled write was not timed out");
    assert!(gave_up - stopped >= write, "timed out after {:?}", gave_up - stopped);
    // what was already in the socket buffers arrives, then the end: the response is cut off
    let (_, rest) = until_closed(&mut stream, SLACK).await;
    assert!(rest.len() < length, "the whole response arrived ({} of {length} bytes)", rest.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_lets_a_running_request_finish() {
    let mut server =
        start(limits(Duration::from_secs(30), Duration::from_secs(30)), SlowBackend::new(Duration::from_millis(100)))
            .await;
    let mut silent = server.connect().await;
    let mut idle = server.connect().await;
    assert_eq!(get(&mut idle, "/health").await.status, 200);
    let body = json!({"prompt": "finish", "num_steps": 5, "width": 256, "height": 256});
    let running = tokio::spawn(reqwest::Client::new().post(server.url(RUN)).json(&body).send());
    let busy = tokio::time::timeout(SLACK, async {
        while !server.state.queue().busy() {
            tokio::time::sleep(Duration::from_millis(5)).await; // polling interval
        }
    });
    busy.await.expect("the request did not start");

    server.stop.take().unwrap().send(()).unwrap();
    // long before their 30 s timeouts
    until_closed(&mut idle, SLACK).await;
    until_closed(&mut silent, SLACK).await;
    let response = running.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(&response.bytes().await.unwrap()[..4], b"\x89PNG");
    let served = tokio::time::timeout(SLACK, server.served).await.expect("serve() did not return");
    served.unwrap().unwrap();
}
