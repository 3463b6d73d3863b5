"""The links to a GPU server: TLS on TCP, the per-user Unix socket, the mutual token challenge."""

from __future__ import annotations

import os
import ssl
import stat

import pytest
import torch

import caserve.remote as R
from caserve.remote.server import GPUServer, Listener
from caserve.remote.wire import protocol as P
from caserve.remote.wire.transport import SocketChannel, default_unix_path, owned_socket, unix_dir
from serving_procs import self_signed_cert


@pytest.fixture
def tls_listener(cert):
    server = GPUServer("cpu", token="link-token")
    listener = Listener(server, "127.0.0.1", 0, unix_socket=None, tls_cert=cert[0], tls_key=cert[1]).start()
    yield listener
    listener.stop()


def test_tls_carries_the_session_and_checks_the_certificate(tls_listener, cert, tmp_path):
    dev = R.connect(tls_listener.address, token="link-token", transport="tcp", tls_ca=cert[0])
    try:
        assert (torch.arange(4.0, device=dev) * 2).tolist() == [0.0, 2.0, 4.0, 6.0]
        big = torch.randn(300_000)  # payloads of more than one TLS record
        assert torch.equal(big.to(dev).cpu(), big)
    finally:
        R.disconnect(dev)
    # A client that trusts another CA refuses the server.
    other, _ = self_signed_cert(tmp_path, "other", cn="x")
    with pytest.raises(ssl.SSLError):
        SocketChannel.connect(tls_listener.address, transport="tcp", tls_ca=str(other))


def test_a_plain_client_gets_nothing_from_a_tls_server(tls_listener):
    ch = SocketChannel.connect(tls_listener.address, transport="tcp")
    ch.sock.settimeout(15)
    with pytest.raises(Exception):
        ch.send(P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION))
        ch.recv()
    ch.close()


def test_the_unix_socket_is_private_to_its_user_and_removed_on_stop():
    listener = Listener(GPUServer("cpu"), "127.0.0.1", 0).start()
    path = default_unix_path(listener.port)
    try:
        assert os.path.dirname(path) == unix_dir()
        assert stat.S_IMODE(os.stat(unix_dir()).st_mode) == 0o700
        assert owned_socket(path)
        ch = SocketChannel.connect(listener.address)
        assert ch.kind == "unix"
        ch.close()
    finally:
        listener.stop()
    assert not os.path.exists(path)


def test_a_client_refuses_a_socket_in_a_directory_others_can_enter(tmp_path, monkeypatch):
    listener = Listener(GPUServer("cpu"), "127.0.0.1", 0).start()
    try:
        os.chmod(unix_dir(), 0o755)  # as if another user had made the directory for us
        assert not owned_socket(default_unix_path(listener.port))
        ch = SocketChannel.connect(listener.address)
        assert ch.kind == "tcp"  # not the doubtful socket
        ch.close()
    finally:
        os.chmod(unix_dir(), 0o700)
        listener.stop()


def test_the_client_checks_that_the_server_knows_the_token():
    from caserve.remote.client.session import Session
    from caserve.remote.local import LocalChannel
    from caserve.remote.wire.errors import HandshakeError

    server = GPUServer("cpu", token="the-token")
    Session.open(LocalChannel(server), "the-token", 0).channel.close()  # a server that knows it: accepted

    # An impostor accepts anyone (it does not know the token, so it asks for none) and cannot prove it.
    impostor = GPUServer("cpu")
    with pytest.raises(HandshakeError, match="prove"):
        Session.open(LocalChannel(impostor), "the-token", 1)
