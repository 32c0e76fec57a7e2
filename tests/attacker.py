"""An outsider on the cluster's LAN, without the cluster secret, for tests/test_attacker.py.

Run inside one host of a test cluster (`host.popen([python, "-m", "tests.attacker", ...])`).
Every mode prints JSON lines, one per event, to stdout or to `--log`:

    listen  --address IP --log FILE
        Announce `_hsmdif._tcp.local.` twice, at a plaintext gRPC port and at a TLS gRPC
        port with a self-signed certificate, and record every connection (who, and its
        first bytes), every call and all its metadata. Prints `ready` when announced;
        runs until SIGTERM (then sends its mDNS goodbyes).
    flood   --address IP --count N --seconds S [--hold]
        Announce N services with random names and ids in about S seconds, each at its own
        port, by unsolicited mDNS answers; then send a goodbye for each (with --hold, only
        once stdin is closed).
    relay   --address IP --to HOST:PORT --count N --log FILE
        Announce N services at ports of this host that pass TCP on to HOST:PORT (a real
        device's peer port), recording each connection and when it closes. Runs until
        SIGTERM (then sends its mDNS goodbyes).
    goodbye --address IP --wait S [--rounds N]
        Browse for S seconds and send a forged goodbye for every service seen; with
        --rounds, N times, announcing each anew (as it was) before its next goodbye.
    replay  --spec FILE
        Send the calls in FILE (a JSON list) and print how each ended. Each call names its
        target, method, body (hex) and metadata, and how to connect: "self-signed" (this
        outsider's own certificate) or "relay" (the certificate of a device holding the
        secret, named by "secret_file" and "node_id": a relay passing captured proofs on).
    probe   (reads `IP PORT [tls SECRET_FILE NODE_ID]` lines on stdin)
        Send a llama.cpp RPC HELLO to each and say whether it was answered.
    sniff   --interface IF --log FILE
        Capture every frame on IF (a raw AF_PACKET socket) and write the TCP payloads to
        or from port 9999 and the UDP payloads on port 5353. Runs until SIGTERM.

The only things it knows are public: the proto, the service type, the ports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import secrets
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TextIO

SERVICE_TYPE = "_hsmdif._tcp.local."
PEER_PORT = 9999
RPC_CMD_HELLO = 14
HELLO_REQUEST_BYTES = 24  # llama.cpp RPC protocol 7: the request carries connection caps
_lock = threading.Lock()


def emit(out: TextIO, **event: Any) -> None:
    with _lock:
        out.write(json.dumps(event) + "\n")
        out.flush()


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


# ------------------------------------------------------------------ listen


def self_signed() -> tuple[bytes, bytes]:
    """A key and certificate of our own, for the name every device expects ("hsmdif")."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsmdif")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hsmdif")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _recorder(out: TextIO, transport: str) -> Any:
    """A gRPC handler for every method: record the call, answer Hello with a bogus proof."""
    import grpc

    from hsmdif.proto import hsmdif_pb2 as pb

    def behaviour(method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = [[k, _text(v)] for k, v in context.invocation_metadata()]
        emit(
            out,
            event="call",
            transport=transport,
            peer=context.peer(),
            method=method,
            metadata=metadata,
            body=request.hex(),
        )
        if method.endswith("/Hello"):
            reply = pb.HelloReply(protocol_version=2, node_id="attacker", proof="0" * 64)
            return reply.SerializeToString()
        return b""

    class Everything(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, handler_call_details: Any) -> Any:
            method = _text(handler_call_details.method)
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: behaviour(method, request, context)
            )

    return Everything()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def _front(out: TextIO, listener: socket.socket, backend: int, transport: str) -> None:
    """Accept on the announced port, record who knocked and their first bytes, and pass
    the connection on to the gRPC server behind (on loopback)."""
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        conn.settimeout(2.0)
        try:
            first = conn.recv(16)
        except OSError:
            first = b""
        conn.settimeout(None)
        emit(out, event="connect", transport=transport, peer=peer[0], first=first.hex())
        try:
            inner = socket.create_connection(("127.0.0.1", backend))
            inner.sendall(first)
        except OSError:
            conn.close()
            continue
        threading.Thread(target=_pump, args=(conn, inner), daemon=True).start()
        threading.Thread(target=_pump, args=(inner, conn), daemon=True).start()


