"""Private keys: generate, serialise (PKCS#8, in memory only), load, identify.

Supported: ECDSA P-256 / P-384, RSA 2048 / 3072 / 4096, Ed25519. Key material is only
ever handed out wrapped in :class:`certctl.model.SecretBytes`; nothing here writes
to disk or logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from certctl.model import KeySpec, SecretBytes
from certctl.pki.errors import PKIError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
SigningHash: TypeAlias = hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None

EC_CURVES: Mapping[int, type[ec.EllipticCurve]] = MappingProxyType(
    {256: ec.SECP256R1, 384: ec.SECP384R1}
)
RSA_SIZES = (2048, 3072, 4096)
_CURVE_BITS: Mapping[str, int] = MappingProxyType({"secp256r1": 256, "secp384r1": 384})


def generate_key(spec: KeySpec) -> PrivateKey:
    """A new private key for ``spec`` (``algorithm`` + ``size``)."""
    if spec.algorithm == "ecdsa":
        curve = EC_CURVES.get(spec.size)
        if curve is None:
            raise PKIError(f"unsupported ECDSA curve size {spec.size} (use 256 or 384)")
        return ec.generate_private_key(curve())
    if spec.algorithm == "rsa":
        if spec.size not in RSA_SIZES:
            raise PKIError(f"unsupported RSA key size {spec.size} (use 2048, 3072 or 4096)")
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size)
    if spec.algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise PKIError(f"unsupported key algorithm {spec.algorithm!r}")


def key_spec(spec_or_text: str) -> KeySpec:
    """Parse a key id (``ecdsa-p256``, ``rsa-3072``, ``ed25519``) into a KeySpec."""
    text = spec_or_text.strip().lower()
    if text == "ed25519":
        return KeySpec("ed25519", 256)
    algo, _, size = text.partition("-")
    try:
        if algo == "ecdsa" and size.startswith("p"):
            return KeySpec("ecdsa", int(size[1:]))
        if algo == "rsa":
            return KeySpec("rsa", int(size))
    except ValueError:
        pass
    raise PKIError(f"unknown key type {spec_or_text!r}")


def key_to_pem(key: PrivateKey) -> SecretBytes:
    """PKCS#8 PEM, unencrypted, wrapped so it never prints. In memory only."""
    try:
        return SecretBytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot serialise {type(key).__name__}: {exc}") from exc


def load_key_pem(data: bytes | SecretBytes, password: bytes | None = None) -> PrivateKey:
    """Load a PEM private key (PKCS#8, or traditional EC/RSA). Only supported types."""
    raw = data.reveal() if isinstance(data, SecretBytes) else data
    try:
        key = serialization.load_pem_private_key(raw, password)
    except TypeError as exc:  # password given for an unencrypted key, or missing
        raise PKIError(f"cannot load private key: {exc}") from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message may quote the input; keep key material out of errors.
        raise PKIError(
            "cannot load private key: not a PEM private key, or wrong password"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        key_spec_id(key)  # refuses curves we do not support
        return key
    raise PKIError(f"unsupported private key type {type(key).__name__}")


def key_spec_id(key: PrivateKey | PublicKey | object) -> str:
    """``ecdsa-p256``, ``ecdsa-p384``, ``rsa-3072``, ``ed25519`` for a public or private key."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        bits = _CURVE_BITS.get(key.curve.name)
        if bits is None:
            raise PKIError(f"unsupported curve {key.curve.name}")
        return f"ecdsa-p{bits}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    raise PKIError(f"unsupported key type {type(key).__name__}")


def signing_hash(key: PrivateKey) -> SigningHash:
    """The hash a CA key signs with: SHA-384 for P-384, none for Ed25519, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size >= 521:
            return hashes.SHA512()
        if key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def public_bytes(key: PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo (for comparing keys)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def keys_match(private: PrivateKey, public: object) -> bool:
    """Whether ``public`` is the public half of ``private``."""
    if not isinstance(
        public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    ):
        return False
    return public_bytes(private.public_key()) == public_bytes(public)
