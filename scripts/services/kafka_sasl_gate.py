#!/usr/bin/env python3
"""A SASL gate in front of a Kafka-protocol broker that has no SASL of its
own: it authenticates each connection with PLAIN, SCRAM-SHA-256 or
SCRAM-SHA-512 (RFC 4616, RFC 5802/7677), verifying the password, then
passes every frame through to the broker unchanged.

    kafka_sasl_gate.py --listen 127.0.0.1:P --upstream 127.0.0.1:Q \
        --user NAME:PASSWORD [--user ...]

Why: the Tansu build the tests use cannot accept a SASL login (no PLAIN
mechanism; SCRAM credentials are not stored by its only storage engine:
see kafka-tls-start.sh), while evictd's users run SASL_SSL with PLAIN
(Confluent Cloud) or SCRAM (MSK). kafka-tls-start.sh puts stunnel (TLS) in
front of this gate, so a client sees what a managed broker offers: TLS,
then the SASL exchange, then Kafka.

Protocol (https://kafka.apache.org/protocol#sasl_handshake): a client sends
ApiVersions (passed through: the broker advertises SaslHandshake v0-1 and
SaslAuthenticate v0-2), SaslHandshake v1 naming its mechanism (answered
here), then SaslAuthenticate v0/v1 frames carrying the SASL exchange
(answered here). Any other request before a successful login closes the
connection, as a Kafka broker does. A failed login answers
SASL_AUTHENTICATION_FAILED (58) with Kafka's own wording, then closes.
Standard library only; prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import struct

SASL_HANDSHAKE, SASL_AUTHENTICATE, API_VERSIONS = 17, 36, 18
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED, ILLEGAL_SASL_STATE = 33, 58, 34
MECHANISMS = {"PLAIN": None, "SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}
ITERATIONS = 4096


def string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def parse_header(frame: bytes) -> tuple[int, int, int, int]:
    """api key, version, correlation id, offset of the body (request
    header v1: SaslHandshake v1 and SaslAuthenticate v0-1 are not flexible)."""
    api_key, version, correlation = struct.unpack(">hhi", frame[:8])
    (n,) = struct.unpack(">h", frame[8:10])
    return api_key, version, correlation, 10 + max(n, 0)


class Scram:
    """The server side of one SCRAM exchange."""

    def __init__(self, digest, users: dict[str, str]):
        self.digest, self.users = digest, users
        self.step = 0

    def hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.digest).digest()

    def first(self, message: str) -> str:
        # gs2 header "n,," or "n,a=authzid,", then client-first-bare.
        parts = message.split(",", 2)
        self.client_first_bare = parts[2]
        attrs = dict(a.split("=", 1) for a in self.client_first_bare.split(","))
        self.user, self.nonce = attrs["n"], attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        self.salt = os.urandom(16)
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={ITERATIONS}"
        return self.server_first

    def final(self, message: str) -> str | None:
        """The server-final message, or None when the proof is wrong."""
        without_proof, proof = message.rsplit(",p=", 1)
        attrs = dict(a.split("=", 1) for a in without_proof.split(","))
        password = self.users.get(self.user)
        if attrs.get("r") != self.nonce or password is None:
            return None
        salted = hashlib.pbkdf2_hmac(self.digest().name, password.encode(), self.salt, ITERATIONS)
        client_key = self.hmac(salted, b"Client Key")
        stored_key = self.digest(client_key).digest()
        auth_message = ",".join([self.client_first_bare, self.server_first, without_proof]).encode()
        signature = self.hmac(stored_key, auth_message)
        given = base64.b64decode(proof)
        recovered = bytes(a ^ b for a, b in zip(given, signature))
        if len(given) != len(signature) or not hmac.compare_digest(self.digest(recovered).digest(), stored_key):
            return None
        server_key = self.hmac(salted, b"Server Key")
        return "v=" + base64.b64encode(self.hmac(server_key, auth_message)).decode()


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(client_r, client_w, upstream: tuple[str, int], users: dict[str, str]) -> None:
    up_r, up_w = await asyncio.open_connection(*upstream)
    back = asyncio.create_task(pump(up_r, client_w))
    mechanism, scram, authenticated = None, None, False

    def answer(correlation: int, body: bytes) -> None:
        client_w.write(frame(struct.pack(">i", correlation) + body))

    try:
        while True:
            request = await read_frame(client_r)
            if authenticated:
                up_w.write(frame(request))
                await up_w.drain()
                continue
            api_key, version, correlation, at = parse_header(request)
            if api_key == API_VERSIONS:
                up_w.write(frame(request))
                await up_w.drain()
            elif api_key == SASL_HANDSHAKE:
                (n,) = struct.unpack(">h", request[at : at + 2])
                asked = request[at + 2 : at + 2 + n].decode()
                code = 0 if asked in MECHANISMS else UNSUPPORTED_SASL_MECHANISM
                mechanism = asked if code == 0 else None
                names = list(MECHANISMS)
                answer(correlation, struct.pack(">hi", code, len(names)) + b"".join(string(m) for m in names))
                await client_w.drain()
                if code:
                    return
            elif api_key == SASL_AUTHENTICATE and mechanism is not None and version <= 1:
                (n,) = struct.unpack(">i", request[at : at + 4])
                token = request[at + 4 : at + 4 + n]
                reply, ok, done = b"", True, True
                if mechanism == "PLAIN":
                    _, user, password = token.split(b"\0", 2)
                    ok = users.get(user.decode()) == password.decode()
                else:
                    if scram is None:
                        scram = Scram(MECHANISMS[mechanism], users)
                        reply, done = scram.first(token.decode()).encode(), False
                    else:
                        final = scram.final(token.decode())
                        ok, reply = final is not None, (final or "").encode()
                lifetime = struct.pack(">q", 0) if version >= 1 else b""
                if not ok:
                    message = (
                        "Authentication failed during authentication due to invalid credentials "
                        f"with SASL mechanism {mechanism}"
                    )
                    answer(correlation, struct.pack(">h", SASL_AUTHENTICATION_FAILED) + string(message)
                           + struct.pack(">i", 0) + lifetime)
                    await client_w.drain()
                    return
                answer(correlation, struct.pack(">h", 0) + string(None) + struct.pack(">i", len(reply)) + reply + lifetime)
                await client_w.drain()
                authenticated = done
            else:
                # Kafka closes a connection that skips authentication.
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, KeyError, struct.error):
        return
    finally:
        up_w.close()
        client_w.close()
        back.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port (loopback)")
    parser.add_argument("--upstream", required=True, help="the broker's host:port")
    parser.add_argument("--user", action="append", default=[], help="NAME:PASSWORD (repeat)")
    args = parser.parse_args()
    users = dict(u.split(":", 1) for u in args.user)
    host, port = args.listen.rsplit(":", 1)
    if not host.startswith("127."):
        raise SystemExit("--listen must be a loopback address")
    up_host, up_port = args.upstream.rsplit(":", 1)
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, (up_host, int(up_port)), users), host, int(port)
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
