"""dashboard(): optuna-dashboard on a study storage, to watch a search and read what it found in a browser.

Each study explains itself there: its name says shape, device, Triton version and batch size; its user
attributes repeat them (model, E, N, K, topk, dtype, block_shape, swiglu_limit, M); its note (notes.py) gives the
best config, its latency, SGLang's default and the speedup. optuna-dashboard is imported only when a server starts.
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import TuneError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
STUDIES_DIR = "studies"  # where tune() puts its default storage (store/identity.py, default_storage)


def latest_storage(studies_dir: str | Path = STUDIES_DIR) -> str:
    """The storage URL of the most recently modified ``studies/*.db`` or ``studies/*.journal``: where the last
    tune with the default storage wrote (study.default_storage).

    Example:
        >>> latest_storage("studies")  # doctest: +SKIP
        'sqlite:///studies/DeepSeek-V4-Flash.db'
    """
    found = sorted((p for pattern in ("*.db", "*.journal") for p in Path(studies_dir).glob(pattern) if p.is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise TuneError(f"no storage given and no {Path(studies_dir) / '*.db'} or *.journal found; give a storage "
                        "such as sqlite:///studies/model.db, a .db file path or journal:PATH")
    latest = found[-1]
    return f"journal:{latest}" if latest.suffix == ".journal" else f"sqlite:///{latest}"


@dataclass
class DashboardHandle:
    """A dashboard serving in a background thread. ``stop()`` (or leaving a ``with`` block) shuts it down.

    Attributes:
        url: the dashboard's address, e.g. ``http://127.0.0.1:8080/dashboard``.
        storage: the storage URL (or object) it shows.
    """

    url: str
    storage: Any
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> "DashboardHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _fill_notes(store: Any, infos: list) -> int:
    """Write the note of each study that has none (tuned where optuna-dashboard was not installed, or by an
    older moe_opt), so that every study explains itself; a read-only storage is shown as it is."""
    import optuna

    from .notes import has_note, refresh_study_note

    written = 0
    for info in infos:
        try:
            study = optuna.load_study(study_name=info.name, storage=store)
            if not has_note(study):
                refresh_study_note(study)
                written += 1
        except Exception:  # noqa: BLE001 - e.g. a read-only database: notes are a courtesy, not a requirement
            break
    return written


# optuna-dashboard's study cards show the study name, in 24-pixel type with `word-break: break-all`: a 110-character
# moe_opt name breaks mid-token over four lines, and its batch size, last, is what differs from card to card. The
# page we serve gets smaller type for the name and, above it, the batch size read from the name's `|M=<M>` end, in
# large type (a node added beside the app's own, which the app neither knows nor touches; selectors are MUI's public
# class names). The study name itself is unchanged: it is the study's identity (store/identity.py).
STUDY_CARD_CSS = (".MuiCard-root .MuiCardContent-root .MuiTypography-h5{word-break:normal!important;"
                  "overflow-wrap:anywhere;font-size:0.95rem;line-height:1.45;color:#555}"
                  ".moe-opt-m{font-size:1.6rem;font-weight:600;color:#1f5fbf;line-height:1.3}")
STUDY_CARD_JS_PATH = "/moe-opt/study-cards.js"
STUDY_CARD_JS = """
(() => {
  const label = () => document.querySelectorAll('.MuiCard-root .MuiCardContent-root').forEach(content => {
    const title = content.querySelector('.MuiTypography-h5');
    const m = title && /[|]M=(\\d+)$/.exec(title.textContent.trim());
    let badge = content.querySelector(':scope > .moe-opt-m');
    if (!m) { if (badge) badge.remove(); return; }
    if (!badge) {
      badge = document.createElement('div');
      badge.className = 'moe-opt-m';
      content.insertBefore(badge, content.firstChild);
    }
    if (badge.textContent !== 'M = ' + m[1]) badge.textContent = 'M = ' + m[1];
  });
  const start = () => { label(); new MutationObserver(label).observe(document.body, {childList: true, subtree: true}); };
  document.readyState === 'loading' ? document.addEventListener('DOMContentLoaded', start) : start();
})();
"""


def readable_study_names(app: Callable) -> Callable:
    """Wrap optuna-dashboard's WSGI app so that its HTML page carries :data:`STUDY_CARD_CSS` and
    :data:`STUDY_CARD_JS` (nothing else changes: API and static responses pass through untouched)."""

    script = STUDY_CARD_JS.encode()

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == STUDY_CARD_JS_PATH:  # a file of its own: the page's Content-Security-Policy refuses inline scripts
            start_response("200 OK", [("Content-Type", "text/javascript; charset=utf-8"),
                                      ("Content-Length", str(len(script)))])
            return [script]
        if path.startswith(("/api/", "/static/")):
            return app(environ, start_response)
        captured: dict[str, Any] = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None  # optuna-dashboard (bottle) returns its body; it never calls write()

        body = app(environ, capture)
        try:
            chunks = b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()
        headers = captured["headers"]
        html = any(k.lower() == "content-type" and v.startswith("text/html") for k, v in headers)
        if html and b"</head>" in chunks:
            extra = f"<style>{STUDY_CARD_CSS}</style><script defer src='{STUDY_CARD_JS_PATH}'></script></head>"
            chunks = chunks.replace(b"</head>", extra.encode(), 1)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(chunks))))
        start_response(captured["status"], headers, captured["exc_info"])
        return [chunks]

    return wrapped


def _make_server(storage: Any, host: str, port: int):
    """A threaded WSGI server (as ``optuna-dashboard`` itself runs) bound to host:port, with quiet request logs."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from optuna_dashboard import wsgi

    from .report_data import open_studies

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise TuneError(f"port {port!r} is not a port number; give an integer 1..65535, or 0 for any free port")
    store, infos, url = open_studies(latest_storage() if storage is None else storage)
    _fill_notes(store, infos)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # SO_REUSEADDR stays on: on Linux it frees TIME_WAIT ports, never a listening one

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args) -> None:  # one line per request would drown the URL
            pass

    try:
        server = make_server(host, port, readable_study_names(wsgi(store)), server_class=Server,
                             handler_class=QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TuneError(f"port {port} on {host} is in use; pass a free port with --port (e.g. {port + 1}), "
                            "or 0 for any free port") from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise TuneError(f"cannot listen on host {host!r}: {exc.strerror or exc}; use 127.0.0.1 (this machine "
                            "only) or 0.0.0.0 (all interfaces)") from None
        raise TuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.server_address[:2]
    # A wildcard address ("" or 0.0.0.0 binds every interface) is no place to browse to: this machine reaches it as
    # 127.0.0.1, other machines by this host's name.
    shown_host = "127.0.0.1" if bound_host in ("", "0.0.0.0") else bound_host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    return server, f"http://{shown_host}:{bound_port}/dashboard", url, infos


def listening(server) -> str:
    """Where a server listens, as a person reads it: ``127.0.0.1:8080``, or ``every interface (0.0.0.0:8080)``.

    Example:
        >>> class Bound: server_address = ("0.0.0.0", 8080)
        >>> listening(Bound())
        'every interface (0.0.0.0:8080)'
    """
    host, port = server.server_address[:2]
    if host in ("", "0.0.0.0", "::"):
        return f"every interface ({host or '0.0.0.0'}:{port})"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_dashboard(storage: Any = None, *, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> DashboardHandle:
    """Serve optuna-dashboard on ``storage`` in a background thread and return at once.

    Args:
        storage: Optuna storage URL (sqlite:///..., journal:PATH, postgresql://...), a .db file path, or a
            storage object; default the most recently modified ``studies/*.db`` or ``studies/*.journal``.
        port: TCP port; 0 picks a free one (read it from ``handle.url``).
        host: interface to listen on; 127.0.0.1 keeps the dashboard to this machine.

    Returns:
        DashboardHandle with ``url`` and ``stop()``.

    Raises:
        TuneError: the storage is missing or holds no moe_opt study, or the port is in use.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///demo.db", output_dir=None, progress=False)  # doctest: +SKIP
        >>> with start_dashboard("sqlite:///demo.db", port=0) as handle:  # doctest: +SKIP
        ...     print(handle.url)
        http://127.0.0.1:40313/dashboard
    """
    server, url, storage_url, _ = _make_server(storage, host, port)
    thread = threading.Thread(target=server.serve_forever, name="moe-opt-dashboard", daemon=True)
    thread.start()
    return DashboardHandle(url, storage_url, server, thread)


def dashboard(storage: Any = None, *, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> None:
    """Serve optuna-dashboard on ``storage`` until Ctrl-C; prints which storage it shows and the URL.

    Args:
        storage: as for :func:`start_dashboard`; default the most recently modified storage in ``studies/``.
        port: TCP port (default 8080); 0 picks a free one.
        host: interface to listen on (default 127.0.0.1, this machine only).

    Raises:
        TuneError: the storage is missing or holds no moe_opt study, or the port is in use.

    Example:
        >>> import moe_opt
        >>> moe_opt.dashboard("sqlite:///studies/DeepSeek-V4-Flash.db", port=8080)  # doctest: +SKIP
        moe-opt dashboard: 18 studies (1 shape) in sqlite:///studies/DeepSeek-V4-Flash.db
        moe-opt dashboard: open http://127.0.0.1:8080/dashboard (listening on 127.0.0.1:8080 only; Ctrl-C stops)
    """
    picked = storage is None
    server, address, url, infos = _make_server(latest_storage() if picked else storage, host, port)
    shapes = len({i.base for i in infos})
    how = " (the most recently modified storage in studies/)" if picked else ""
    print(f"moe-opt dashboard: {len(infos)} studies ({shapes} shape{'s' * (shapes != 1)}) in {url}{how}", flush=True)
    bound = listening(server)
    if bound.startswith("every interface"):
        port = server.server_address[1]
        print(f"moe-opt dashboard: open {address} (listening on {bound}: from another machine open "
              f"http://{socket.gethostname()}:{port}/dashboard; Ctrl-C stops)", flush=True)
    else:
        print(f"moe-opt dashboard: open {address} (listening on {bound} only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
