"""TLS with a self-signed certificate made here, and bearer-token auth."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testkit.router_harness import RouterHarness

from batonserve.cluster.config import AuthConfig, RouterConfig, TLSConfig
from batonserve.cluster.router.auth import load_token
from batonserve.cluster.schema import ConfigError
from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc

REQ = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=3))


def _self_signed(dir_: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = dir_ / "cert.pem", dir_ / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls(make_router: Callable[..., RouterHarness], tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    tls = TLSConfig(cert_file=str(cert_file), key_file=str(key_file))
    h = make_router(router_config=RouterConfig(tls=tls))
    creds = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
    stub = generation_pb2_grpc.GenerationStub(h.channel(creds))
    msgs = list(stub.Generate(REQ, timeout=10))
    assert sum(len(m.token_ids) for m in msgs) == 3
    # A plaintext client cannot talk to the TLS port.
    with pytest.raises(grpc.RpcError) as info:
        list(h.stub().Generate(REQ, timeout=3))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_config_errors(tmp_path: Path) -> None:
    from batonserve.cluster.router.server import server_credentials

    with pytest.raises(ConfigError, match=r"router\.tls: set both"):
        server_credentials(TLSConfig(cert_file="a.pem"))
    with pytest.raises(ConfigError, match=r"router\.tls\.key_file: cannot read"):
        server_credentials(TLSConfig(cert_file="a.pem", key_file=str(tmp_path / "none.pem")))


def test_bearer_token(make_router: Callable[..., RouterHarness]) -> None:
    h = make_router(token="s3cret")
    stub = h.stub()
    for metadata, why in [
        ((), "missing authorization"),
        ((("authorization", "Bearer wrong"),), "invalid bearer token"),
        ((("authorization", "s3cret"),), "invalid bearer token"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(REQ, timeout=5, metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert why in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert h.cluster.requests == []
    good = (("authorization", "Bearer s3cret"),)
    assert sum(len(m.token_ids) for m in stub.Generate(REQ, timeout=5, metadata=good)) == 3
    # Health stays open for probes.
    health = health_pb2_grpc.HealthStub(h.channel())
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_load_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    assert load_token(AuthConfig(token_file=str(token_file)), {}) == "abc"
    assert load_token(AuthConfig(token_env="BS_TOKEN"), {"BS_TOKEN": "xyz"}) == "xyz"
    assert load_token(AuthConfig(), {"BS_TOKEN": "xyz"}) is None
    with pytest.raises(
        ConfigError, match=r"router.auth.token_env \(\$BS_TOKEN\): the token is empty"
    ):
        load_token(AuthConfig(token_env="BS_TOKEN"), {})
    with pytest.raises(ConfigError, match=r"router\.auth\.token_file: cannot read"):
        load_token(AuthConfig(token_file=str(tmp_path / "missing")), {})
    with pytest.raises(ConfigError, match="not both"):
        load_token(AuthConfig(token_file=str(token_file), token_env="X"), {})
