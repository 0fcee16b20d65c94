//! Mutual challenge-response on a new peer connection (`proto/protos/peerpb.proto`).
//!
//! 1. dialer -> `Hello { version, cluster, from, to, nonce_d }`
//! 2. server -> `Challenge { node, nonce_s, proof_s }`, or `Refused` and close
//! 3. dialer checks `proof_s`, then -> `Proof { proof_d }`
//! 4. server checks `proof_d` -> `HelloAck`, or `Refused` and close
//!
//! Both proofs are HMAC-SHA256 under the cluster secret over a role label, both nonces and both
//! node ids, so each side proves knowledge of the secret on a value the other side chose fresh:
//! a recorded handshake cannot be replayed, and the server's proof cannot be reflected as a
//! dialer's. The server reads nothing but `Proof` after `Hello`: whatever else a peer pipelines
//! is never acted on before it has proven the secret.
//!
//! This authenticates peers; it does not encrypt or sign the traffic after the handshake (run
//! the peer port on a private network, or add TLS).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use proto::peerpb::{
    Challenge, Hello, HelloAck, PeerFrame, PeerFrame_oneof_kind, Proof, Refused, Refused_Reason,
};
use proto::NodeId;
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::io::{write_frame, FrameReader};
use super::{Shared, TransportError};

/// Version of the peer protocol described by `peerpb.proto`.
pub(super) const VERSION: u32 = 1;
const NONCE_LEN: usize = 32;
const LABEL_SERVER: &[u8] = b"quiver-peer-v1 server";
const LABEL_DIALER: &[u8] = b"quiver-peer-v1 dialer";

type HmacSha256 = Hmac<Sha256>;

fn mac(
    secret: &[u8],
    label: &[u8],
    nonce_d: &[u8],
    nonce_s: &[u8],
    from: NodeId,
    to: NodeId,
) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for part in [label, nonce_d, nonce_s] {
        m.update(&(part.len() as u64).to_le_bytes());
        m.update(part);
    }
    m.update(&from.get().to_le_bytes());
    m.update(&to.get().to_le_bytes());
    m
}

fn nonce() -> Bytes {
    let mut n = vec![0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    Bytes::from(n)
}

fn refused(reason: Refused_Reason) -> PeerFrame {
    let mut r = Refused::new();
    r.reason = reason;
    let mut f = PeerFrame::new();
    f.set_refused(r);
    f
}

/// Dialer side. Returns once the server has accepted us.
pub(super) async fn dial<R, W>(
    shared: &Shared,
    to: NodeId,
    rd: &mut FrameReader<R>,
    wr: &mut W,
) -> Result<(), TransportError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    let from = shared.node;
    let nonce_d = nonce();
    let mut hello = Hello::new();
    hello.version = VERSION;
    hello.cluster = cfg.cluster.clone();
    hello.from = from.get();
    hello.to = to.get();
    hello.nonce = nonce_d.clone();
    let mut f = PeerFrame::new();
    f.set_hello(hello);
    write_frame(wr, &f, cfg.max_frame).await?;

    let challenge = match rd.next_kind().await? {
        PeerFrame_oneof_kind::challenge(c) => c,
        PeerFrame_oneof_kind::refused(r) => return Err(TransportError::RefusedByPeer(r.reason)),
        _ => return Err(TransportError::Protocol("expected Challenge")),
    };
    if challenge.node != to.get() {
        return Err(TransportError::WrongNode {
            expected: to,
            found: NodeId(challenge.node),
        });
    }
    if challenge.nonce.len() != NONCE_LEN {
        return Err(TransportError::Protocol("bad server nonce"));
    }
    let secret = &cfg.cluster_secret;
    mac(secret, LABEL_SERVER, &nonce_d, &challenge.nonce, from, to)
        .verify_slice(&challenge.proof)
        .map_err(|_| TransportError::BadProof)?;

    let proof_d = mac(secret, LABEL_DIALER, &nonce_d, &challenge.nonce, from, to)
        .finalize()
        .into_bytes();
    let mut p = Proof::new();
    p.proof = Bytes::copy_from_slice(&proof_d);
    let mut f = PeerFrame::new();
    f.set_proof(p);
    write_frame(wr, &f, cfg.max_frame).await?;

    match rd.next_kind().await? {
        PeerFrame_oneof_kind::ack(_) => Ok(()),
        PeerFrame_oneof_kind::refused(r) => Err(TransportError::RefusedByPeer(r.reason)),
        _ => Err(TransportError::Protocol("expected HelloAck")),
    }
}

