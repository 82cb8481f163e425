//! The load benchmark: four servers on 127.0.0.1, driven in turn by `wrk` (a real HTTP load
//! generator), for several alternating rounds:
//!
//! - `bare`: hyper serving a hello-world `service_fn`;
//! - `layer, no task`: the same behind `BackgroundLayer`;
//! - `layer, one task`: each response carries one small async task;
//! - `tokio::spawn`: the handler spawns the same task itself (the usual alternative).
//!
//! The server runs on one worker thread pinned to CPU 0 and `wrk` on CPU 1 (where the
//! machine has two), and the server's own CPU time comes from `getrusage`. It prints, per
//! server, requests/s, p50 and p99 latency and CPU µs per request, as medians over the
//! rounds with their spread, and as ratios to `bare` (and of `layer, one task` to
//! `tokio::spawn`), each ratio taken within a round. Loopback only; bounded in time.
//!
//! ```text
//! benches/load.sh                       # installs wrk if needed, then runs this
//! cargo run --release -p tower-background-benches --bin loadbench -- --rounds 5 --seconds 3 --connections 32
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, service_fn};
use tower_background::{BackgroundLayer, Task};

const VARIANTS: [&str; 4] = ["bare", "layer, no task", "layer, one task", "tokio::spawn"];

struct Settings {
    rounds: usize,
    seconds: u64,
    connections: u32,
    /// Drive only this server (`--only 2`), e.g. to profile it.
    only: Option<usize>,
}

fn settings() -> Settings {
    let mut s = Settings {
        rounds: 5,
        seconds: 3,
        connections: 32,
        only: None,
    };
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2) {
        let value = || pair[1].parse().expect("a number after the flag");
        match pair[0].as_str() {
            "--rounds" => s.rounds = value() as usize,
            "--seconds" => s.seconds = value(),
            "--connections" => s.connections = value() as u32,
            "--only" => s.only = Some(value() as usize),
            _ => {}
        }
    }
    s
}

fn hello() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"Hello, World!")))
}

/// Serves `svc` over HTTP/1.1 on a fresh port.
async fn serve<S>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    serve_any(svc).await
}

async fn serve_any<S, B>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    addr
}

/// The server's own CPU time so far (user + system), in microseconds.
fn cpu_micros() -> f64 {
    // SAFETY: `getrusage` fills the zeroed struct we hand it; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// Pins this process to CPU 0, so that wrk can have CPU 1.
fn pin_to_cpu0() -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only read
    // and write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
}

fn parse_duration_us(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|n| n * factor)
}

