//! HTTPS (SPEC §9): the router serves TLS with a certificate made at test time by a private CA, rotates it on a
//! reload without dropping open connections, and keeps the one in use when a reload fails.

use std::path::{Path, PathBuf};

use llm_router::config::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::helpers::*;

/// A private CA and the files of certificates it signs.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "llm-router test CA");
        let key = KeyPair::generate().expect("CA key");
        TestCa { issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes a certificate for `localhost` and 127.0.0.1 and its key into `dir`; returns their paths and the
    /// certificate's DER.
    pub fn issue(&self, dir: &Path, name: &str) -> (TlsFiles, Vec<u8>) {
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let files = TlsFiles { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        (files, cert.der().to_vec())
    }
}

/// An HTTPS client that trusts `ca` only and reports the server's certificate.
fn client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA")])
        .tls_info(true)
        .no_proxy()
        .build()
        .expect("client")
}

/// The certificate the router presented for `response`.
fn presented(response: &reqwest::Response) -> Vec<u8> {
    let info = response.extensions().get::<reqwest::tls::TlsInfo>().expect("TLS info");
    info.peer_certificate().expect("a certificate").to_vec()
}

fn copy(from: &TlsFiles, to: &TlsFiles) {
    std::fs::copy(&from.cert, &to.cert).expect("copy certificate");
    std::fs::copy(&from.key, &to.key).expect("copy key");
}

#[tokio::test]
async fn the_router_serves_https_and_rotates_its_certificate_on_reload() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new();
    let (first, first_der) = ca.issue(dir.path(), "first");
    let (second, second_der) = ca.issue(dir.path(), "second");
    // The router reads the files named `live`; rotating is copying a new pair over them and reloading.
    let live = TlsFiles { cert: dir.path().join("live.pem"), key: dir.path().join("live.key") };
    copy(&first, &live);
    let app = TestApp::with_settings(Options::default(), |settings| settings.tls = Some(live.clone())).await;
    let url = format!("https://localhost:{}/healthz", app.addr.port());

    let before = client(&ca);
    let answer = before.get(&url).send().await.expect("https");
    assert_eq!(answer.status(), 200);
    assert_eq!(presented(&answer), first_der);
    let plain = app.client.get(format!("http://127.0.0.1:{}/healthz", app.addr.port())).send().await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP is not served on the TLS port");

    copy(&second, &live);
    app.state.tls.as_ref().expect("tls").reload().expect("reload");
    let after = client(&ca).get(&url).send().await.expect("https after the reload");
    assert_eq!(presented(&after), second_der, "a new connection gets the new certificate");
    let kept = before.get(&url).send().await.expect("the open connection still answers");
    assert_eq!(kept.status(), 200);
    assert_eq!(presented(&kept), first_der, "an open connection keeps its certificate");

    // A broken pair is refused and the certificate in use stays.
    std::fs::write(&live.key, "not a key").expect("break the key");
    assert!(app.state.tls.as_ref().expect("tls").reload().is_err());
    let still = client(&ca).get(&url).send().await.expect("https after a failed reload");
    assert_eq!(presented(&still), second_der);
}

#[tokio::test]
async fn a_missing_certificate_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let files = TlsFiles { cert: PathBuf::from("/nonexistent/cert.pem"), key: dir.path().join("key.pem") };
    let mut settings = llm_router::config::Settings::new(dir.path().join("data"));
    settings.tls = Some(files);
    let clock = std::sync::Arc::new(llm_router::clock::ManualClock::new(0));
    let err = llm_router::app::App::build(settings, clock).await.err().expect("refused");
    assert!(format!("{err:#}").contains("/nonexistent/cert.pem"), "{err:#}");
    assert!(!dir.path().join("data").exists(), "nothing was written");
}
