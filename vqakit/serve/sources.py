"""Where a request's image comes from, under the server's limits: base64, a file under a root, or a URL.

Each function returns the image file's bytes or raises ``RequestError`` with the HTTP status and a message
naming the problem. Decoding (and the pixel limit) happens afterwards, in ``vqakit.data.images.load_image``.

- ``image_path``: only inside ``ServeConfig.image_root``. The path is resolved (``..`` and symlinks
  followed) and must still lie inside the resolved root, so neither traversal nor a symlink points out of it;
  the file is then opened with ``O_NOFOLLOW``. Disabled unless a root is configured.
- ``image_url``: only ``http``/``https`` to hosts on ``ServeConfig.allowed_url_hosts``. The host is resolved
  once, every address it resolves to is checked (private, loopback, link-local, multicast and reserved
  ranges are refused unless ``allow_private_urls``), and the connection goes to that checked address (the
  ``Host`` header and TLS SNI carry the name), so a second DNS answer cannot redirect it (DNS rebinding).
  Redirects are followed by hand, to the same host only; size and time are capped. This follows the OWASP
  SSRF prevention cheat sheet (https://cheatsheetseries.owasp.org/cheatsheets/Server_Side_Request_Forgery_Prevention_Cheat_Sheet.html).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import urljoin

import httpx

from vqakit.serve.config import ServeConfig


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a message that names the field and the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _too_large(what: str, size: int | str, limit: int) -> RequestError:
    return RequestError(413, f"{what} is {size} bytes, more than max_upload_bytes={limit:,}")


# -- base64 ----------------------------------------------------------------------------------------------------------


def decode_base64(data: str, config: ServeConfig) -> bytes:
    """``image_base64`` -> bytes (an optional ``data:image/...;base64,`` prefix is accepted)."""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(400, "image_base64: a data: URL must look like data:image/png;base64,<data>")
    data = "".join(data.split())  # line breaks are common in base64 text
    if len(data) * 3 // 4 > config.max_upload_bytes + 2:
        raise _too_large("image_base64 decoded", f"about {len(data) * 3 // 4:,}", config.max_upload_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"image_base64 is not valid base64 ({err})") from err
    if not raw:
        raise RequestError(400, "image_base64 is empty")
    if len(raw) > config.max_upload_bytes:
        raise _too_large("image_base64 decoded", f"{len(raw):,}", config.max_upload_bytes)
    return raw


# -- image_path ------------------------------------------------------------------------------------------------------


def read_image_path(path: str, config: ServeConfig) -> bytes:
    """Read ``image_path`` from inside ``config.image_root``; refuses anything that resolves outside it."""
    if config.image_root is None:
        raise RequestError(403, "image_path is disabled on this server; start it with --server.image_root DIR to "
                                "serve images from DIR")
    if not path or "\x00" in path:
        raise RequestError(400, "image_path is empty or contains a NUL byte")
    root = Path(config.image_root).resolve()
    candidate = Path(path) if Path(path).is_absolute() else root / path
    try:
        resolved = candidate.resolve()  # follows .. and every symlink that exists
    except (OSError, RuntimeError) as err:  # a symlink loop, a too-long name
        raise RequestError(400, f"image_path {path!r} cannot be resolved ({err})") from err
    if not resolved.is_relative_to(root):
        raise RequestError(403, f"image_path {path!r} is outside the server's image root")
    if not resolved.is_file():
        raise RequestError(404, f"image_path {path!r} is not a file under the server's image root")
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno == errno.ELOOP:  # swapped for a symlink after the check
            raise RequestError(403, f"image_path {path!r} is a symlink") from err
        raise RequestError(404, f"image_path {path!r} cannot be opened ({err.strerror})") from err
    with os.fdopen(fd, "rb") as f:
        data = f.read(config.max_upload_bytes + 1)
    if len(data) > config.max_upload_bytes:
        raise _too_large(f"image_path {path!r}", f"more than {config.max_upload_bytes:,}", config.max_upload_bytes)
    return data


# -- image_url -------------------------------------------------------------------------------------------------------


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` is on the list: exactly, or under an entry that starts with a dot (``.example.com``).

    >>> host_allowed("img.example.com", [".example.com"]), host_allowed("evil-example.com", [".example.com"])
    (True, False)
    """
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:]))
               for entry in allowed)


