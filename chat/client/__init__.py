"""The chat client: a thread-safe library (ChatClient), the `chat-client` CLI and its UI.

    from chat.client import ChatClient, raise_for_error
    from chat.tls import client_context

    with ChatClient.connect("chat.example", 7072, ssl_context=client_context("ca.crt")) as c:
        raise_for_error(c.login("alice", password))
        raise_for_error(c.say("general", "hello"))
        for frame in c.events(idle=30):  # what the server says; ends after 30 quiet s
            ...

What `request` returns, what `events` yields and how sending is paced: see the docstring
of chat.client.connection. `SecureClient` is the same with end-to-end encryption (what
`chat-client` runs on): direct messages to anyone with a device, and messages in
encrypted rooms, are encrypted, and what it yields is decrypted (chat.client.secureclient).
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
from chat.client.secureclient import SecureClient

__all__ = [
    "CertificateNotTrusted",
    "ChatClient",
    "ClientCertificateRefused",
    "ClientError",
    "ConnectFailed",
    "ConnectionClosed",
    "IncompatibleServer",
    "SecureClient",
    "ServerError",
    "ServerLimits",
    "TLSFailed",
    "TimedOut",
    "raise_for_error",
    "split_message",
]