/// Server side, after the dialer's `Hello` was read. Returns the authenticated dialer's id.
/// On failure a `Refused` frame is sent (best effort) and the caller closes the connection.
pub(super) async fn accept<R, W>(
    shared: &Shared,
    hello: Hello,
    rd: &mut FrameReader<R>,
    wr: &mut W,
) -> Result<NodeId, TransportError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let result = accept_inner(shared, hello, rd, wr).await;
    if let Err(e) = &result {
        let reason = match e {
            TransportError::BadProof => Refused_Reason::BAD_PROOF,
            TransportError::WrongCluster { .. } => Refused_Reason::WRONG_CLUSTER,
            TransportError::WrongNode { .. } => Refused_Reason::WRONG_NODE,
            TransportError::BadVersion(_) => Refused_Reason::BAD_VERSION,
            TransportError::Protocol(_) | TransportError::Frame(_) => Refused_Reason::PROTOCOL,
            _ => return result,
        };
        let _ = write_frame(wr, &refused(reason), shared.cfg.max_frame).await;
    }
    result
}

async fn accept_inner<R, W>(
    shared: &Shared,
    hello: Hello,
    rd: &mut FrameReader<R>,
    wr: &mut W,
) -> Result<NodeId, TransportError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    if hello.version != VERSION {
        return Err(TransportError::BadVersion(hello.version));
    }
    if hello.cluster != cfg.cluster {
        return Err(TransportError::WrongCluster {
            theirs: hello.cluster,
        });
    }
    if hello.to != shared.node.get() {
        return Err(TransportError::WrongNode {
            expected: shared.node,
            found: NodeId(hello.to),
        });
    }
    if hello.from == 0 || hello.nonce.len() != NONCE_LEN {
        return Err(TransportError::Protocol("bad Hello"));
    }
    let (from, to) = (NodeId(hello.from), shared.node);
    let nonce_s = nonce();
    let secret = &cfg.cluster_secret;
    let proof_s = mac(secret, LABEL_SERVER, &hello.nonce, &nonce_s, from, to)
        .finalize()
        .into_bytes();
    let mut c = Challenge::new();
    c.node = to.get();
    c.nonce = nonce_s.clone();
    c.proof = Bytes::copy_from_slice(&proof_s);
    let mut f = PeerFrame::new();
    f.set_challenge(c);
    write_frame(wr, &f, cfg.max_frame).await?;

    let proof = match rd.next_kind().await? {
        PeerFrame_oneof_kind::proof(p) => p,
        _ => return Err(TransportError::Protocol("expected Proof")),
    };
    mac(secret, LABEL_DIALER, &hello.nonce, &nonce_s, from, to)
        .verify_slice(&proof.proof)
        .map_err(|_| TransportError::BadProof)?;

    let mut f = PeerFrame::new();
    f.set_ack(HelloAck::new());
    write_frame(wr, &f, cfg.max_frame).await?;
    Ok(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_role_nonces_and_ids() {
        let s = b"secret";
        let p = |label, nd: &[u8], ns: &[u8], f, t| {
            mac(s, label, nd, ns, NodeId(f), NodeId(t))
                .finalize()
                .into_bytes()
        };
        let base = p(LABEL_DIALER, b"a", b"b", 1, 2);
        assert_eq!(base, p(LABEL_DIALER, b"a", b"b", 1, 2));
        assert_ne!(base, p(LABEL_SERVER, b"a", b"b", 1, 2));
        assert_ne!(base, p(LABEL_DIALER, b"b", b"a", 1, 2));
        assert_ne!(base, p(LABEL_DIALER, b"a", b"b", 2, 1));
        // Length prefixes keep ("ab", "") apart from ("a", "b").
        assert_ne!(base, p(LABEL_DIALER, b"ab", b"", 1, 2));
        assert!(
            mac(b"other", LABEL_DIALER, b"a", b"b", NodeId(1), NodeId(2))
                .verify_slice(&base)
                .is_err()
        );
    }
}
