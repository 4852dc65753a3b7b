//! A throwaway PKI for tests: one CA, and server/client certificates it signs, written as PEM
//! files the way an operator would hand them to etcd's flags.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use crate::TlsInfo;

/// A CA whose certificate is at `ca_file`.
pub struct TestPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl TestPki {
    /// A new CA named `name`, its files under `dir`.
    pub fn new(dir: &Path, name: &str) -> TestPki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write ca");
        TestPki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca_file,
        }
    }

    /// A certificate for `hosts` (IP addresses or DNS names) usable both to serve and to
    /// authenticate as a client, as members' certificates are; returned as settings that also
    /// trust this CA.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> TlsInfo {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(hosts).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let cert_file = self.dir.join(format!("{name}.pem"));
        let key_file = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        TlsInfo {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            trusted_ca_file: Some(self.ca_file.clone()),
            client_cert_auth: false,
            self_signed: false,
        }
    }
}