/// Runs wrk against `addr` and reads requests/s, requests, p50 and p99 from its report.
fn wrk(addr: SocketAddr, s: &Settings, pin: bool) -> (f64, f64, f64, f64) {
    let mut cmd = if pin {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1", "wrk"]);
        cmd
    } else {
        Command::new("wrk")
    };
    let out = cmd
        .args([
            "-t1",
            &format!("-c{}", s.connections),
            &format!("-d{}s", s.seconds),
            "--latency",
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("wrk runs (benches/load.sh installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let mut rps = 0.0;
    let mut requests = 0.0;
    let (mut p50, mut p99) = (0.0, 0.0);
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => rps = n.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0.0),
            ["50%", d] => p50 = parse_duration_us(d).unwrap_or(0.0),
            ["99%", d] => p99 = parse_duration_us(d).unwrap_or(0.0),
            _ => {}
        }
    }
    assert!(requests > 0.0, "wrk reported no requests:\n{report}");
    (rps, requests, p50, p99)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn main() {
    let s = settings();
    let pin = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
        && Command::new("taskset").arg("--version").output().is_ok()
        && pin_to_cpu0();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ran = Arc::new(AtomicU64::new(0));

    let addrs: Vec<SocketAddr> = runtime.block_on(async {
        let bare = service_fn(|_req: Request<Incoming>| async { Ok::<_, Infallible>(hello()) });
        let layered = ServiceBuilder::new()
            .layer(BackgroundLayer::new())
            .service_fn(|_req: Request<Incoming>| async { Ok::<_, Infallible>(hello()) });
        let r = ran.clone();
        let one_task = ServiceBuilder::new()
            .layer(BackgroundLayer::new())
            .service_fn(move |_req: Request<Incoming>| {
                let r = r.clone();
                async move {
                    let mut res = hello();
                    res.extensions_mut().insert(Task::new(async move {
                        r.fetch_add(1, Relaxed);
                    }));
                    Ok::<_, Infallible>(res)
                }
            });
        let r = ran.clone();
        let spawning = service_fn(move |_req: Request<Incoming>| {
            let r = r.clone();
            async move {
                tokio::spawn(async move {
                    r.fetch_add(1, Relaxed);
                });
                Ok::<_, Infallible>(hello())
            }
        });
        vec![
            serve(bare).await,
            serve_any(layered).await,
            serve_any(one_task).await,
            serve(spawning).await,
        ]
    });

    println!(
        "load benchmark: {} rounds x {} s per server, wrk -t1 -c{}, server on 1 worker{}",
        s.rounds,
        s.seconds,
        s.connections,
        if pin {
            " pinned to CPU 0, wrk on CPU 1"
        } else {
            " (not pinned)"
        }
    );
    let mut samples: Vec<Vec<Sample>> = (0..VARIANTS.len()).map(|_| Vec::new()).collect();
    // A short warm-up of each server, not counted.
    for addr in &addrs {
        let warm = Settings {
            rounds: 1,
            seconds: 1,
            connections: s.connections,
            only: None,
        };
        wrk(*addr, &warm, pin);
    }
    for round in 0..s.rounds {
        // Alternate the order, so that no server always runs first or last.
        let mut order: Vec<usize> = (0..VARIANTS.len()).collect();
        order.rotate_left(round % VARIANTS.len());
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            if s.only.is_some_and(|only| only != index) {
                continue;
            }
            let before = cpu_micros();
            let (rps, requests, p50, p99) = wrk(addrs[index], &s, pin);
            let cpu = cpu_micros() - before;
            samples[index].push(Sample {
                rps,
                p50_us: p50,
                p99_us: p99,
                cpu_us_per_request: cpu / requests,
            });
        }
        eprintln!("round {} of {} done", round + 1, s.rounds);
    }

    if let Some(only) = s.only {
        let v = &samples[only];
        let cpu = median(v.iter().map(|x| x.cpu_us_per_request).collect());
        println!("{}: {cpu:.2} CPU µs/request", VARIANTS[only]);
        return;
    }
    let per_round_ratio = |a: usize, b: usize, f: fn(&Sample) -> f64| -> Vec<f64> {
        samples[a]
            .iter()
            .zip(&samples[b])
            .map(|(x, y)| f(x) / f(y))
            .collect()
    };
    println!();
    println!(
        "| server | requests/s | p50 | p99 | CPU µs/request (min–max) | CPU vs bare | requests/s vs bare |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (index, name) in VARIANTS.iter().enumerate() {
        let v = &samples[index];
        let cpu: Vec<f64> = v.iter().map(|x| x.cpu_us_per_request).collect();
        let (lo, hi) = spread(&cpu);
        let cpu_ratio = per_round_ratio(index, 0, |x| x.cpu_us_per_request);
        let rps_ratio = per_round_ratio(index, 0, |x| x.rps);
        let (clo, chi) = spread(&cpu_ratio);
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {:.2} ({lo:.2}–{hi:.2}) | {:.3} ({clo:.3}–{chi:.3}) | {:.3} |",
            median(v.iter().map(|x| x.rps).collect()),
            median(v.iter().map(|x| x.p50_us).collect()),
            median(v.iter().map(|x| x.p99_us).collect()),
            median(cpu),
            median(cpu_ratio.clone()),
            median(rps_ratio),
        );
    }
    let cpu_vs_spawn = per_round_ratio(2, 3, |x| x.cpu_us_per_request);
    let rps_vs_spawn = per_round_ratio(2, 3, |x| x.rps);
    let (lo, hi) = spread(&cpu_vs_spawn);
    println!();
    println!(
        "layer, one task vs tokio::spawn: CPU per request {:.3} (per-round {lo:.3}–{hi:.3}), requests/s {:.3}",
        median(cpu_vs_spawn),
        median(rps_vs_spawn)
    );
    println!("background tasks run: {}", ran.load(Relaxed));
    runtime.shutdown_timeout(Duration::from_secs(1));
}
