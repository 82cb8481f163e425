//! No framework: hyper's own HTTP/1 server, `ServiceBuilder` over `service_fn`, and
//! `WithTasks` to attach the tasks to the response.
//!
//! ```text
//! cargo run --example hyper_plain
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Task, Tasks, WithTasks};

async fn warm_cache(path: String) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    println!("task:   cache warmed for {path}");
}

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut tasks = Tasks::new();
    tasks.add_task(warm_cache, (path.clone(),));
    tasks.push(Task::blocking(move || {
        println!("task:   access log line for {path}")
    }));
    let res = Response::builder()
        .status(StatusCode::OK)
        .with_tasks(tasks)
        .body(Full::from("hello\n"))
        .expect("a valid response");
    println!("server: answering 200");
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service_fn(hello);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });

    // A raw hyper client connection: no framework on either side.
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = sender
        .send_request(Request::get("/index.html").body(Empty::<Bytes>::new())?)
        .await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!("client: {status} {:?}", String::from_utf8_lossy(&body));

    let report = background.shutdown(Duration::from_secs(5)).await;
    println!("background tasks {report}");
    Ok(())
}
