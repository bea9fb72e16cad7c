"""What the commands share to work against a service (``--lut http://...``, ``--remote URL``): a progress
bar that follows a job, and the device lock of local measurements."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def local_lut(value: str) -> str:
    """A ``--lut`` value as a local file: table URLs are downloaded once into the cache (sha256 checked)."""
    if not value.startswith(("http://", "https://")):  # a local file: the service client (httpx) is not loaded
        return value
    from nvit.service.client import resolve_lut

    return resolve_lut(value)


@contextlib.contextmanager
def following(console: Console, label: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar for a remote job; yields the callback that updates it from the job's state."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(job: dict[str, Any]) -> None:
            progress = job.get("progress") or {}
            where = f"{label} (job {job['id']}, {job['state']})"
            detail = " ".join(str(progress[k]) for k in ("phase", "name") if progress.get(k))
            total = progress.get("total")
            bar.update(task, description=f"{where} {detail}".strip(), total=total,
                       completed=progress.get("done", 0) if total else 0)

        yield update


@contextlib.contextmanager
def measuring_here(device: Any, console: Console, what: str, cuda_index: int = 0) -> Iterator[None]:
    """Hold this machine's device lock while measuring (waiting, with a note, while another measurement —
    a local one or an agent's job — has it)."""
    from nvit.profiler.devicelock import device_lock

    def waiting(holder: str) -> None:
        console.print(f"waiting for the device: it is measuring for {holder}", highlight=False)

    with device_lock(device, cuda_index=cuda_index, holder=f"nvit {what}", on_wait=waiting):
        yield


def profile_remotely(url: str, body: dict[str, Any], out: Any, console: Console) -> None:
    """Submit a profile job, follow it, print where its table is, and download it to ``out`` if given."""
    from pathlib import Path

    from nvit.service.client import ServiceClient
    from nvit.service.remote_measure import run_job

    space = body["space"]
    if space.endswith(".json") or Path(space).is_file():  # a local space file travels as its JSON object
        from nvit.profiler.space import load_space

        body = {**body, "space": load_space(space).to_dict()}
    with ServiceClient(url) as client:
        try:
            with following(console, "profiling") as update:
                job = run_job(client, body, on_update=update, cancel_on_interrupt=False)
        except KeyboardInterrupt:
            console.print("stopped following; the job keeps running on the service (see /v1/jobs)")
            raise
        result = client.expect(job["result"], {"lut": str, "lut_url": str, "rows": int, "agent": dict, "measured": int,
                                               "resumed": int, "seconds": (int, float)}, f"job {job['id']}'s result")
        table_url = client.base_url + result["lut_url"]
        console.print(f"job {job['id']} profiled {result['rows']} configurations on {result['agent']['name']} "
                      f"({result['measured']} measured, {result['resumed']} resumed, {result['seconds']:.0f} s)")
        console.print(f"table: {table_url}", highlight=False, soft_wrap=True)
        if out is not None:
            client.download(result["lut_url"], out, sha256=result["lut"])
            console.print(f"saved {out}")
