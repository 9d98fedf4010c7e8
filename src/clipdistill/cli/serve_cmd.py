"""``clipdistill serve``: the HTTP search service and web page over one or more indexes.

Bound to 127.0.0.1 unless ``--host`` says otherwise: the service has no authentication.
Imports nothing from torch (like ``search``), so it runs where only onnxruntime + FAISS are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipdistill.cli.common import console, reports_user_errors

_STARTUP_FAILURE = 3  # uvicorn's exit status when the server could not start


@reports_user_errors
def serve_command(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `clipdistill index` (the default index).")],
    index: Annotated[
        list[str] | None,
        typer.Option("--index", help="Another index to serve, as NAME=DIR (repeatable)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Name of INDEX_DIR in the API (default: its folder name).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    variant: Annotated[str, typer.Option("--variant", help="Query encoders: fp32 | int8")] = "fp32",
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="onnxruntime intra-op threads per query (1: best under load).")
    ] = 1,
    slots: Annotated[
        int | None, typer.Option("--slots", min=1, help="Queries encoded at once (default: cores / threads).")
    ] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = True,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Another name clients may reach the server by (Host header; repeatable; '*': any). "
            "Default: the --host address and localhost names.",
        ),
    ] = None,
    limit_concurrency: Annotated[
        int, typer.Option("--limit-concurrency", min=1, help="Connections + requests at once; beyond: 503.")
    ] = 64,
    timeout_keep_alive: Annotated[
        int, typer.Option("--timeout-keep-alive", min=1, help="Seconds an idle connection is kept open.")
    ] = 5,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", min=0.1, help="Seconds a request body may take to arrive (408).")
    ] = 30.0,
    decode_memory_mb: Annotated[
        int, typer.Option("--decode-memory-mb", min=64, help="MiB of decoded query images held at once.")
    ] = 512,
    caption_search: Annotated[
        bool,
        typer.Option(
            "--caption-search/--no-caption-search",
            help="Embed every caption at start-up for target=text (off: faster start, target=text is a 422).",
        ),
    ] = True,
) -> None:
    """Serve indexes over HTTP: POST /search, GET /indexes, /images/{id}, /healthz, /metrics, and a web page at /."""
    import uvicorn

    from clipdistill.serve.app import allowed_hosts, create_app, default_index_name, parse_index_option

    indexes: dict[str, Path] = {}
    try:
        pairs = [(name or default_index_name(index_dir), index_dir)]
        pairs += [parse_index_option(value) for value in index or []]
        for key, directory in pairs:
            if key in indexes:
                raise ValueError(f"index name {key!r} is given twice")
            indexes[key] = directory
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    import faiss

    faiss.omp_set_num_threads(1)  # one query per search call: parallelism comes from concurrent requests
    from clipdistill.serve.app.budget import return_freed_pixels_to_the_os

    if not return_freed_pixels_to_the_os():
        console.print("note: not glibc; freed image memory may stay with the process", highlight=False)
    hosts = allowed_hosts(host, allow_host)
    app = create_app(  # opens and checks every index
        indexes,
        variant=variant,
        threads=threads,
        slots=slots,
        caption_search=caption_search,
        allowed_hosts=hosts,
        decode_memory=decode_memory_mb * 1024 * 1024,
        body_timeout=body_timeout,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the service has no authentication", highlight=False)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=timeout_keep_alive,
    )
    # Bind before saying where: with --port 0 the kernel picks the port, and only the bound
    # socket knows it (uvicorn then serves on this very socket, so the printed URL is the one).
    # Listening at once means a client that reads the URL and connects straight away waits in
    # the backlog until uvicorn accepts, instead of being refused.
    sock = config.bind_socket()
    sock.listen(config.backlog)
    names = ", ".join(f"{key} ({app.state.indexes[key].count} items)" for key in indexes)
    console.print(
        f"serving {names} on {server_url(host, sock.getsockname()[1])} "
        f"(docs: /docs; {app.state.slots} slots x {threads} threads)",
        highlight=False,
        markup=False,  # index names and hosts are the user's, printed as written
    )
    console.print(f"answering to Host: {', '.join(hosts)} (add names with --allow-host)", highlight=False, markup=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C during the graceful shutdown
        pass
    finally:
        sock.close()
    if not server.started:  # the app failed to start (its error is logged): uvicorn.run's exit status
        raise typer.Exit(code=_STARTUP_FAILURE)


def server_url(host: str, port: int) -> str:
    """The service's base URL; an IPv6 address goes in brackets (``http://[::1]:8000/``)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