def _listening_socket(address: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, 0))
    s.listen(64)
    return s


def listen(args: argparse.Namespace) -> None:
    import grpc
    from zeroconf import IPVersion, Zeroconf

    stop = _stop_on_sigterm()
    out = open(args.log, "a")  # noqa: SIM115 (open for the whole run)
    key_pem, cert_pem = self_signed()
    servers = []
    ports: dict[str, int] = {}
    for transport in ("plain", "tls"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers([_recorder(out, transport)])
        if transport == "plain":
            backend = server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
            backend = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        servers.append(server)
        listener = _listening_socket(args.address)
        ports[transport] = listener.getsockname()[1]
        threading.Thread(
            target=_front, args=(out, listener, backend, transport), daemon=True
        ).start()
    zc = Zeroconf(interfaces=[args.address], ip_version=IPVersion.V4Only)
    infos = _announce(zc, args.address, list(ports.values()), "attacker")
    emit(out, event="announced", ports=ports)
    print("ready", flush=True)
    stop.wait()
    for info in infos:
        zc.unregister_service(info)
    zc.close()
    for server in servers:
        server.stop(0)


def _txt(node_id: str, port: int) -> dict[str, str]:
    return {"id": node_id, "pv": "2", "port": str(port), "mem": "65536", "spd": "99.0", "polv": "0"}


def _announce(zc: Any, address: str, ports: list[int], prefix: str) -> list[Any]:
    from zeroconf import ServiceInfo

    infos = []
    for port in ports:
        node_id = f"{prefix}-{secrets.token_hex(4)}"
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{node_id}.{SERVICE_TYPE}",
            port=port,
            properties=_txt(node_id, port),
            parsed_addresses=[address],
            server=f"{node_id}.local.",
        )
        zc.register_service(info, allow_name_change=True)
        infos.append(info)
    return infos


def _forward(out: TextIO, listener: socket.socket, target: tuple[str, int]) -> None:
    port = listener.getsockname()[1]
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        emit(out, event="connect", port=port, peer=peer[0])
        try:
            inner = socket.create_connection(target, timeout=2)
            inner.settimeout(None)
        except OSError:
            conn.close()
            continue

        def both(conn: socket.socket = conn, inner: socket.socket = inner) -> None:
            back = threading.Thread(target=_pump, args=(inner, conn), daemon=True)
            back.start()
            _pump(conn, inner)
            back.join()
            emit(out, event="closed", port=port)

        threading.Thread(target=both, daemon=True).start()


