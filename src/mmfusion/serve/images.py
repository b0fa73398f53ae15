"""Images that arrive in requests: data URLs, ids of indexed images, and (only when enabled) http(s) URLs.

Nothing here ever opens a path taken from a request. An indexed image is named by its id
(``mmfusion://images/42``) and read from the path the index stored. URL fetching is off by default; when it is
on, every address a host name resolves to must be public (no loopback, private, link-local, multicast or reserved
ranges), the connection goes to the address that was checked (a second DNS answer cannot point elsewhere), each
redirect is checked again, and the body is bounded in bytes and time.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

from fastapi import HTTPException
from PIL import Image

from ..data.images import ImageDecodeError
from .schemas import MAX_ID

INDEXED = re.compile(r"^mmfusion://images/([0-9]+)$")
INDEXED_FRAME = re.compile(r"^mmfusion://videos/([0-9]+)\?t=([0-9]{1,8}(?:\.[0-9]{1,6})?)$")  # a video's frame
MAX_REDIRECTS = 3


DATA_ONLY = "images are sent as data URLs (data:image/png;base64,...); URLs and paths are not read here"
# where a reference is refused -> (the message for a path or file: URL, for an http(s) URL while fetching is off)
REFUSALS = {
    "data": (DATA_ONLY, DATA_ONLY),  # embeddings, search and labels: data URLs only
    "chat": (DATA_ONLY, "this service does not fetch URLs: send the image as a data URL (or start it with "
                        "--allow-url-fetch)"),
    "jobs": ("images are data URLs or indexed ids; paths are not read",
             "this service does not fetch URLs: send data URLs or indexed ids"),
}  # fmt: skip


def check_image_ref(url: str, allow_url_fetch: bool = False, where: str = "data") -> None:
    """The one rule for image references in requests: a path (or ``file:`` URL) is never read, and an http(s) URL
    only when the service allows URL fetching. Every route that takes an image reference calls this.

    Args:
        url: the reference as sent.
        allow_url_fetch: the service's setting (``data`` routes never fetch, whatever it says).
        where: which route family asks (``data``, ``chat``, ``jobs``); it picks the message's advice.

    Raises:
        HTTPException: 400 for a reference that must not be read.
    """
    path_msg, url_msg = REFUSALS[where]
    if url.startswith(("file:", "/")):
        raise HTTPException(400, path_msg)
    if url.startswith(("http://", "https://")) and (where == "data" or not allow_url_fetch):
        raise HTTPException(400, url_msg)


def decode_data_url(url: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """A data URL (or bare base64) to an RGB image; the pixel count is checked before decoding.

    Args:
        draft_size: let a JPEG decode at reduced scale, no smaller than this, as indexing decodes it for the model
            (queries then embed as the indexed images did); None: full scale.
    """
    check_image_ref(url)
    payload = url.split(",", 1)[1] if url.startswith("data:") else url
    if url.startswith("data:") and ";base64" not in url.split(",", 1)[0]:
        raise HTTPException(400, "a data URL image must be base64-encoded (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(400, f"the image is not valid base64: {e}") from e
    return decode_image_bytes(data, max_pixels, draft_size)


def decode_image_bytes(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Image bytes to a whole RGB image (EXIF orientation applied); 422 for bytes that are not a usable image."""
    from ..index.decode import decode_bytes

    try:
        return decode_bytes(data, draft_size, max_pixels, draft=True, crop=False).pixels
    except ImageDecodeError as e:
        raise HTTPException(422, f"cannot use the image: {e}") from e


def indexed_id(url: str) -> int | None:
    """The id in ``mmfusion://images/<id>``, or None for any other reference.

    Raises:
        HTTPException: 422 for an id outside the range of image ids.
    """
    m = INDEXED.match(url.strip())
    if m is None:
        return None
    digits = m.group(1).lstrip("0") or "0"
    if len(digits) > len(str(MAX_ID)) or int(digits) > MAX_ID:
        raise HTTPException(422, f"image ids are 0 to {MAX_ID}; {url.strip()[:60]} names none")
    return int(digits)


