"""The chat client: a thread-safe library (ChatClient), the `chat-client` CLI and its UI.

    from chat.client import ChatClient, raise_for_error
    from chat.tls import client_context

    with ChatClient.connect("chat.example", 7072, ssl_context=client_context("ca.crt")) as c:
        raise_for_error(c.login("alice", password))
        c.say("general", "hello")
        for frame in c.events(timeout=30):
            ...
"""

from chat.client.connection import ChatClient
from chat.client.errors import (
    CertificateNotTrusted,
    ClientCertificateRefused,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    IncompatibleServer,
    ServerError,
    TimedOut,
    TLSFailed,
    raise_for_error,
)
from chat.client.limits import ServerLimits, split_message

__all__ = [
    "CertificateNotTrusted",
    "ChatClient",
    "ClientCertificateRefused",
    "ClientError",
    "ConnectFailed",
    "ConnectionClosed",
    "IncompatibleServer",
    "ServerError",
    "ServerLimits",
    "TLSFailed",
    "TimedOut",
    "raise_for_error",
    "split_message",
]
