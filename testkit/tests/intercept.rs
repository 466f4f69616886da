//! The emulator reached as Google: over TLS on its HTTPS listener, trusted through its test CA
//! only, and behind its intercepting proxy, under Google's own host names.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gcp_token_operator_testkit::emulator::{Endpoint, Fault, GoogleEmulator, InterceptingProxy};
use reqwest::{Certificate, Client, Proxy};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CERTS: &str = "/oauth2/v3/certs";

/// A client whose only root is `ca_pem`.
fn trusting(ca_pem: &str) -> reqwest::ClientBuilder {
    let ca = Certificate::from_pem(ca_pem.as_bytes()).expect("the CA is PEM");
    Client::builder().tls_certs_only([ca])
}

#[tokio::test]
async fn https_serves_the_same_emulator_to_clients_trusting_its_ca() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let https = emulator.serve_https(&["127.0.0.1", "localhost"]).await.unwrap();
    assert_eq!(https.url(), format!("https://127.0.0.1:{}", https.port()));
    assert_eq!(std::fs::read_to_string(https.ca().file()).unwrap(), https.ca().pem());

    let client = trusting(https.ca().pem()).build().unwrap();
    let over_tls: Value = client
        .get(format!("{}{CERTS}", https.url()))
        .send()
        .await
        .expect("TLS with the test CA as the only root")
        .json()
        .await
        .unwrap();
    // The DNS name in the certificate works as well as the IP address.
    let by_name = client
        .get(format!("https://localhost:{}{CERTS}", https.port()))
        .send()
        .await
        .expect("TLS to the certificate's DNS name");
    assert_eq!(by_name.status(), 200);
    let plain: Value = reqwest::get(format!("{}{CERTS}", emulator.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_tls, plain, "the same signing keys, so the same emulator state");
    assert!(over_tls["keys"].as_array().is_some_and(|keys| !keys.is_empty()));
    assert_eq!(
        emulator.calls(Endpoint::Certs),
        3,
        "HTTPS calls are recorded with plain ones"
    );
}

#[tokio::test]
async fn tls_fails_without_the_test_ca_or_for_another_name() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let https = emulator.serve_https(&["127.0.0.1"]).await.unwrap();
    let url = format!("{}{CERTS}", https.url());

    let error = Client::new()
        .get(&url)
        .send()
        .await
        .expect_err("the system roots do not know the test CA");
    assert!(error.is_connect(), "{error:?}");

    let other_ca = emulator.serve_https(&["127.0.0.1"]).await.unwrap();
    let error = trusting(other_ca.ca().pem()).build().unwrap().get(&url).send().await;
    assert!(error.expect_err("each endpoint has its own CA").is_connect());

    let address = SocketAddr::from(([127, 0, 0, 1], https.port()));
    let elsewhere = trusting(https.ca().pem())
        .resolve("elsewhere.test", address)
        .build()
        .unwrap();
    let error = elsewhere
        .get(format!("https://elsewhere.test:{}{CERTS}", https.port()))
        .send()
        .await;
    assert!(error.expect_err("the certificate names 127.0.0.1 only").is_connect());
    assert_eq!(emulator.calls(Endpoint::Certs), 0, "no request got through");
}

#[tokio::test]
async fn https_listener_stops_with_the_emulator_or_the_endpoint() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let kept = emulator.serve_https(&["127.0.0.1"]).await.unwrap();
    let dropped = emulator.serve_https(&["127.0.0.1"]).await.unwrap();
    let (dropped_port, dropped_ca) = (dropped.port(), dropped.ca().file().to_owned());
    drop(dropped);
    assert!(!dropped_ca.exists(), "the CA file goes with the endpoint");
    wait_until_refused(dropped_port).await;

    let client = trusting(kept.ca().pem()).build().unwrap();
    let response = client.get(format!("{}{CERTS}", kept.url())).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "another endpoint of the same emulator is unaffected"
    );
    drop(emulator);
    wait_until_refused(kept.port()).await;
}

/// Waits (up to 5 s) until nothing listens on `port` any more.
async fn wait_until_refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "port {port} still accepts connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const METADATA_SA: &str = "node@proj.iam.gserviceaccount.com";

/// A client that reaches everything through `proxy` and trusts only its CA.
fn through(proxy: &InterceptingProxy) -> Client {
    trusting(proxy.ca().pem())
        .proxy(Proxy::all(proxy.url()).unwrap())
        .build()
        .unwrap()
}

/// The `Host` header of the request at `index` as the emulator received it.
fn host_of(emulator: &GoogleEmulator, index: usize) -> String {
    let request = &emulator.requests()[index];
    let host = request.headers.iter().find(|(name, _)| name == "host");
    host.map(|(_, value)| value.clone()).unwrap_or_default()
}

