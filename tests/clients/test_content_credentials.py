"""C2PA content credentials, read and validated by an independent reader (the `c2pa-python` package) against a
certificate chain this test makes: a root CA and a signing certificate under it (the `cryptography` package).

(a) every output format (PNG, JPEG, WebP) carries a manifest that validates as `Trusted` with the test root as
    the only trust anchor, names `denoised` and its version as the claim generator, records `c2pa.created` with
    the digital source type `trainedAlgorithmicMedia`, and names the model, the job, the seed and the SHA-256
    of the job's `params` (recomputed here from `GET /v1/jobs/{id}`);
(b) an edit of a signed output records the picture it was sent as its `parentOf` ingredient, with that
    picture's own manifest kept in the history;
(c) changing one pixel of a signed picture makes validation fail;
(d) a server whose key does not match its certificate refuses to start and says why;
(e) without `[content_credentials]`, outputs carry no manifest.
"""

import base64
import datetime
import hashlib
import io
import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

import c2pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from conftest import ROOT, _config, finished_job, running_server

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "denoised tests")]
    )


def _certificate(subject: str, issuer: x509.Name | None, public_key, signing_key, ca: bool, extensions):
    """A certificate for `subject` valid from yesterday for 30 days, issued by `issuer` (None: itself) and
    signed with `signing_key`, with its basic constraints, subject key id and `extensions` (each a pair of an
    extension and whether it is critical)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer or _name(subject))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def make_chain(folder: Path) -> tuple[Path, Path, str]:
    """A root CA and an ES256 signing certificate it issued: (chain file, key file, root PEM)."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    root = _certificate(
        "denoised test root", None, root_key.public_key(), root_key, True, [(root_usage, True)]
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(
        "denoised test signer",
        root.subject,
        key.public_key(),
        root_key,
        False,
        [
            (x509.KeyUsage(True, False, False, False, False, False, False, False, False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False),
        ],
    )
    chain = folder / "chain.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file = folder / "key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return chain, key_file, root.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def chain():
    with tempfile.TemporaryDirectory() as tmp:
        yield make_chain(Path(tmp))


@pytest.fixture(scope="module")
def signing_server(chain):
    chain_file, key_file, _ = chain
    extra = f'\n[content_credentials]\ncertificate_chain = "{chain_file}"\nprivate_key = "{key_file}"\n'
    with running_server(extra) as started:
        yield started


def reader_context(root_pem: str) -> c2pa.Context:
    """An independent reader that trusts the test root and nothing else."""
    return c2pa.Context(settings=c2pa.Settings.from_dict({"trust": {"trust_anchors": root_pem}, "verify": {"verify_trust": True}}))


def read(data: bytes, mime: str, root_pem: str) -> dict:
    reader = c2pa.Reader(mime, io.BytesIO(data), context=reader_context(root_pem))
    return json.loads(reader.json())


def parameters_sha256(params: dict) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def assertion(manifest: dict, label: str) -> dict:
    found = [a["data"] for a in manifest["assertions"] if a["label"].startswith(label)]
    assert found, f"no {label} assertion in {[a['label'] for a in manifest['assertions']]}"
    return found[0]


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_output_format_carries_trusted_credentials_stating_how_it_was_made(signing_server, chain, output_format):
    base, key = signing_server
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7, "n": 2,
            "output_format": output_format}
    job, files = finished_job(base, key, "/v1/images", body)
    for index, data in enumerate(files):
        Image.open(io.BytesIO(data)).load()  # still a picture every decoder reads
        store = read(data, MIME[output_format], chain[2])
        assert store["validation_state"] == "Trusted", store.get("validation_status") or store.get("validation_results")
        manifest = active(store)
        generator = manifest["claim_generator_info"][0]
        assert generator["name"] == "denoised" and generator["version"], generator
        actions = assertion(manifest, "c2pa.actions")["actions"]
        created = [a for a in actions if a["action"] == "c2pa.created"]
        assert created and created[0]["digitalSourceType"] == TRAINED, actions
        generation = assertion(manifest, "org.denoised.generation")
        assert generation["model"] == job["model"]
        assert generation["job"] == job["id"]
        assert generation["image_index"] == index
        assert generation["seed"] == job["images"][index]["seed"]
        assert generation["parameters_sha256"] == parameters_sha256(job["params"])


