//! A local S3 server for trying imba's S3 support and benchmarking it: s3s-fs (S3 over a
//! directory, one bucket per subdirectory) on 127.0.0.1.
//!
//!   cargo run --release --example s3_server -- DIR [PORT]
//!
//! prints `http://127.0.0.1:PORT` once it listens; credentials are `imba`/`imba-secret`:
//!
//!   AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=imba AWS_SECRET_ACCESS_KEY=imba-secret \
//!   AWS_REGION=us-east-1 imba run pipeline.yaml

use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(root) = args.next() else {
        eprintln!("usage: s3_server DIR [PORT]");
        std::process::exit(2);
    };
    let port: u16 = match args.next().map(|p| p.parse()) {
        None => 0,
        Some(Ok(port)) => port,
        Some(Err(e)) => {
            eprintln!("s3_server: invalid port: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let root = root;
        let fs = s3s_fs::FileSystem::new(&root)
            .map_err(|e| std::io::Error::other(format!("cannot serve {root}: {e:?}")))?;
        let service = {
            let mut builder = s3s::service::S3ServiceBuilder::new(fs);
            builder.set_auth(s3s::auth::SimpleAuth::from_single("imba", "imba-secret"));
            builder.build()
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("http://{}", listener.local_addr()?);
        loop {
            let (socket, _) = listener.accept().await?;
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}