#[tokio::test]
async fn proxy_serves_google_hosts_over_tls_from_its_ca() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    assert!(proxy.url().starts_with("http://127.0.0.1:"), "{}", proxy.url());
    let client = through(&proxy);
    for (index, host) in ["www.googleapis.com", "oauth2.googleapis.com", "www.googleapis.com"]
        .iter()
        .enumerate()
    {
        let response = client.get(format!("https://{host}{CERTS}")).send().await;
        let response = response.unwrap_or_else(|error| panic!("{host} through the proxy: {error:?}"));
        assert_eq!(response.status(), 200, "{host}");
        assert_eq!(host_of(&emulator, index), *host, "the emulator sees the Google host");
    }
    assert_eq!(emulator.calls(Endpoint::Certs), 3);

    // Without the proxy's CA the client refuses the intercepted certificate.
    let untrusting = Client::builder()
        .proxy(Proxy::all(proxy.url()).unwrap())
        .build()
        .unwrap();
    let error = untrusting
        .get(format!("https://sts.googleapis.com{CERTS}"))
        .send()
        .await;
    assert!(
        error
            .expect_err("the system roots do not know the proxy's CA")
            .is_connect()
    );
    assert_eq!(emulator.calls(Endpoint::Certs), 3);
}

#[tokio::test]
async fn proxy_serves_the_metadata_server_over_plain_http() {
    let emulator = GoogleEmulator::start().await.unwrap();
    emulator.set_metadata_service_account(METADATA_SA);
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    let client = through(&proxy);
    for host in ["metadata.google.internal", "169.254.169.254"] {
        let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
        let response = client
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{host}");
        assert_eq!(response.headers()["metadata-flavor"], "Google");
        let body: Value = response.json().await.unwrap();
        let token = body["access_token"].as_str().unwrap();
        let issued = emulator.token_info(token).expect("a token the emulator issued");
        assert_eq!(issued.principal, format!("serviceAccount:{METADATA_SA}"));
    }
    // Detection probes ask the server's root for its Metadata-Flavor answer header.
    let probe = client.get("http://169.254.169.254").send().await.unwrap();
    assert_eq!(probe.status(), 200);
    assert_eq!(probe.headers()["metadata-flavor"], "Google");
    assert_eq!(emulator.calls(Endpoint::Metadata), 2);
    assert_eq!(emulator.calls(Endpoint::MetadataValue), 1);
}

#[tokio::test]
async fn proxy_refuses_every_other_host_without_dialling_it() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    // A server the proxy would reach if it dialled anything.
    let bystander = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bystander_address = bystander.local_addr().unwrap().to_string();
    let proxy_address = proxy.url().trim_start_matches("http://").to_owned();
    let refused = [
        format!("CONNECT {bystander_address} HTTP/1.1\r\nHost: {bystander_address}\r\n\r\n"),
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_owned(),
        // Google's hosts only on 443, and never in plain HTTP.
        "CONNECT sts.googleapis.com:8443 HTTP/1.1\r\nHost: sts.googleapis.com:8443\r\n\r\n".to_owned(),
        "GET http://sts.googleapis.com/v1/token HTTP/1.1\r\nHost: sts.googleapis.com\r\n\r\n".to_owned(),
        "GET http://metadata.google.internal:8080/ HTTP/1.1\r\nHost: metadata.google.internal:8080\r\n\r\n".to_owned(),
        format!("GET http://{bystander_address}/ HTTP/1.1\r\nHost: {bystander_address}\r\n\r\n"),
        // Addressed to the proxy itself rather than through it.
        "GET /computeMetadata/v1/ HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
    ];
    for request in refused {
        let mut stream = TcpStream::connect(&proxy_address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0; 512];
        let read = stream.read(&mut answer).await.unwrap();
        let status_line = String::from_utf8_lossy(&answer[..read])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(status_line, "HTTP/1.1 403 Forbidden", "for {request:?}");
    }
    let dialled = tokio::time::timeout(Duration::from_millis(200), bystander.accept()).await;
    assert!(dialled.is_err(), "the proxy connected to another host");
    assert!(emulator.requests().is_empty(), "nothing reached the emulator");
}

