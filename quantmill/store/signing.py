"""Signed provenance: a DSSE envelope (in-toto's signature format) over each published provenance record.

The payload is the record's exact bytes, type ``application/vnd.in-toto+json``; keys are Ed25519 (securesystemslib).
The private key is a PKCS#8 PEM file named by ``publish.signing_key`` (or $QUANTMILL_SIGNING_KEY); only its public
key id ever reaches a record or a log. Verification takes the trusted public keys (``publish.trusted_keys``, files
written by ``quantmill registry keygen``) and needs one valid signature from one of them, over exactly the bytes
of the record published beside it. Keyless Sigstore signing is the option where the network allows; see README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from quantmill.errors import QuantmillError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
ENV_SIGNING_KEY = "QUANTMILL_SIGNING_KEY"


class SignatureError(QuantmillError):
    """A signature is missing, malformed, made by an untrusted key, or over other bytes."""


def generate(directory: Path, name: str = "quantmill") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``NAME.key`` (private, PEM, mode 600) and ``NAME.pub.json`` (public)."""
    from securesystemslib.signer import CryptoSigner

    directory.mkdir(parents=True, exist_ok=True)
    signer = CryptoSigner.generate_ed25519()
    private, public = directory / f"{name}.key", directory / f"{name}.pub.json"
    if private.exists():
        raise QuantmillError(f"{private} exists; choose another --name or directory (a key is never overwritten)")
    pem = signer.private_bytes  # PKCS#8 PEM, unencrypted: protect it as a file (mode 600) or a CI secret
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_text(json.dumps({"keyid": signer.public_key.keyid, **signer.public_key.to_dict()}, indent=1) + "\n")
    return private, public


def signer_from(path: str | os.PathLike | None):
    """The signer of a private key file (``path``, else $QUANTMILL_SIGNING_KEY); None if neither is set."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    path = path or os.environ.get(ENV_SIGNING_KEY)
    if not path:
        return None
    file = Path(path).expanduser()
    try:
        key = load_pem_private_key(file.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"signing key {file} not found; fix publish.signing_key (or ${ENV_SIGNING_KEY}), or "
                             f"make a pair with `quantmill registry keygen`") from None
    except (ValueError, TypeError) as e:
        raise SignatureError(f"signing key {file} is not an unencrypted PEM private key ({e}); make one with "
                             f"`quantmill registry keygen`") from None
    return CryptoSigner(key)


def key_id(signer) -> str:
    return signer.public_key.keyid


def load_public_keys(paths: Iterable[str | os.PathLike]) -> list:
    """Trusted public keys from ``NAME.pub.json`` files."""
    from securesystemslib.signer import SSlibKey

    keys = []
    for path in paths:
        file = Path(path).expanduser()
        try:
            data = json.loads(file.read_text())
            keys.append(SSlibKey.from_dict(data.pop("keyid"), data))
        except FileNotFoundError:
            raise SignatureError(f"trusted key {file} not found; fix publish.trusted_keys") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SignatureError(f"trusted key {file} is not a public key file of `quantmill registry keygen` "
                                 f"({type(e).__name__}: {e})") from None
    return keys


def sign(payload: bytes, signer) -> bytes:
    """The DSSE envelope (JSON bytes) of ``payload`` signed by ``signer``."""
    from securesystemslib.dsse import Envelope

    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(signer)
    return json.dumps(envelope.to_dict(), indent=1, sort_keys=True).encode() + b"\n"


def verify(payload: bytes, envelope_bytes: bytes, keys: list, *, what: str) -> str:
    """Check ``envelope_bytes`` signs exactly ``payload`` with one of ``keys``; return the signing key id.

    Raises:
        SignatureError: one line naming ``what`` and the reason.
    """
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError

    if not keys:
        raise SignatureError(f"{what}: no trusted keys to verify its signature with; set publish.trusted_keys (the "
                             f"publisher's .pub.json files)")
    try:
        envelope = Envelope.from_dict(json.loads(envelope_bytes))
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{what}: signature file is not a DSSE envelope ({type(e).__name__})") from None
    if envelope.payload_type != PAYLOAD_TYPE or envelope.payload != payload:
        raise SignatureError(f"{what}: the signature is over other bytes than the provenance record published "
                             f"beside it (the record or the signature was altered)")
    try:
        accepted = envelope.verify(keys, 1)
    except VerificationError:
        signed_by = ", ".join(sorted(envelope.signatures)) or "nobody"
        raise SignatureError(f"{what}: signature does not verify with any trusted key (signed by key "
                             f"{signed_by[:16]}…; trusted: {', '.join(k.keyid[:16] + '…' for k in keys)})") from None
    return next(iter(accepted))
