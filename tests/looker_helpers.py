"""Helpers shared by the Looker stand-in and Looker hook tests (a plain module, imported by name)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standins.looker_standin import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

CLIENT_ID = DEFAULT_CLIENT_ID
CLIENT_SECRET = DEFAULT_CLIENT_SECRET


def connection_json(host: str, login: str = CLIENT_ID, password: str = CLIENT_SECRET, **extra: Any) -> str:
    """Return an Airflow connection in JSON form (for an ``AIRFLOW_CONN_<ID>`` variable)."""
    conn: dict[str, Any] = {"conn_type": "looker", "host": host, "login": login, "password": password}
    if extra:
        conn["extra"] = extra
    return json.dumps(conn)


def unmodified_sdk(base_url: str, monkeypatch: Any) -> Any:
    """The unmodified looker_sdk against ``base_url``, configured the documented way (LOOKERSDK_* env)."""
    import looker_sdk

    monkeypatch.setenv("LOOKERSDK_BASE_URL", base_url)
    monkeypatch.setenv("LOOKERSDK_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("LOOKERSDK_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("LOOKERSDK_TIMEOUT", "10")
    return looker_sdk.init40()


def set_connection(monkeypatch: Any, conn_id: str, value: str) -> None:
    """Define connection ``conn_id`` through its ``AIRFLOW_CONN_<ID>`` environment variable."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)


def make_self_signed_cert(directory: Path) -> tuple[str, str]:
    """Write a self-signed certificate for 127.0.0.1 / localhost and its key; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "looker-standin.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "standin.crt", directory / "standin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


class _HtmlHandler(BaseHTTPRequestHandler):
    """Answers every request with an HTML page and status 200 (a web server that is not Looker's API)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<html><body>Welcome to our intranet</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer


@contextmanager
def html_server() -> Iterator[str]:
    """Run a server that answers HTML to everything; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def trigger_events(trigger: Any) -> list[Any]:
    """Run a trigger to its end (as the triggerer does, without the triggerer); return every event."""
    return [event async for event in trigger.run()]


def only_event(trigger: Any) -> Any:
    """Run a trigger with ``asyncio.run`` and return its event, checking it fired exactly one."""
    events = asyncio.run(trigger_events(trigger))
    assert len(events) == 1, events
    return events[0]