#[tokio::test]
async fn faults_drop_the_clients_own_connection_through_the_proxy() {
    let emulator = GoogleEmulator::start().await.unwrap();
    emulator.set_metadata_service_account(METADATA_SA);
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    let client = through(&proxy);
    emulator.fail_next(Endpoint::Certs, 1, Fault::DropConnection);
    let error = client.get(format!("https://www.googleapis.com{CERTS}")).send().await;
    assert!(error.expect_err("the tunnel closes without an answer").is_request());
    emulator.fail_next(Endpoint::Metadata, 1, Fault::DropConnection);
    let url = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token";
    let error = client.get(url).header("Metadata-Flavor", "Google").send().await;
    assert!(
        error
            .expect_err("the proxy connection closes without an answer")
            .is_request()
    );
    // The next calls are answered, on new connections.
    let response = client
        .get(format!("https://www.googleapis.com{CERTS}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client
        .get(url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn proxy_env_points_clients_at_it_and_its_ca_and_stops_with_it() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    let env: std::collections::HashMap<String, String> = proxy.env().into_iter().collect();
    for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        assert_eq!(env[name], proxy.url(), "{name}");
    }
    assert_eq!(env["SSL_CERT_FILE"], proxy.ca().file().to_string_lossy());
    assert_eq!(std::fs::read_to_string(proxy.ca().file()).unwrap(), proxy.ca().pem());
    for name in ["NO_PROXY", "no_proxy"] {
        let direct: Vec<&str> = env[name].split(',').collect();
        assert!(
            direct.contains(&"127.0.0.1") && direct.contains(&"localhost"),
            "{name}: {direct:?}"
        );
    }
    assert_eq!(format!("http://{}", proxy.metadata_host()), emulator.base_url());

    let port: u16 = proxy.url().rsplit(':').next().unwrap().parse().unwrap();
    let ca_file = proxy.ca().file().to_owned();
    drop(proxy);
    assert!(!ca_file.exists(), "the CA file goes with the proxy");
    wait_until_refused(port).await;
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    let port: u16 = proxy.url().rsplit(':').next().unwrap().parse().unwrap();
    drop(emulator);
    wait_until_refused(port).await;
}

/// The metadata values Google's client libraries read besides credentials, as the real server
/// answers them.
#[tokio::test]
async fn metadata_values_that_client_libraries_read() {
    let emulator = GoogleEmulator::start().await.unwrap();
    let client = Client::new();
    let get = |path: &str| {
        let url = format!("{}/computeMetadata/v1/{path}", emulator.base_url());
        client.get(url).header("Metadata-Flavor", "Google").send()
    };
    let text = |response: reqwest::Response| async move {
        assert_eq!(response.headers()["metadata-flavor"], "Google");
        (response.status().as_u16(), response.text().await.unwrap())
    };
    // Before any configuration: no account, no project.
    assert_eq!(
        text(get("instance/service-accounts/default/email").await.unwrap())
            .await
            .0,
        404
    );
    assert_eq!(text(get("project/project-id").await.unwrap()).await.0, 404);
    assert_eq!(
        text(get("instance/service-accounts/").await.unwrap()).await,
        (200, String::new())
    );

    emulator.set_metadata_service_account(METADATA_SA);
    emulator.set_metadata_project("proj", 123_456);
    for (path, expected) in [
        ("instance/service-accounts/default/email", METADATA_SA.to_owned()),
        (
            &format!("instance/service-accounts/{METADATA_SA}/email"),
            METADATA_SA.to_owned(),
        ),
        (
            "instance/service-accounts/default/scopes",
            "https://www.googleapis.com/auth/cloud-platform\n".to_owned(),
        ),
        ("instance/service-accounts/", format!("default/\n{METADATA_SA}/\n")),
        (
            "instance/service-accounts/default/",
            "aliases\nemail\nidentity\nscopes\ntoken\n".to_owned(),
        ),
        ("project/project-id", "proj".to_owned()),
        ("project/numeric-project-id", "123456".to_owned()),
        ("universe/universe-domain", "googleapis.com".to_owned()),
    ] {
        assert_eq!(text(get(path).await.unwrap()).await, (200, expected), "{path}");
    }
    let info: Value = get("instance/service-accounts/default/?recursive=true")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info,
        serde_json::json!({"aliases": ["default"], "email": METADATA_SA, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
    );
    let all: Value = get("instance/service-accounts/?recursive=true")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["default"], info);
    assert_eq!(all[METADATA_SA], info);

    let other = get("instance/service-accounts/other@proj.iam.gserviceaccount.com/email")
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let unheaded = client
        .get(format!("{}/computeMetadata/v1/project/project-id", emulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unheaded.status(), 403, "metadata values need Metadata-Flavor: Google");
    let unknown = get("instance/hostname").await.unwrap();
    assert_eq!(unknown.status(), 404);
    let requests = emulator.requests();
    assert_eq!(
        requests.last().unwrap().endpoint,
        None,
        "an unemulated value is not routed"
    );
    assert!(
        requests[..requests.len() - 1]
            .iter()
            .all(|r| r.endpoint == Some(Endpoint::MetadataValue))
    );
}