def address_forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a connection to ``ip`` is refused without ``allow_private_urls`` (None: it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


async def _resolve(host: str, port: int, config: ServeConfig) -> str:
    try:
        literal = ipaddress.ip_address(host)
        addresses = [literal]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise RequestError(400, f"image_url host {host!r} cannot be resolved ({err})") from err
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise RequestError(400, f"image_url host {host!r} has no address")
    if not config.allow_private_urls:
        for ip in addresses:
            if reason := address_forbidden(ip):
                raise RequestError(403, f"image_url host {host!r} resolves to a {reason} address ({ip}), which this "
                                        "server does not fetch from (--server.allow_private_urls)")
    return str(addresses[0])


async def fetch_image_url(url: str, config: ServeConfig) -> bytes:
    """Download ``image_url`` under the allow-list, address, redirect, size and time limits."""
    if not config.allowed_url_hosts:
        raise RequestError(403, "image_url is disabled on this server; start it with --server.allowed_url_hosts "
                                "'[host, ...]' to fetch images from those hosts")
    try:
        return await asyncio.wait_for(_fetch(url, config), config.url_timeout_s)
    except asyncio.TimeoutError as err:
        raise RequestError(408, f"image_url took longer than url_timeout_s={config.url_timeout_s} s") from err


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """The system's CA store, loaded once (building it per request costs ~40 ms)."""
    return ssl.create_default_context()


async def _fetch(url: str, config: ServeConfig) -> bytes:
    first_host = None
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=config.url_timeout_s,
                                 verify=_tls_context()) as client:
        for _ in range(config.max_url_redirects + 1):
            try:
                parsed = httpx.URL(url)
            except (httpx.InvalidURL, ValueError, TypeError) as err:
                raise RequestError(400, f"image_url {url[:200]!r} is not a valid URL ({err})") from err
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise RequestError(400, f"image_url must be an http:// or https:// URL with a host, got {url[:200]!r}")
            host = parsed.host.lower().rstrip(".")
            if first_host is None:
                if not host_allowed(host, config.allowed_url_hosts):
                    raise RequestError(403, f"image_url host {host!r} is not one of the allowed hosts "
                                            f"{config.allowed_url_hosts}")
                first_host = host
            elif host != first_host:
                raise RequestError(403, f"image_url redirected from {first_host!r} to another host {host!r}, "
                                        "which is not followed")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            ip = await _resolve(host, port, config)
            target = parsed.copy_with(host=ip)  # connect to the address that was checked
            host_header = host if parsed.port is None else f"{host}:{parsed.port}"
            extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
            try:
                async with client.stream("GET", target, headers={"Host": host_header, "Accept": "image/*"},
                                         extensions=extensions) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        if not location:
                            raise RequestError(400, f"image_url answered {response.status_code} without a Location")
                        url = urljoin(str(parsed), location)
                        continue
                    if response.status_code != 200:
                        raise RequestError(400, f"image_url answered HTTP {response.status_code}, not 200")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > config.max_upload_bytes:
                        raise _too_large("image_url content", declared, config.max_upload_bytes)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > config.max_upload_bytes:
                            raise _too_large("image_url content", f"more than {config.max_upload_bytes:,}",
                                             config.max_upload_bytes)
                    return bytes(data)
            except httpx.HTTPError as err:
                raise RequestError(400, f"cannot fetch image_url from {host!r}: {type(err).__name__}: {err}") from err
    raise RequestError(400, f"image_url redirected more than max_url_redirects={config.max_url_redirects} times")