def relay(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion, Zeroconf

    stop = _stop_on_sigterm()
    out = open(args.log, "a")  # noqa: SIM115
    host, port = args.to.rsplit(":", 1)
    listeners = [_listening_socket(args.address) for _ in range(args.count)]
    for listener in listeners:
        threading.Thread(
            target=_forward, args=(out, listener, (host, int(port))), daemon=True
        ).start()
    zc = Zeroconf(interfaces=[args.address], ip_version=IPVersion.V4Only)
    infos = _announce(zc, args.address, [s.getsockname()[1] for s in listeners], "relay")
    print("ready", flush=True)
    stop.wait()
    for info in infos:
        zc.unregister_service(info)
    zc.close()


# ------------------------------------------------------------------ flood and goodbyes


def _send_records(zc: Any, infos: list[Any], ttl: int | None) -> None:
    """Unsolicited mDNS answers for `infos` (a goodbye with ttl 0)."""
    from zeroconf import const
    from zeroconf._protocol.outgoing import DNSOutgoing

    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for info in infos:
        out.add_answer_at_time(info.dns_pointer(override_ttl=ttl), 0)
        out.add_answer_at_time(info.dns_service(override_ttl=ttl), 0)
        out.add_answer_at_time(info.dns_text(override_ttl=ttl), 0)
        for record in info.dns_addresses(override_ttl=ttl):
            out.add_answer_at_time(record, 0)
    zc.send(out)


def flood(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    zc = Zeroconf(interfaces=[args.address], ip_version=IPVersion.V4Only)
    infos = []
    for i in range(args.count):
        node_id = secrets.token_hex(8)
        port = 20000 + i
        infos.append(
            ServiceInfo(
                SERVICE_TYPE,
                f"flood-{node_id}.{SERVICE_TYPE}",
                port=port,
                properties=_txt(node_id, port),
                parsed_addresses=[args.address],
                server=f"flood-{node_id}.local.",
            )
        )
    started = time.monotonic()
    for i, info in enumerate(infos):
        _send_records(zc, [info], None)
        time.sleep(max(0.0, started + (i + 1) * args.seconds / args.count - time.monotonic()))
    announced = time.monotonic() - started
    if args.hold:
        print(json.dumps({"holding": len(infos)}), flush=True)
        sys.stdin.read()
    for batch in range(0, len(infos), 10):
        _send_records(zc, infos[batch : batch + 10], 0)
    print(json.dumps({"announced": len(infos), "seconds": round(announced, 2)}), flush=True)
    zc.close()


def goodbye(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    zc = Zeroconf(interfaces=[args.address], ip_version=IPVersion.V4Only)
    names: set[str] = set()

    def seen(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:
            names.add(name)

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[seen])
    time.sleep(args.wait)
    browser.cancel()
    infos = []
    for name in sorted(names):
        info = ServiceInfo(SERVICE_TYPE, name)
        if info.request(zc, 3000):
            infos.append(info)
    for round in range(args.rounds):
        if round:  # the name is known again, so that its goodbye counts again
            _send_records(zc, infos, None)
            time.sleep(0.5)
        for _ in range(3):  # as a real goodbye does
            _send_records(zc, infos, 0)
            time.sleep(0.25)
        time.sleep(1.0)  # the records expire a second after a goodbye
    print(json.dumps({"goodbyes": [i.name for i in infos]}), flush=True)
    zc.close()


# ------------------------------------------------------------------ replay


def _relay_credentials(secret_file: str, node_id: str) -> Any:
    """The TLS credentials of a device holding the secret (the test's own, not ours)."""
    import tempfile

    from hsmdifd.cluster import cluster_secret, tls

    secret = cluster_secret.load_secret(Path(secret_file))
    return tls.device_credentials(secret, node_id, Path(tempfile.mkdtemp(prefix="relay-")))


def replay(args: argparse.Namespace) -> None:
    import grpc

    from hsmdifd.cluster import tls

    key_pem, cert_pem = self_signed()
    own = grpc.ssl_channel_credentials(
        root_certificates=cert_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    for call in json.loads(Path(args.spec).read_text()):
        if call["via"] == "relay":
            creds = _relay_credentials(call["secret_file"], call["node_id"])
            channel_creds = tls.channel_credentials(creds)
        else:
            channel_creds = own
        with grpc.secure_channel(
            call["target"], channel_creds, options=tls.CHANNEL_OPTIONS
        ) as channel:
            stub = channel.unary_unary(
                call["method"], request_serializer=None, response_deserializer=None
            )
            try:
                reply, _ = stub.with_call(
                    bytes.fromhex(call["body"]),
                    metadata=tuple((str(k), str(v)) for k, v in call["metadata"]),
                    timeout=5,
                )
                result = {"code": "OK", "details": "", "reply": reply.hex()}
            except grpc.RpcError as e:
                result = {"code": e.code().name, "details": e.details() or ""}
        print(json.dumps({**call, **result}), flush=True)


# ------------------------------------------------------------------ probe


def hello(
    address: str, port: int, wrap: Callable[[socket.socket], socket.socket] | None = None
) -> dict[str, Any]:
    """Send a llama.cpp RPC HELLO; `answered` when a reply with a version came back."""
    result: dict[str, Any] = {"address": address, "port": port, "answered": False}
    try:
        with socket.create_connection((address, port), timeout=0.5) as raw:
            conn = wrap(raw) if wrap else raw
            conn.settimeout(1.0)
            request = bytes([RPC_CMD_HELLO]) + struct.pack("<Q", HELLO_REQUEST_BYTES)
            conn.sendall(request + bytes(HELLO_REQUEST_BYTES))
            reply = b""
            with contextlib.suppress(OSError):
                while len(reply) < 11 and (chunk := conn.recv(64)):
                    reply += chunk
            result["reply"] = reply.hex()
            if len(reply) >= 11:
                size = struct.unpack("<Q", reply[:8])[0]
                result["answered"] = 3 <= size <= 4096
                result["version"] = list(reply[8:11])
    except (OSError, ssl.SSLError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def probe(args: argparse.Namespace) -> None:
    for line in sys.stdin:
        fields = line.split()
        if not fields:
            continue
        address, port = fields[0], int(fields[1])
        wrap = None
        if len(fields) == 5 and fields[2] == "tls":
            from hsmdifd.cluster import tls

            context = tls.client_context(_relay_credentials(fields[3], fields[4]))

            def wrap(s: socket.socket, context: ssl.SSLContext = context) -> socket.socket:
                return context.wrap_socket(s, server_hostname=tls.TARGET_NAME)

        print(json.dumps({**hello(address, port, wrap), "via": fields[2:3]}), flush=True)


# ------------------------------------------------------------------ sniff


def _frames(interface: str, stop: threading.Event) -> Iterator[bytes]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((interface, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    while not stop.is_set():
        ready, _, _ = select.select([s], [], [], 0.1)
        if ready:
            yield s.recv(65535)


def sniff(args: argparse.Namespace) -> None:
    stop = _stop_on_sigterm()
    out = open(args.log, "a")  # noqa: SIM115
    print("ready", flush=True)
    for frame in _frames(args.interface, stop):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header, proto = (ip[0] & 0x0F) * 4, ip[9]
        body = ip[header : struct.unpack("!H", ip[2:4])[0]]
        if proto == 6 and len(body) >= 20:
            sport, dport = struct.unpack("!HH", body[:4])
            payload = body[(body[12] >> 4) * 4 :]
            if payload and PEER_PORT in (sport, dport):
                emit(out, proto="tcp", sport=sport, dport=dport, payload=payload.hex())
        elif proto == 17 and len(body) >= 8:
            sport, dport = struct.unpack("!HH", body[:4])
            if 5353 in (sport, dport):
                emit(out, proto="udp", sport=sport, dport=dport, payload=body[8:].hex())


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.attacker")
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("listen")
    p.add_argument("--address", required=True)
    p.add_argument("--log", required=True)
    p = modes.add_parser("flood")
    p.add_argument("--address", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--hold", action="store_true")
    p = modes.add_parser("relay")
    p.add_argument("--address", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--log", required=True)
    p = modes.add_parser("goodbye")
    p.add_argument("--address", required=True)
    p.add_argument("--wait", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=1)
    p = modes.add_parser("replay")
    p.add_argument("--spec", required=True)
    modes.add_parser("probe")
    p = modes.add_parser("sniff")
    p.add_argument("--interface", required=True)
    p.add_argument("--log", required=True)
    args = parser.parse_args()
    {
        "listen": listen,
        "flood": flood,
        "relay": relay,
        "goodbye": goodbye,
        "replay": replay,
        "probe": probe,
        "sniff": sniff,
    }[args.mode](args)


if __name__ == "__main__":
    main()
