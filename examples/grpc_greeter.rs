//! gRPC with tonic over waypost: greeter servers register themselves; a client calls
//! through one balanced `Channel` that follows the registry. A new server is called as soon
//! as it registers; a server that deregisters and stops is no longer called.
//!
//! ```text
//! cargo run --example grpc_greeter --features tonic                       # in-memory registry
//! WAYPOST_URL=consul://127.0.0.1:8500 cargo run --example grpc_greeter --features tonic,consul
//! ```
//!
//! The same code on every registry, by URL; the facade's tests run it on each real registry.
//! The messages and the service are written by hand here (what `tonic-build` generates from
//! `helloworld.proto`), so the example needs no code generation.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use waypost::{Config, Discovery, Instance, Registration};

const WAIT: Duration = Duration::from_secs(30);
const PATH: &str = "/helloworld.Greeter/SayHello";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `helloworld.HelloRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub(crate) name: String,
}

/// `helloworld.HelloReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloReply {
    /// The greeting, naming the server that answered.
    #[prost(string, tag = "1")]
    pub(crate) message: String,
}

/// The `helloworld.Greeter` service of one server.
#[derive(Clone)]
struct Greeter {
    server: String,
}

impl tonic::server::NamedService for Greeter {
    const NAME: &'static str = "helloworld.Greeter";
}

struct SayHello(String);

impl tonic::server::UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Response<HelloReply>, Status>;
    fn call(&mut self, request: Request<HelloRequest>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            Ok(Response::new(HelloReply {
                message: format!("hello {} from {server}", request.into_inner().name),
            }))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for Greeter
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        if request.uri().path() == PATH {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(SayHello(server), request).await)
            })
        } else {
            Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}

/// One greeter server: listening on a free loopback port, registered in the registry.
struct Server {
    name: String,
    registration: Registration,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(d: &Discovery, name: &str) -> Result<Self, BoxError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let greeter = Greeter {
            server: name.to_string(),
        };
        let done = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(greeter)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        let registration = d
            .registrar
            .register(Instance::parse("greeter", name, "127.0.0.1", port)?)
            .await?;
        println!("   [{name}] serving on 127.0.0.1:{port}, registered");
        Ok(Self {
            name: name.to_string(),
            registration,
            stop,
            done,
        })
    }

    /// Deregisters first (so clients stop calling), then stops serving.
    async fn stop(self) -> Result<(), BoxError> {
        self.registration.deregister().await?;
        let _ = self.stop.send(());
        self.done.await?;
        println!("   [{}] deregistered and stopped", self.name);
        Ok(())
    }
}

/// Calls `SayHello` once through `channel`; returns the server that answered.
async fn say_hello(channel: &tonic::transport::Channel) -> Result<String, BoxError> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| format!("channel not ready: {e}"))?;
    let reply: Response<HelloReply> = grpc
        .unary(
            Request::new(HelloRequest {
                name: "waypost".into(),
            }),
            http::uri::PathAndQuery::from_static(PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    let message = reply.into_inner().message;
    Ok(message.rsplit(' ').next().unwrap_or_default().to_string())
}

/// Calls until `done` holds of the servers that answered, failing after [`WAIT`]; a failed
/// call is retried.
async fn call_until(
    channel: &tonic::transport::Channel,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Result<Vec<String>, BoxError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut answered = Vec::new();
    while !done(&answered) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what}: not within {WAIT:?}; answered: {answered:?}").into());
        }
        match tokio::time::timeout(Duration::from_secs(5), say_hello(channel)).await {
            Ok(Ok(server)) => answered.push(server),
            Ok(Err(e)) => println!("   call failed (retrying): {e}"),
            Err(_) => println!("   call timed out (retrying)"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(answered)
}

#[tokio::main]
async fn main() -> Result<(), waypost::Report> {
    // On failure: the error and its causes on one line, not a debug dump.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let config = Config::from_env().unwrap_or_else(|| Config::from_url("memory://grpc-greeter"));
    Ok(run(&config).await?)
}

/// The scenario on the registry `config` names.
pub(crate) async fn run(config: &Config) -> Result<(), BoxError> {
    println!("waypost grpc_greeter on {config:?}");
    let servers_side = waypost::connect_config(config).await?;
    let client_side = waypost::connect_config(config).await?;

    println!("1. two servers register; the client's channel calls both");
    let s1 = Server::start(&servers_side, "s1").await?;
    let s2 = Server::start(&servers_side, "s2").await?;
    let channel = waypost::grpc::balanced_channel(
        client_side.watcher.clone(),
        "greeter".parse()?,
        waypost::grpc::plain,
    );
    let seen = call_until(&channel, "both servers answer", |a| {
        a.iter().any(|s| s == "s1") && a.iter().any(|s| s == "s2")
    })
    .await?;
    println!("   answered by {:?}", seen.iter().collect::<BTreeSet<_>>());

    println!("2. a third server registers: it is called");
    let s3 = Server::start(&servers_side, "s3").await?;
    call_until(&channel, "the new server answers", |a| {
        a.iter().any(|s| s == "s3")
    })
    .await?;
    println!("   s3 answered");

    println!("3. s1 deregisters and stops: it is no longer called");
    s1.stop().await?;
    // Once the change reached the channel, 30 calls in a row succeed without s1.
    let mut streak = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while streak < 30 {
        if tokio::time::Instant::now() > deadline {
            return Err("s1 was still called (or calls failed) after it left".into());
        }
        match tokio::time::timeout(Duration::from_secs(5), say_hello(&channel)).await {
            Ok(Ok(server)) if server != "s1" => streak += 1,
            _ => streak = 0,
        }
    }
    println!("   30 calls in a row answered by s2 and s3 only");
    s2.stop().await?;
    s3.stop().await?;
    println!("done");
    Ok(())
}
