"""Downloading a model set's weights (``ovdiff models fetch``): the pinned hub revisions into the Hugging Face
cache and CutLER's checkpoint into the weights folder, bounded as a whole by the fetch timeouts, and laid out as a
self-contained folder (``--to``) by content. Imports nothing heavy until a download runs.
"""

from __future__ import annotations

from pathlib import Path

from .registry import (
    ROLE_FILES,
    Component,
    ModelUnavailable,
    _content_id,
    local_snapshot,
    weight_files,
    weights_dir,
)


def fetch_timeouts() -> tuple[float, float]:
    """(connect, read) seconds for downloads: the defaults, or ``OVDIFF_FETCH_TIMEOUT`` for both."""
    import os

    from ..defaults import FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT

    raw = os.environ.get("OVDIFF_FETCH_TIMEOUT", "")
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"OVDIFF_FETCH_TIMEOUT={raw!r}: expected a number of seconds") from None
    return (value, value) if value > 0 else (FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT)


class FetchTimeout(TimeoutError):
    """A download gave up: the server sent nothing for ``bound`` seconds, counted across every retry and file of
    the fetch; ``waited`` is how long the whole fetch ran, ``last`` the last error other than a timeout, if any."""

    def __init__(self, bound: float, waited: float, last: str | None = None) -> None:
        also = f"; last: {last}" if last else ""
        super().__init__(f"no answer within {bound:g} s (gave up after {waited:.1f} s{also})")
        self.bound, self.waited = bound, waited


class _Silence:
    """How long the server has sent nothing during one fetch. huggingface_hub retries a timed-out request up to
    five times with back-off (six waits of the read timeout, 387 s at the defaults), so the bound is kept here, for
    the whole fetch: every request's timeouts are cut to what is left of it, and once it is spent the fetch ends."""

    def __init__(self, connect: float, read: float) -> None:
        import time

        self.connect, self.bound = connect, read
        self.started = self.heard = time.monotonic()
        self.last: str | None = None  # the last error that was no timeout (a refused connection, say)

    def answered(self) -> None:
        """The server sent something (headers or bytes): the silence starts again."""
        import time

        self.heard = time.monotonic()

    def left(self) -> float:
        """Seconds of silence still allowed; raises FetchTimeout when none are."""
        import time

        now = time.monotonic()
        # A socket timeout of `left` seconds fires no earlier than `left` seconds after this call; the slack absorbs
        # clock rounding so that a timeout cut to the bound is recognised as the bound.
        if now >= self.heard + self.bound - 0.01:
            raise FetchTimeout(self.bound, now - self.started, self.last)
        return self.heard + self.bound - now


def _bounded_client(silence: _Silence, **client_options):
    """An ``httpx2.Client`` whose every request and every read is bounded by ``silence`` (whatever timeout its caller
    passed: huggingface_hub passes none, or its own 10 s), following redirects."""
    import httpx2

    class HeardStream(httpx2.SyncByteStream):
        def __init__(self, stream) -> None:
            self.stream = stream

        def __iter__(self):
            try:
                for chunk in self.stream:
                    silence.answered()
                    yield chunk
            except httpx2.TimeoutException:
                silence.left()  # a read cut to the end of the bound: the whole fetch is over, not just this try
                raise

        def close(self) -> None:
            self.stream.close()

    class BoundedTransport(httpx2.HTTPTransport):
        def handle_request(self, request):
            left = silence.left()
            connect, read = min(silence.connect, left), min(silence.bound, left)
            request.extensions["timeout"] = {"connect": connect, "read": read, "write": read, "pool": connect}
            try:
                response = super().handle_request(request)
            except httpx2.TimeoutException:
                silence.left()
                raise
            except httpx2.TransportError as exc:  # retried by the hub within the bound: say it if the bound ends
                silence.last = f"{type(exc).__name__}: {exc}".splitlines()[0]
                raise
            silence.answered()
            response.stream = HeardStream(response.stream)
            return response

    return httpx2.Client(follow_redirects=True, transport=BoundedTransport(), **client_options)


