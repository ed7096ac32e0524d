//! `ferry serve` flags checked before the server starts: nothing is bound or loaded when they cannot work.

use std::net::TcpListener;

use super::common::{ferry, scratch};

#[test]
fn a_management_api_beyond_loopback_without_a_token_is_refused_before_binding() {
    let dir = scratch("serve", "admin");
    let repo = dir.join("models");
    // The REST port is taken: a start that got as far as binding would fail on it instead.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let args = [
        "serve",
        "--model-repository",
        repo.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--rest-port",
        &port,
        "--grpc-port",
        "0",
        "--admin-host",
        "0.0.0.0",
        "--admin-port",
        "0",
    ];
    let out = ferry(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:0, beyond loopback, without a token") && !stderr.contains(&port),
        "{stderr}"
    );
    // With a token the flags pass, and the start fails where binding begins: at the port in use.
    let out = ferry(&[&args[..], &["--admin-token", "s3cret"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&port), "{stderr}");
    drop(taken);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn engine_threads_beyond_the_machine_are_refused_before_anything_starts() {
    let dir = scratch("serve", "threads");
    std::fs::create_dir_all(dir.join("models")).unwrap();
    let repo = dir.join("models");
    let out = ferry(&[
        "serve",
        "--model-repository",
        repo.to_str().unwrap(),
        "--intra-op-threads",
        "60000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--intra-op-threads (60000) and --instances (2) may each be at most"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