def indexed_frame(url: str) -> tuple[int, float] | None:
    """(id, seconds) in ``mmfusion://videos/<id>?t=<seconds>`` (the frame an indexed video shows then), or None.

    Raises:
        HTTPException: 422 for an id outside the range of ids, or a ``mmfusion://videos/`` reference of another form.
    """
    m = INDEXED_FRAME.match(url.strip())
    if m is None:
        if url.strip().startswith("mmfusion://videos/"):
            raise HTTPException(422, f"{url.strip()[:60]} names no frame: write mmfusion://videos/<id>?t=SECONDS "
                                     "(the time in seconds, such as mmfusion://videos/5?t=12.5)")  # fmt: skip
        return None
    image_id = indexed_id(f"mmfusion://images/{m.group(1)}")
    return image_id, float(m.group(2))


def video_frame_image(path: str, t: float, max_pixels: int, gone: bool = False) -> Image.Image:
    """The frame an indexed video shows at ``t``, for the frame route and chat's ``mmfusion://videos/<id>?t=``.

    Raises:
        HTTPException: 503 without PyAV; 413 for frames over ``max_pixels`` (checked before decoding); 422 for a
            video that cannot be read (410 when ``gone``: the caller says the index read it before).
    """
    from ..index.video import NoPyAVError, VideoFileError, VideoTooLargeError, frame_at

    try:
        return frame_at(path, t, max_pixels)
    except NoPyAVError as e:
        raise HTTPException(503, f"this service cannot read videos: {e}") from e
    except VideoTooLargeError as e:
        raise HTTPException(413, f"the video's frame is too large: {e}") from e
    except VideoFileError as e:
        if gone:
            raise HTTPException(410, f"the indexed video cannot be read any more ({e}); re-run mmfusion index") from e
        raise HTTPException(422, f"cannot read the video: {e}") from e


def is_public(address: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local and the like."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


class RefusedAddress(Exception):
    """A URL whose host resolves to an address the service must not reach."""


def _checked_addresses(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RefusedAddress(f"cannot resolve {host!r}: {e}") from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    bad = [a for a in addresses if not is_public(a)]
    if not addresses or bad:
        raise RefusedAddress(f"{host!r} resolves to a private, loopback or reserved address ({', '.join(bad)})")
    return addresses


def _guarded_backend():
    """An httpcore network backend that connects only to checked public addresses."""
    import httpcore

    class GuardedBackend(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            address = _checked_addresses(host, port)[0]  # connect to the address that was checked
            return super().connect_tcp(address, port, timeout, local_address, socket_options)

    return GuardedBackend()


def fetch_url(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """The body of an http(s) URL on a public address, at most ``max_bytes``; redirects are checked too.

    Raises:
        HTTPException: 400 for a refused or unreachable URL, 413 for a body over ``max_bytes``.
    """
    import httpcore

    with httpcore.ConnectionPool(network_backend=_guarded_backend(), retries=0) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HTTPException(400, f"only http and https image URLs can be fetched, not {url[:80]!r}")
            try:
                ext = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
                with pool.stream("GET", url, headers={"User-Agent": "mmfusion"}, extensions=ext) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = dict((k.lower(), v) for k, v in resp.headers).get(b"location")
                        if not location:
                            raise HTTPException(400, f"{url[:80]} redirects without a Location")
                        url = urljoin(url, location.decode("latin-1"))
                        continue
                    if resp.status != 200:
                        raise HTTPException(400, f"fetching {url[:80]} gave HTTP {resp.status}")
                    body = bytearray()
                    for chunk in resp.iter_stream():
                        body += chunk
                        if len(body) > max_bytes:
                            raise HTTPException(413, f"the image at {url[:80]} is over {max_bytes:,} bytes")
                    return bytes(body)
            except RefusedAddress as e:
                raise HTTPException(400, f"refused to fetch {url[:80]}: {e}") from e
            except httpcore.ConnectError as e:
                cause = e.__context__ if isinstance(e.__context__, RefusedAddress) else e
                raise HTTPException(400, f"cannot fetch {url[:80]}: {cause}") from e
            except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
                raise HTTPException(400, f"cannot fetch {url[:80]}: {type(e).__name__} {e}") from e
        raise HTTPException(400, f"{url[:80]} redirects more than {MAX_REDIRECTS} times")


def image_url_of(part: Any) -> str:
    """The URL string of an OpenAI ``image_url`` content part (``{"url": ...}`` or a bare string)."""
    ref = part.get("image_url") if isinstance(part, dict) else None
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise HTTPException(400, "an image_url part needs {'url': 'data:image/...;base64,...'}")
    return url
