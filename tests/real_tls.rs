//! `https` callbacks: a local TLS subscriber whose certificate comes from its
//! own CA gets signed callbacks once the broker is given that CA
//! (`callback_ca`, the `--callback-ca` flag), and none without it.
#![cfg(feature = "real")]

mod real_support;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use real_support::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sagamq::real::callbacks::{Allowlist, SIGNATURE_HEADER, load_ca_file, verify_now};
use sagamq::real::client::BrokerClient;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A CA, and a certificate for `localhost` it signed (DER) with its key.
fn private_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca.pem(), leaf.der().clone(), key)
}

type Received = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

/// An https server on loopback that records each POST's signature and body.
async fn tls_subscriber(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> (SocketAddr, Received) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let rec = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, rec) = (acceptor.clone(), rec.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let rec = rec.clone();
                    async move {
                        let sig = req
                            .headers()
                            .get(SIGNATURE_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        rec.lock().unwrap().push((sig, body.to_vec()));
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_callbacks_verify_the_subscribers_certificate_against_the_given_ca() {
    let (ca_pem, cert, key) = private_ca();
    let (addr, received) = tls_subscriber(cert, key).await;
    let url = format!("https://localhost:{}/notify", addr.port());
    let dir = temp_dir("tls");
    let ca_file = dir.with_extension("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    // Without the CA: the certificate is unknown, nothing is delivered.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["localhost", "127.0.0.0/8"]).unwrap();
    o.broker.attempts_max = 1_000;
    let broker = start(o.clone()).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &url)).await.unwrap();
    c.publish(&publish("g1", "t", "over tls")).await.unwrap();
    let d = broker.driver();
    let mut failed = 0;
    for _ in 0..500 {
        failed = d.stats().await.unwrap().io.callbacks_failed;
        if failed >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(failed >= 2, "a certificate from an unknown CA was accepted");
    assert!(received.lock().unwrap().is_empty(), "a request went through");
    broker.shutdown().await.unwrap();

    // With the CA (read from PEM as --callback-ca does): delivered, signed.
    o.callback_ca = load_ca_file(&ca_file).unwrap();
    let broker = start(o).await;
    let key = broker.signing_key.clone();
    eventually(10, "the https delivery after restart", || {
        !received.lock().unwrap().is_empty()
    })
    .await;
    let (sig, body) = received.lock().unwrap()[0].clone();
    assert_eq!(verify_now(key.as_bytes(), &body, &sig.expect("signed")), Ok(()));
    let m: sagamq::Message = serde_json::from_slice(&body).unwrap();
    assert_eq!(m.content, "over tls");
    broker.shutdown().await.unwrap();

    // The address check applies to https too: by name only, loopback is refused.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["localhost"]).unwrap();
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    let (status, v) = c.post_json("/subscribe", &subscribe("s2", "t", &url)).await.unwrap();
    assert_eq!(status, 400, "{v}");
    broker.shutdown().await.unwrap();
    let _ = std::fs::remove_file(&ca_file);
}

#[test]
fn a_ca_file_without_certificates_is_refused() {
    let dir = temp_dir("ca-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("ca.pem");
    std::fs::write(&f, "not a certificate\n").unwrap();
    let err = load_ca_file(&f).unwrap_err();
    assert!(err.contains("no PEM certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
