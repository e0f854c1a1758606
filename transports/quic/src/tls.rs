//! TLS 1.3 with raw Ed25519 public keys (RFC 7250): the node's identity key
//! is its TLS key, and a peer is exactly the key it signs the handshake with.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use pluto_plugins_api::{NodeId, TransportError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::AlwaysResolvesClientRawPublicKeys;
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::AlwaysResolvesServerRawPublicKeys;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The name a dialler asks for; nobody checks it (the key is what counts).
pub(crate) const SERVER_NAME: &str = "pluto";
/// Application protocol.
const ALPN: &[u8] = b"pluto/1";

/// DER SubjectPublicKeyInfo of an Ed25519 key, up to the key itself.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER PKCS#8 (v1) of an Ed25519 secret key, up to the 32-byte seed.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn spki(key: &[u8; 32]) -> Vec<u8> {
    let mut v = SPKI_PREFIX.to_vec();
    v.extend_from_slice(key);
    v
}

/// The node whose Ed25519 key this SubjectPublicKeyInfo holds.
fn key_of(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(&SPKI_PREFIX[..])?;
    <[u8; 32]>::try_from(key).ok().map(NodeId)
}

/// Who the other end of a connection proved to be.
pub(crate) fn peer_of(conn: &quinn::Connection) -> Option<NodeId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [one] => key_of(one.as_ref()),
        _ => None,
    }
}

fn tls_err(e: rustls::Error) -> TransportError {
    TransportError::Config(format!("tls: {e}"))
}

/// This node's TLS identity.
pub(crate) struct Identity {
    node: NodeId,
    key: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl Identity {
    pub(crate) fn new(seed: &[u8; 32]) -> Result<Self, TransportError> {
        let node = NodeId(SigningKey::from_bytes(seed).verifying_key().to_bytes());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut pkcs8 = PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(seed);
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
            .map_err(tls_err)?;
        let key = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki(&node.0))],
            signing,
        ));
        Ok(Self {
            node,
            key,
            provider,
        })
    }

    pub(crate) fn node(&self) -> NodeId {
        self.node
    }

    fn verifier(&self, expected: Option<NodeId>) -> Arc<PeerKey> {
        Arc::new(PeerKey {
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        })
    }

    /// The listening side: any Ed25519 client key, proved by its signature.
    pub(crate) fn server_config(
        &self,
    ) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TransportError> {
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(self.verifier(None))
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(
                self.key.clone(),
            )));
        c.alpn_protocols = vec![ALPN.to_vec()];
        quinn::crypto::rustls::QuicServerConfig::try_from(c)
            .map(Arc::new)
            .map_err(|e| TransportError::Config(format!("tls: {e}")))
    }

    /// The dialling side: only `peer`'s key is accepted.
    pub(crate) fn client_config(
        &self,
        peer: NodeId,
    ) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TransportError> {
        let mut c = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier(Some(peer)))
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(
                self.key.clone(),
            )));
        c.alpn_protocols = vec![ALPN.to_vec()];
        quinn::crypto::rustls::QuicClientConfig::try_from(c)
            .map(Arc::new)
            .map_err(|e| TransportError::Config(format!("tls: {e}")))
    }
}

/// Checks the other end's raw Ed25519 key: `expected` when dialling, any
/// well-formed one when listening; and in both cases its handshake
/// signature.
#[derive(Debug)]
struct PeerKey {
    expected: Option<NodeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerKey {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let bad = || {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        };
        if !rest.is_empty() {
            return Err(bad());
        }
        let key = key_of(end_entity.as_ref()).ok_or_else(bad)?;
        match self.expected {
            Some(e) if e != key => Err(bad()),
            _ => Ok(()),
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

impl ServerCertVerifier for PeerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for PeerKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_spki() {
        let k = [7u8; 32];
        assert_eq!(key_of(&spki(&k)), Some(NodeId(k)));
        assert_eq!(key_of(&spki(&k)[1..]), None);
        assert_eq!(key_of(b"junk"), None);
        let mut long = spki(&k);
        long.push(0);
        assert_eq!(key_of(&long), None);
    }
}