def _hub_client_with_timeouts() -> None:
    """Make huggingface_hub give up once the server has been silent for the read timeout (:func:`fetch_timeouts`),
    counted from now across all its requests and retries."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    silence = _Silence(*fetch_timeouts())
    set_client_factory(lambda: _bounded_client(silence, event_hooks={"request": [hf_request_event_hook]}))


def lay_out(comp: Component, source: Path, target: Path, link: bool = False) -> str:
    """Put a fetched component's weight files under ``target`` (``models fetch --to``) and say what was written.

    Files are hard-linked from the download cache where the file system allows it, else copied (through a ``.part``
    file, so a cut copy never looks complete), so the folder works on machines that do not share that cache;
    ``link`` makes symlinks instead. A file already there is kept only when its content is the source's (weights of
    one architecture always have the same size, so the size says nothing); a file with other content, e.g. from
    before a pin moved, is replaced and named, and a link pointing nowhere is replaced. A CutLER checkpoint keeps
    its file name inside ``target``.
    """
    import os
    import shutil

    names = [source.name] if source.is_file() else list(comp.allow_patterns or ROLE_FILES.get(comp.role, ()))
    base = source.parent if source.is_file() else source
    counts = {"hard-linked": 0, "copied": 0, "symlinked": 0, "already there": 0}
    replaced = []
    if target.is_symlink() and not target.exists():
        target.unlink()  # a dangling link from an older layout: never keep it
    for rel in names:
        src, dst = (base / rel).resolve(), target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and not dst.exists():
            dst.unlink()
        stale = dst.exists() and not dst.is_symlink()
        if stale and _same_content(dst, src):
            counts["already there"] += 1
            continue
        dst.unlink(missing_ok=True)
        if link:
            dst.symlink_to(src)
            how = "symlinked"
        else:
            try:
                os.link(src, dst)
                how = "hard-linked"
            except OSError:  # another file system, or links not allowed: a copy always works
                partial = dst.with_name(dst.name + ".part")
                shutil.copy2(src, partial)
                partial.replace(dst)
                how = "copied"
        if stale:
            replaced.append(rel)
        else:
            counts[how] += 1
    done = [f"{n} {what}" for what, n in counts.items() if n]
    if replaced:
        done.append(f"{len(replaced)} replaced (content differed: {', '.join(replaced)})")
    return f"{target}: {len(names)} files ({', '.join(done)})"


def _same_content(path: Path, source: Path) -> bool:
    """Whether ``path`` holds exactly the bytes of ``source`` (a resolved file). A hub blob of an LFS file is named
    by the sha256 of its content, so only ``path`` is read (once: :func:`_content_id` remembers its digest by path,
    size and mtime); any other source (a small hub file, named by its git hash, or a checkpoint) is compared byte
    for byte."""
    import filecmp
    import os
    import re

    if path.stat().st_size != source.stat().st_size:
        return False
    if os.path.samefile(path, source):
        return True  # hard-linked by an earlier run
    if source.parent.name == "blobs" and re.fullmatch("[0-9a-f]{64}", source.name):
        return _content_id(path) == f"sha256:{source.name}"
    return filecmp.cmp(path, source, shallow=False)


def _complete_here(comp: Component) -> Path | None:
    """This component's weights, when every file of a revision that cannot move (a commit sha, or a checkpoint URL's
    file) is already here and whole: then nothing needs the network. None otherwise."""
    import re

    if comp.hub_id and not re.fullmatch("[0-9a-f]{40}", comp.revision or ""):
        return None  # a branch may have moved since the last fetch: only the hub can say
    try:
        weight_files(comp)
    except ModelUnavailable:
        return None
    return local_snapshot(comp)


def _download(url: str, target: Path) -> Path:
    """Download ``url`` to ``target`` through a ``.part`` file (a present file is a complete download), giving up
    once the server has been silent for the read timeout, as the hub's downloads do."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with _bounded_client(_Silence(*fetch_timeouts())) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        with open(partial, "wb") as fh:
            for block in response.iter_bytes(1 << 20):
                fh.write(block)
    partial.replace(target)  # atomic
    return target


def fetch(comp: Component) -> Path:
    """Download one component's pinned revision into the Hugging Face cache, or its checkpoint URL into the weights
    folder (``ovdiff models fetch``). A pinned revision already complete here is used without touching the network.

    Raises FetchTimeout once the server has sent nothing for the read timeout (:func:`fetch_timeouts`), counted
    over the whole fetch: the hub client's retries do not multiply it.
    """
    if comp.builtin or comp.local:
        raise ValueError(f"{comp.role} is {comp.source}: nothing to fetch")
    here = _complete_here(comp)
    if here is not None:
        return here
    if comp.url:
        return _download(comp.url, weights_dir() / comp.role / comp.url.rsplit("/", 1)[-1])
    from huggingface_hub import constants, set_client_factory, snapshot_download
    from huggingface_hub.utils._http import default_client_factory

    _hub_client_with_timeouts()
    # hf_xet would download the large files outside the HTTP client, where the bound neither sees their bytes nor
    # cuts their waits: plain HTTPS downloads (which the hub serves for every file) keep the bound true.
    xet = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        return Path(
            snapshot_download(comp.hub_id, revision=comp.revision, allow_patterns=list(comp.allow_patterns) or None)
        )
    finally:
        constants.HF_HUB_DISABLE_XET = xet
        set_client_factory(default_client_factory)  # never leave a spent bound on the process's hub client