def test_an_edit_records_the_picture_it_was_sent_with_that_pictures_credentials(signing_server, chain):
    base, key = signing_server
    _, (first,) = finished_job(base, key, "/v1/images", {"prompt": "a blue square", "steps": 2, "width": 64, "height": 64, "seed": 3})
    first_label = read(first, "image/png", chain[2])["active_manifest"]
    body = {"prompt": "a green square", "image": base64.b64encode(first).decode(), "mode": "img2img",
            "strength": 0.5, "steps": 4, "seed": 5}
    _, (edited,) = finished_job(base, key, "/v1/edits", body)
    store = read(edited, "image/png", chain[2])
    assert store["validation_state"] == "Trusted", store.get("validation_results")
    manifest = active(store)
    parents = [i for i in manifest["ingredients"] if i["relationship"] == "parentOf"]
    assert len(parents) == 1, manifest["ingredients"]
    assert parents[0].get("active_manifest") == first_label, parents[0]
    assert first_label in store["manifests"], "the input's own manifest is part of the history"
    names = [a["action"] for a in assertion(manifest, "c2pa.actions")["actions"]]
    assert "c2pa.opened" in names and "c2pa.edited" in names, names


def test_a_changed_pixel_fails_validation(signing_server, chain):
    base, key = signing_server
    _, (data,) = finished_job(base, key, "/v1/images", {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64,
                                                   "output_format": "png"})
    store = read(data, "image/png", chain[2])
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    r, g, b = picture.getpixel((10, 10))
    picture.putpixel((10, 10), ((r + 128) % 256, g, b))
    # Put the pixels back into the signed file (same chunks, new image data) by re-encoding only the IDAT.
    tampered = _replace_png_pixels(data, picture)
    tampered_store = read(tampered, "image/png", chain[2])
    assert store["validation_state"] == "Trusted"
    assert tampered_store["validation_state"] == "Invalid", tampered_store.get("validation_results")


def _replace_png_pixels(signed: bytes, picture: Image.Image) -> bytes:
    """`signed` with its image data chunks swapped for those of `picture`, every other chunk (the C2PA one
    included) kept in place."""
    def chunks(data: bytes):
        at = 8
        while at < len(data):
            (length,) = struct.unpack(">I", data[at:at + 4])
            kind = data[at + 4:at + 8]
            yield kind, data[at:at + 12 + length]
            at += 12 + length

    fresh = io.BytesIO()
    picture.save(fresh, format="PNG")
    new_idat = b"".join(raw for kind, raw in chunks(fresh.getvalue()) if kind == b"IDAT")
    out, replaced = [signed[:8]], False
    for kind, raw in chunks(signed):
        if kind == b"IDAT":
            if not replaced:
                out.append(new_idat)
                replaced = True
            continue
        out.append(raw)
    assert replaced, "the signed file had no image data"
    return b"".join(out)


def test_a_key_that_does_not_match_the_certificate_stops_the_start(chain):
    binary = Path(os.environ.get("SERVER_BINARY", ROOT / "target" / "debug" / "denoised"))
    with tempfile.TemporaryDirectory() as tmp:
        other_chain, other_key, _ = make_chain(Path(tmp))
        config = Path(tmp) / "config.toml"
        extra = f'\n[content_credentials]\ncertificate_chain = "{chain[0]}"\nprivate_key = "{other_key}"\n'
        config.write_text(_config(Path(tmp) / "data") + extra)
        env = dict(os.environ, RUST_LOG="warn")
        env.pop("ORT_DYLIB_PATH", None)
        started = subprocess.run([str(binary), "serve", "--config", str(config)], capture_output=True, text=True,
                                 env=env, timeout=120)
        assert started.returncode != 0
        assert "content credentials" in started.stderr, started.stderr[-2000:]


def test_without_content_credentials_outputs_carry_no_manifest(server, api_key, chain):
    _, (data,) = finished_job(server, api_key, "/v1/images", {"prompt": "a red circle", "steps": 2, "width": 64,
                                                        "height": 64})
    with pytest.raises(c2pa.C2paError):
        read(data, "image/png", chain[2])
